"""Triton int8 GEMMs for dense linears: ``y [M, N] = x [M, K] @ W.T`` with ``W`` int8 ``[N, K]`` and
per-output-channel float32 scales.

- W8A16 (weight-only): the int8 tile is converted to the activation dtype inside the K loop
  (exact: |q| <= 127 fits bf16/fp16/fp32), dotted with fp32 accumulation; the per-channel scale is
  constant along K, so it multiplies the accumulator once after the loop (as vLLM's int8_w8a16
  kernels do) instead of every tile.
- W8A8: activations quantized per token (int8 + float32 ``[M]`` scales) by the Triton quantizer,
  int8 x int8 dot with int32 accumulation (exact), then ``acc * a_scale[m] * w_scale[n]`` in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int8_k_step(
    acc,
    a_ptr,
    b_ptr,
    rows,
    r_mask,
    offs_n,
    n_mask,
    offs_k,
    k0,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    W8A8: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
):
    """One ``BLOCK_K`` step of the K loop, shared by the dense and the fused-MoE kernel: loads the
    ``A`` tile (rows ``rows`` of ``a_ptr``, masked by ``r_mask``) and the int8 ``B`` tile (``b_ptr``
    already points at the expert's weights for MoE) and accumulates their dot into ``acc``, which
    is returned. The callers keep their own row addressing (dense rows vs sorted token slots) and
    epilogue."""
    kk = k0 + offs_k
    k_mask = kk < K
    a = tl.load(a_ptr + rows[:, None] * stride_am + kk[None, :] * stride_ak, mask=r_mask[:, None] & k_mask[None, :], other=0)
    b = tl.load(b_ptr + offs_n[None, :] * stride_bn + kk[:, None] * stride_bk, mask=k_mask[:, None] & n_mask[None, :], other=0)
    if W8A8:
        acc += tl.dot(a, b, out_dtype=tl.int32)
    else:
        if INTERPRET_BF16:
            # Triton 3.9's interpreter computes bf16 dots (and int8 -> bf16 casts) on raw bits;
            # bf16 x int8 products are exact in fp32, so this equals the GPU's bf16 dot.
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b.to(a.dtype), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _int8_gemm_kernel(
    a_ptr,
    a_scale_ptr,
    b_ptr,
    b_scale_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    W8A8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    if W8A8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc = _int8_k_step(
            acc, a_ptr, b_ptr, offs_m, m_mask, offs_n, n_mask, offs_k, k0, K,
            stride_am, stride_ak, stride_bn, stride_bk, W8A8, DOT_PRECISION, INTERPRET_BF16,
        )
    b_scale = tl.load(b_scale_ptr + offs_n, mask=n_mask, other=0.0)
    if W8A8:
        a_scale = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
        res = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    else:
        res = acc * b_scale[None, :]
    if HAS_BIAS:
        res += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, res.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def dot_precision(dtype: torch.dtype):
    """fp32 dots must not silently drop to tf32 on CUDA: ask for IEEE; other dtypes use the default."""
    return "ieee" if dtype == torch.float32 else None


def interpret_bf16(dtype: torch.dtype) -> bool:
    """Under ``TRITON_INTERPRET=1`` bf16 dots are computed wrong by Triton 3.9's interpreter (it
    multiplies the raw bit patterns): the kernels then upcast the tiles to fp32 first."""
    from oq_toolkit.triton_support import interpreter_enabled

    return dtype == torch.bfloat16 and interpreter_enabled()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The activation dtype the kernels take: bf16/fp16/fp32 as given, anything else as fp32."""
    return dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32


def int8_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``x [M, K] @ (weight [N, K] int8 * weight_scale [N]).T (+ bias [N])`` -> ``[M, N]``.

    ``x_scale`` given: ``x`` is int8 with per-row float32 scales ``[M]`` (W8A8, int32 accumulation);
    otherwise ``x`` is bf16/fp16/fp32 (W8A16, fp32 accumulation). ``out_dtype`` defaults to ``x``'s
    dtype (W8A16) or float32 (W8A8).
    """
    M, K = x.shape
    N = weight.shape[0]
    w8a8 = x_scale is not None
    out_dtype = out_dtype or (torch.float32 if w8a8 else x.dtype)
    c = torch.empty((M, N), dtype=out_dtype, device=x.device)
    if M == 0:
        return c
    ws = weight_scale.reshape(-1).float()
    xs = x_scale.reshape(-1).float() if w8a8 else ws  # placeholder pointer when unused
    block_m = 16 if M <= 16 else 64
    block_n, block_k = 64, 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _int8_gemm_kernel[grid](
        x, xs, weight, ws, bias if bias is not None else ws, c,
        M, N, K,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), c.stride(0), c.stride(1),
        W8A8=w8a8, HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(x.dtype), INTERPRET_BF16=interpret_bf16(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return c
