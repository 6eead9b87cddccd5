"""Triton scaled fp8 GEMMs: ``y = x @ W.T (+ bias)`` with ``W [N, K]`` in float8_e4m3fn.

One kernel, specialised at compile time by how the two operands are scaled:

- activation scale ``A_SCALE``: ``0`` none (weight-only W8A16: ``x`` stays bf16/fp16/fp32 and the
  fp8 weight tile is upcast, exactly, to ``x``'s dtype), ``1`` per-tensor ``[1]``, ``2`` per-token
  ``[M, 1]``, ``3`` 1x128 groups ``[M, ceil(K/128)]``;
- weight scale ``B_SCALE``: ``1`` per-tensor ``[1]``, ``2`` per-channel ``[N, 1]``, ``3`` 128x128
  blocks ``[ceil(N/128), ceil(K/128)]``.

Group/block scales vary along K, so they are applied to each ``BLOCK_K = 128`` partial product
(vLLM's ``w8a8_block_fp8_matmul``); per-tensor/token/channel scales are applied once in the
epilogue. Accumulation is float32. W8A8 dots take fp8 operands straight to the tensor cores (CUDA
capability >= 8.9); the weight-only path needs only bf16/fp32 dots (>= 8.0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

A_NONE, A_TENSOR, A_TOKEN, A_GROUP = 0, 1, 2, 3
B_TENSOR, B_CHANNEL, B_BLOCK = 1, 2, 3


@triton.jit
def _fp8_k_step(
    acc,
    a_ptr,
    b_ptr,
    as_ptr,
    bs_ptr,
    rows,
    rmask,
    offs_n,
    nmask,
    offs_k,
    k0,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_as_m,
    stride_as_k,
    stride_bs_n,
    stride_bs_k,
    A_SCALE: tl.constexpr,
    B_SCALE: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One ``BLOCK_K`` step of the K loop, shared by the dense and the fused-MoE kernel: loads the
    ``A`` tile (rows ``rows`` of ``a_ptr``, masked by ``rmask``) and the ``B`` tile (``b_ptr`` /
    ``bs_ptr`` already point at the expert's weights for MoE), dots them and applies the K-varying
    group/block scales; returns ``acc`` plus the partial product. The callers keep their own row
    addressing (dense rows vs sorted token slots) and epilogue."""
    kk = k0 + offs_k
    kmask = kk < K
    a = tl.load(a_ptr + rows[:, None] * stride_am + kk[None, :] * stride_ak, mask=rmask[:, None] & kmask[None, :], other=0.0)
    b = tl.load(b_ptr + offs_n[None, :] * stride_bn + kk[:, None] * stride_bk, mask=nmask[None, :] & kmask[:, None], other=0.0)
    if A_SCALE == 0:
        # fp8 values are exact in bf16/fp16/fp32; going through float32 sidesteps the Triton 3.9
        # interpreter's wrong fp8 -> bf16 conversion
        b = b.to(tl.float32).to(a.dtype)
        if IEEE_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    if IEEE_DOT:
        part = tl.dot(a, b, input_precision="ieee")
    else:
        part = tl.dot(a, b)
    if A_SCALE == 3 or B_SCALE == 3:
        kb = k0 // BLOCK_K
        if A_SCALE == 3:
            a_s = tl.load(as_ptr + rows * stride_as_m + kb * stride_as_k, mask=rmask, other=0.0)
            part = part * a_s[:, None]
        if B_SCALE == 3:
            b_s = tl.load(bs_ptr + (offs_n // 128) * stride_bs_n + kb * stride_bs_k, mask=nmask, other=0.0)
            part = part * b_s[None, :]
    return acc + part


@triton.jit
def _fp8_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    as_ptr,
    bs_ptr,
    bias_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    stride_as_m,
    stride_as_k,
    stride_bs_n,
    stride_bs_k,
    A_SCALE: tl.constexpr,
    B_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mmask = offs_m < M
    nmask = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc = _fp8_k_step(
            acc, a_ptr, b_ptr, as_ptr, bs_ptr, offs_m, mmask, offs_n, nmask, offs_k, k0, K,
            stride_am, stride_ak, stride_bn, stride_bk, stride_as_m, stride_as_k, stride_bs_n, stride_bs_k,
            A_SCALE, B_SCALE, IEEE_DOT, BLOCK_K,
        )
    if A_SCALE == 1:
        acc = acc * tl.load(as_ptr)
    if A_SCALE == 2:
        acc = acc * tl.load(as_ptr + offs_m * stride_as_m, mask=mmask, other=0.0)[:, None]
    if B_SCALE == 1:
        acc = acc * tl.load(bs_ptr)
    if B_SCALE == 2:
        acc = acc * tl.load(bs_ptr + offs_n * stride_bs_n, mask=nmask, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


def _interpreting(t: torch.Tensor) -> bool:
    """Triton 3.9's interpreter computes bf16/fp16 ``tl.dot`` wrongly (numpy has no bf16): there
    the weight-only path upcasts both tiles to float32 (exact: bf16 and fp8 values are float32
    values) and uses an IEEE float32 dot."""
    from oq_toolkit.triton_support import interpreter_enabled

    return t.device.type == "cpu" and interpreter_enabled()


def _scale_strides(s: torch.Tensor | None) -> tuple[int, int]:
    if s is None or s.dim() < 2:
        return 0, 0
    return s.stride(0), s.stride(1)


def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    a_mode: int,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    b_mode: int,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``a [M, K] @ b [N, K].T`` with the scales described in the module docstring -> ``[M, N]``.

    ``a`` is float8_e4m3fn when ``a_mode != A_NONE``, else bf16/fp16/fp32; ``b`` is float8_e4m3fn;
    scales are float32 dequantization multipliers; ``bias [N]`` any float dtype.
    """
    M, K = a.shape
    N = b.shape[0]
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    grouped = a_mode == A_GROUP or b_mode == B_BLOCK
    block_k = 128 if grouped else 64
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    block_n = 64
    a_s = a_scale.float().contiguous() if a_scale is not None else b_scale
    b_s = b_scale.float().contiguous()
    sam, sak = _scale_strides(a_s) if a_mode in (A_TOKEN, A_GROUP) else (0, 0)
    sbn, sbk = _scale_strides(b_s) if b_mode in (B_CHANNEL, B_BLOCK) else (0, 0)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _fp8_gemm_kernel[grid](
        a, b, c, a_s, b_s, bias if bias is not None else b_s,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        sam, sak, sbn, sbk,
        A_SCALE=a_mode, B_SCALE=b_mode, HAS_BIAS=bias is not None,
        IEEE_DOT=a_mode == A_NONE and (a.dtype == torch.float32 or _interpreting(a)),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return c


def w8a8_block_fp8_matmul(a_q, a_s, b_q, b_s, bias=None, out_dtype=torch.bfloat16):
    """Block-scaled W8A8: ``a_q [M, K]`` fp8 with 1x128 group scales ``a_s [M, ceil(K/128)]``,
    ``b_q [N, K]`` fp8 with 128x128 block scales ``b_s [ceil(N/128), ceil(K/128)]``."""
    return fp8_gemm(a_q, a_s, A_GROUP, b_q, b_s, B_BLOCK, bias, out_dtype)


def w8a16_fp8_matmul(a, b_q, b_s, b_mode, bias=None, out_dtype=None):
    """Weight-only: ``a [M, K]`` bf16/fp16/fp32, ``b_q [N, K]`` fp8 with scale mode ``b_mode``."""
    return fp8_gemm(a, None, A_NONE, b_q, b_s, b_mode, bias, out_dtype or a.dtype)
