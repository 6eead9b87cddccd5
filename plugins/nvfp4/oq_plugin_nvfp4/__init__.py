"""oq-plugin-nvfp4: NVFP4 (e2m1 elements, float8_e4m3fn scales per 16, a float32 global scale) for oqcore."""
