"""Triton kernels of oq-plugin-mxfp8 (imported lazily by the backends; importing them imports triton)."""
