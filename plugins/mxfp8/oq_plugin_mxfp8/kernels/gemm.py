"""Triton MXFP8 GEMM: ``y = x @ W.T (+ b)`` with ``W`` MXFP8 (float8_e4m3fn + one e8m0 exponent
per 1x32 block along K) and ``x`` either MXFP8 too (W8A8, quantized by the one-pass quantizer
first) or in the model dtype (W8A16).

The K loop walks one MX block (32) at a time, so each partial product carries exactly one weight
scale per output column (and one activation scale per row): ``acc += dot(a, b) * sa[:, None] *
sb[None, :]``. fp8 x fp8 products are exact in float32; only the float32 accumulation order
differs from the reference, which dequantizes and runs ``F.linear`` in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def f32_dot(dtype: torch.dtype) -> bool:
    """Whether W8A16 dots run in IEEE float32: for float32 activations (never TF32, so the result
    is the reference's up to summation order), and for bf16 under TRITON_INTERPRET=1, whose bf16
    ``tl.dot`` returns garbage in Triton 3.9 (bf16 x bf16 products are exact in float32, so this
    computes the same numbers the bf16 tensor-core dot with float32 accumulation does on a GPU)."""
    from oq_toolkit.triton_support import interpreter_enabled

    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreter_enabled())


@triton.jit
def e8m0_to_f32(e):
    """float32 multiplier of biased e8m0 bytes, as :func:`oq_plugin_mxfp8.quant.exponent_to_scale`:
    ``2**(max(e, 1) - 127)``, NaN for 255."""
    e = e.to(tl.int32)
    s = (tl.maximum(e, 1) << 23).to(tl.float32, bitcast=True)
    return tl.where(e == 255, float("nan"), s)


@triton.jit
def _mxfp8_gemm_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    A_MX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """a ``[M, K]`` (fp8 with scales ``as [M, K/32]`` if A_MX, else bf16/fp16/fp32), b ``[N, K]``
    fp8 with ``bs [N, K/32]``, c ``[M, N]`` float32. Program (i, j) computes one BLOCK_M x BLOCK_N tile."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, 32)
    mask_m = rm < M
    mask_n = rn < N
    nblk = K // 32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, nblk):
        k0 = kb * 32
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * K + k0 + rk[None, :], mask=mask_m[:, None], other=0.0)
        b = tl.load(b_ptr + rn[None, :].to(tl.int64) * K + k0 + rk[:, None], mask=mask_n[None, :], other=0.0)
        sb = e8m0_to_f32(tl.load(bs_ptr + rn.to(tl.int64) * nblk + kb, mask=mask_n, other=127))
        if A_MX:
            sa = e8m0_to_f32(tl.load(as_ptr + rm.to(tl.int64) * nblk + kb, mask=mask_m, other=127))
            acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
        elif F32_DOT:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee") * sb[None, :]
        else:
            acc += tl.dot(a, b.to(a.dtype)) * sb[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])


def mxfp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    block_m: int = 16,
    block_n: int = 32,
) -> torch.Tensor:
    """``a [M, K] @ dequant(w [N, K], w_scale [N, K/32]).T (+ bias [N])`` -> float32 ``[M, N]``.

    ``a`` is float8_e4m3fn with ``a_scale [M, K/32]`` (W8A8) or bf16/fp16/fp32 with ``a_scale=None``
    (W8A16; see :func:`f32_dot` for when the dot runs in float32). Scales are float8_e8m0fnu (or their
    uint8 bytes); ``w`` float8_e4m3fn. K must be a multiple of 32.
    """
    M, K = a.shape
    N = w.shape[0]
    assert w.shape[1] == K and K % 32 == 0, (a.shape, w.shape)
    a = a.contiguous()
    c = torch.empty((M, N), dtype=torch.float32, device=a.device)
    if M == 0:
        return c
    a_mx = a_scale is not None
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _mxfp8_gemm_kernel[grid](
        a,
        a_scale.contiguous().view(torch.uint8) if a_mx else a,
        w.contiguous(),
        w_scale.contiguous().view(torch.uint8),
        bias if bias is not None else c,
        c,
        M,
        N,
        K,
        A_MX=a_mx,
        HAS_BIAS=bias is not None,
        F32_DOT=f32_dot(a.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    return c
