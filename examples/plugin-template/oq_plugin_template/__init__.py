"""oq-plugin-template: a minimal third-party oqcore scheme (int4 weight-only, 1x32 groups)."""
