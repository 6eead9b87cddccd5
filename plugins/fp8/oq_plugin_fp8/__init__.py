"""oq-plugin-fp8: FP8 (float8_e4m3fn) online quantization for oqcore: per-tensor, per-channel and
128x128-block weights, with per-tensor, per-token or 1x128-group dynamic activations."""
