"""oq-plugin-mxfp8: MXFP8 (OCP MX v1.0: float8_e4m3fn elements in 1x32 blocks with e8m0 shared
scales) online quantization for oqcore."""
