"""oq-plugin-mxfp4: OCP MX v1.0 FP4 (e2m1 elements, one e8m0 scale per 32) for oqcore."""
