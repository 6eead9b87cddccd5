"""Triton kernels of oq-plugin-fp8.

Importing this package is free; each submodule imports Triton and defines ``@triton.jit`` kernels,
so import those submodules lazily (inside the functions that run them), after ``TRITON_INTERPRET``
is set when testing on a CPU.

- :mod:`.quantize`: one-pass fp8 quantizers (per-tensor, per-channel/token, 128x128 blocks, 1x128 groups),
  byte-identical to :mod:`oq_plugin_fp8.quant`.
- :mod:`.gemm`: scaled fp8 GEMMs (block-scaled W8A8 as vLLM's ``w8a8_block_fp8_matmul``,
  per-tensor/per-token W8A8, weight-only W8A16).
- :mod:`.fused_moe`: a fused-MoE grouped GEMM (tokens sorted by expert, as vLLM's ``fused_moe_kernel``).
"""
