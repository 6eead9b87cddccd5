"""Triton MXFP4 GEMM: ``y = x @ W.T (+ b)`` with ``W`` MXFP4 (packed e2m1 codes, two per byte, and
one e8m0 exponent per 1x32 block along K) and ``x`` in the model dtype (W4A16), MXFP8
(float8_e4m3fn with e8m0 scales per 32, W4A8: quantized first by
:func:`oq_plugin_mxfp8.kernels.quant.quantize_mxfp8_triton`) or MXFP4 itself (W4A4: quantized
first by :func:`oq_plugin_mxfp4.kernels.quant.quantize_mxfp4_triton`).

The weight is never dequantized in memory: each program loads the packed bytes of its
``[32, BLOCK_N]`` weight tile (16 bytes per column and MX block), decodes the nibbles in registers
(:func:`e2m1_to_f32` / :func:`e2m1_to_e4m3`, integer arithmetic, no table) and runs one ``tl.dot``
per MX block, so each partial product carries exactly one weight scale per output column (and one
activation scale per row for W4A8): ``acc += dot(a, b) * sa[:, None] * sb[None, :]``, as
:mod:`oq_plugin_mxfp8.kernels.gemm`. The e2m1 values are exact in bf16, fp16 and float8_e4m3fn,
so the dots see the reference's numbers; only the float32 accumulation order differs from the
reference (dequantize to float32, ``F.linear``).

Byte order: element ``2j`` of a row is the LOW nibble of byte ``j`` (:mod:`oq_plugin_mxfp4.fp4`).
Each of the 32 K rows of the tile loads byte ``k // 2`` and shifts by ``4 * (k % 2)``: the two rows
of a byte read the same address, which the GPU serves with one transaction per warp (and the
interpreter does not care), instead of an interleave (``tl.join`` + reshape) of two half tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from oq_plugin_mxfp8.kernels.gemm import e8m0_to_f32, f32_dot

MX_BLOCK = 32
"""Elements per e8m0 scale along K (OCP MX v1.0)."""


@triton.jit
def e2m1_to_f32(code):
    """float32 value of e2m1 codes (int32 0..15: ``sign << 3 | magnitude``), exactly
    :data:`oq_plugin_mxfp4.fp4.E2M1_VALUES`. Magnitudes 2..7 are the normal numbers
    ``2**((m >> 1) - 1) * (1 + (m & 1) / 2)``, whose float32 bits are ``(m + 252) << 22``
    (exponent field ``(m >> 1) + 126``, top mantissa bit ``m & 1``); 1 is the subnormal 0.5; 0 is 0.
    The sign bit moves to bit 31 (code 8 is -0.0, as the reference table)."""
    m = code & 7
    mag = tl.where(m >= 2, (m + 252) << 22, tl.where(m == 1, 0x3F000000, 0))
    return (mag | ((code & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def e2m1_to_e4m3(code):
    """float8_e4m3fn byte (int32 0..255) holding the same value as e2m1 ``code`` (int32 0..15).
    Every e2m1 value is an e4m3 normal (or zero): magnitudes 2..7 are ``(m + 12) << 2`` (exponent
    field ``(m >> 1) + 6``, top mantissa bit ``m & 1``), 1 (0.5) is 0x30, 0 is 0; sign to bit 7."""
    m = code & 7
    mag = tl.where(m >= 2, (m + 12) << 2, tl.where(m == 1, 0x30, 0))
    return mag | ((code & 8) << 4)


@triton.jit
def load_e2m1_tile(w_row_ptr, k0, rk, mask_n):
    """e2m1 codes (int32 ``[len(rk), BLOCK_N]``) of elements ``k0 + rk`` (k0 even) of the packed
    rows at ``w_row_ptr [1, BLOCK_N]`` (row start pointers): byte ``(k0 + rk) // 2``, low nibble for
    even elements. Masked-out columns give code 0 (+0.0)."""
    byte = tl.load(w_row_ptr + (k0 // 2 + rk[:, None] // 2), mask=mask_n, other=0).to(tl.int32)
    return (byte >> ((rk[:, None] & 1) * 4)) & 0xF


@triton.jit
def block_product(a_ptr, as_ptr, arow, mask_a, K, kb, rk, code, A_FMT: tl.constexpr, F32_DOT: tl.constexpr):
    """float32 ``[BLOCK_M, BLOCK_N]`` partial product of MX block ``kb`` (elements ``32 kb ..``) of the
    activation rows ``arow`` (int64, masked by ``mask_a``) and the weight codes ``code [32, BLOCK_N]``,
    times the activation scale, before the weight scale: A_FMT 0 (model dtype, ``a [., K]``): the
    dot in ``a``'s dtype, or float32 IEEE if F32_DOT; 1 (MXFP8, ``a [., K]`` fp8, e8m0 bytes ``as
    [., K/32]``): an fp8 x fp8 dot (e2m1 re-encoded as e4m3, exact); 2 (MXFP4, packed ``a [., K/2]``,
    ``as``): both operands decoded to bf16 (float32 if F32_DOT), products exact."""
    nblk = K // 32
    k0 = kb * 32
    if A_FMT == 0:
        a = tl.load(a_ptr + arow[:, None] * K + k0 + rk[None, :], mask=mask_a[:, None], other=0.0)
        if F32_DOT:
            return tl.dot(a.to(tl.float32), e2m1_to_f32(code), input_precision="ieee")
        else:
            return tl.dot(a, e2m1_to_f32(code).to(a.dtype))
    else:
        sa = e8m0_to_f32(tl.load(as_ptr + arow * nblk + kb, mask=mask_a, other=127))
        if A_FMT == 1:
            a = tl.load(a_ptr + arow[:, None] * K + k0 + rk[None, :], mask=mask_a[:, None], other=0.0)
            b = e2m1_to_e4m3(code).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
            return tl.dot(a, b) * sa[:, None]
        else:
            abyte = tl.load(
                a_ptr + arow[:, None] * (K // 2) + k0 // 2 + rk[None, :] // 2, mask=mask_a[:, None], other=0
            )
            av = e2m1_to_f32((abyte.to(tl.int32) >> ((rk[None, :] & 1) * 4)) & 0xF)
            if F32_DOT:
                return tl.dot(av, e2m1_to_f32(code), input_precision="ieee") * sa[:, None]
            else:
                return tl.dot(av.to(tl.bfloat16), e2m1_to_f32(code).to(tl.bfloat16)) * sa[:, None]


@triton.jit
def _mxfp4_gemm_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    A_FMT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """a ``[M, K]`` (A_FMT 0: bf16/fp16/fp32; 1: fp8 with e8m0 bytes ``as [M, K/32]``; 2: packed
    e2m1 ``[M, K/2]`` with e8m0 bytes ``as``), b ``[N, K/2]`` packed e2m1 with e8m0 bytes
    ``bs [N, K/32]``, c ``[M, N]`` float32. Program (i, j) computes one BLOCK_M x BLOCK_N tile."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, 32)
    mask_m = rm < M
    mask_n = rn < N
    nblk = K // 32
    b_rows = b_ptr + rn[None, :].to(tl.int64) * (K // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(nblk):
        k0 = kb * 32
        code = load_e2m1_tile(b_rows, k0, rk, mask_n[None, :])
        sb = e8m0_to_f32(tl.load(bs_ptr + rn.to(tl.int64) * nblk + kb, mask=mask_n, other=127))
        acc += block_product(a_ptr, as_ptr, rm.to(tl.int64), mask_m, K, kb, rk, code, A_FMT, F32_DOT) * sb[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])


A_MODEL, A_MXFP8, A_MXFP4 = 0, 1, 2
"""The kernels' ``A_FMT`` values: activations in the model dtype, MXFP8 (float8_e4m3fn + e8m0
scales), MXFP4 (packed e2m1 + e8m0 scales)."""


def a_format(a: torch.Tensor, a_scale: torch.Tensor | None) -> int:
    """:data:`A_MODEL` without scales; with scales :data:`A_MXFP4` for packed e2m1 bytes (uint8 /
    float4_e2m1fn_x2), else :data:`A_MXFP8`."""
    if a_scale is None:
        return A_MODEL
    return A_MXFP4 if a.dtype in (torch.uint8, torch.float4_e2m1fn_x2) else A_MXFP8


def block_dot_f32(fmt: int, a: torch.Tensor) -> bool:
    """F32_DOT for :func:`block_product`: model-dtype activations as
    :func:`oq_plugin_mxfp8.kernels.gemm.f32_dot`; MXFP4 ones (decoded to bf16 on a GPU) only under
    the interpreter, whose bf16 ``tl.dot`` is broken (the products are exact either way)."""
    if fmt == A_MXFP4:
        from oq_toolkit.triton_support import interpreter_enabled

        return interpreter_enabled()
    return f32_dot(a.dtype)


def check_operands(a, a_scale, w, w_scale, bias, block: int, scale_what: str) -> tuple[int, int, int]:
    """``(M, N, K)`` of a block-scaled 4-bit GEMM's operands, or ``ValueError`` naming the operand
    whose shape or dtype is wrong (``a [M, K]``, or packed e2m1 ``[M, K/2]`` when it has scales and
    is uint8, see :func:`a_format`; ``w [N, K/2]`` bytes, ``w_scale [N, K/block]``, ``a_scale
    [M, K/32]`` or None, ``bias [N]`` or None). Shared with oq-plugin-nvfp4."""
    if a.dim() != 2 or w.dim() != 2:
        raise ValueError(f"expected a [M, K] and packed w [N, K/2], got a {tuple(a.shape)} and w {tuple(w.shape)}")
    M, K = a.shape
    if a_format(a, a_scale) == A_MXFP4:
        K *= 2
    N = w.shape[0]
    if K % block:
        raise ValueError(f"K = {K} must be a multiple of {block} (one {scale_what} scale per {block} elements along K)")
    if w.element_size() != 1 or w.shape[1] * 2 != K:
        raise ValueError(f"w must be packed e2m1 bytes [N, K/2] = [{N}, {K // 2}], got {w.dtype} {tuple(w.shape)}")
    if w_scale.element_size() != 1 or tuple(w_scale.shape) != (N, K // block):
        raise ValueError(
            f"w_scale must be one byte per {block} elements, [{N}, {K // block}], got {w_scale.dtype} {tuple(w_scale.shape)}"
        )
    if a_scale is not None and (a_scale.element_size() != 1 or tuple(a_scale.shape) != (M, K // 32)):
        raise ValueError(
            f"a_scale must be e8m0 bytes [M, K/32] = [{M}, {K // 32}], got {a_scale.dtype} {tuple(a_scale.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be [N] = [{N}], got {tuple(bias.shape)}")
    return M, N, K


def mxfp4_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor | None,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    block_m: int = 16,
    block_n: int = 32,
) -> torch.Tensor:
    """``a [M, K] @ dequant(w [N, K/2], w_scale [N, K/32]).T (+ bias [N])`` -> float32 ``[M, N]``.

    ``dequant(w)[n, k] = e2m1(code(w, n, k)) * 2**(w_scale[n, k // 32] - 127)`` (byte 0 as
    ``2**-126`` and 255 as NaN, :func:`oq_plugin_mxfp8.quant.exponent_to_scale`'s rule);
    ``code(w, n, k)`` is the low nibble of ``w[n, k // 2]`` for even k, the high one for odd k.

    - W4A16: ``a`` bf16/fp16/fp32 and ``a_s=None`` (the dot runs in ``a``'s dtype with float32
      accumulation; in float32 IEEE for float32 ``a``, see :func:`oq_plugin_mxfp8.kernels.gemm.f32_dot`).
    - W4A8: ``a`` float8_e4m3fn with e8m0 scales ``a_s [M, K/32]`` (float8_e8m0fnu or uint8 bytes),
      as :func:`oq_plugin_mxfp8.kernels.quant.quantize_mxfp8_triton` returns them; fp8 x fp8 dots
      (e2m1 values are exact in e4m3), both scales applied to each block's float32 partial product.
    - W4A4: ``a`` packed e2m1 bytes ``[M, K/2]`` (uint8) with e8m0 scales ``a_s [M, K/32]``, as
      :func:`oq_plugin_mxfp4.kernels.quant.quantize_mxfp4_triton` returns them; both operands
      decoded to bf16 (exact) for the dot, both scales on each block's float32 partial product.

    ``w`` uint8 (or any 1-byte dtype), ``w_scale`` float8_e8m0fnu or uint8; ``bias`` any float
    dtype, added in float32. K must be a multiple of 32 (``ValueError`` otherwise, and for any
    operand whose shape does not match). Runs on CUDA, or on the CPU under ``TRITON_INTERPRET=1``.
    """
    M, N, K = check_operands(a, a_s, w, w_scale, bias, MX_BLOCK, "e8m0")
    a = a.contiguous()
    c = torch.empty((M, N), dtype=torch.float32, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_() if bias is None else c.copy_(bias.float().expand(M, N))
    fmt = a_format(a, a_s)
    if fmt == A_MXFP4:
        a = a.view(torch.uint8)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _mxfp4_gemm_kernel[grid](
        a,
        a_s.contiguous().view(torch.uint8) if a_s is not None else a,
        w.contiguous().view(torch.uint8),
        w_scale.contiguous().view(torch.uint8),
        bias.contiguous() if bias is not None else c,
        c,
        M,
        N,
        K,
        A_FMT=fmt,
        HAS_BIAS=bias is not None,
        F32_DOT=block_dot_f32(fmt, a),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    return c
