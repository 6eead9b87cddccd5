"""oq-plugin-int8: INT8 (symmetric, +-127) per-channel weight quantization for oqcore, weight-only
or with per-token dynamic int8 activations."""
