"""Triton NVFP4 GEMM: ``y = x @ W.T (+ b)``, ``x`` in the model dtype (W4A16) or NVFP4 too (W4A4),
``W`` NVFP4 in compressed-tensors' convention: packed e2m1 codes (two per byte), one float8_e4m3fn scale per 1x16
block along K and a float32 global scale ``g`` that is a QUANTIZATION multiplier
(``g = 448 * 6 / amax``), so ``W ~= e2m1(q) * (scale.float() / g)``.

Each program loads the packed bytes of its ``[BLOCK_K, BLOCK_N]`` weight tile, decodes the nibbles
(:func:`oq_plugin_mxfp4.kernels.gemm.e2m1_to_f32`) and the e4m3 block scales (:func:`e4m3_to_f32`,
integer arithmetic) in registers and multiplies them into the tile before the dot: an e2m1 value
times an e4m3 value has at most 6 significant bits and lies in ``[2**-10, 2688]``, so the product
is exact in bf16 and fp16 as well as float32, and the dot sees exactly ``e2m1 * scale``. The
division by the global scale is applied once to the float32 accumulator. So only the float32
rounding order differs from the reference (``scale.float() / g`` rounded first, per element).
``BLOCK_K`` is 32 (two NVFP4 blocks per step, the smallest K of a bf16 tensor-core dot is 16);
``K % 32 == 16`` is handled by masking the last step's upper half. W4A4 decodes the activation
tile the same way (``e2m1 * e4m3``, exact in bf16) and divides by its global scale as well.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from oq_plugin_mxfp4.kernels.gemm import check_operands, e2m1_to_f32, load_e2m1_tile
from oq_plugin_mxfp8.kernels.gemm import f32_dot

NV_BLOCK = 16
"""Elements per float8_e4m3fn block scale along K."""


@triton.jit
def e4m3_to_f32(byte):
    """float32 value of float8_e4m3fn bytes (int32 0..255), as ``torch.float8_e4m3fn -> float32``:
    exponent field E and mantissa m give ``(1 + m/8) * 2**(E - 7)`` (float32 bits
    ``(E + 120) << 23 | m << 20``), ``m * 2**-9`` for E = 0, NaN for ``0x7F`` / ``0xFF``."""
    e = (byte >> 3) & 15
    m = byte & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)
    mag = tl.where((byte & 0x7F) == 0x7F, float("nan"), mag)
    return tl.where((byte & 0x80) != 0, -mag, mag)


@triton.jit
def load_nvfp4_tile(b_rows, bs_rows, k0, K, rk, mask_n):
    """float32 ``e2m1(q) * scale`` (exact) of elements ``k0 + rk`` of the packed rows at
    ``b_rows [1, BLOCK_N]`` with e4m3 bytes at ``bs_rows [1, BLOCK_N]``; 0 beyond K or N."""
    mask = mask_n & (k0 + rk[:, None] < K)
    code = load_e2m1_tile(b_rows, k0, rk, mask)
    sc = tl.load(bs_rows + (k0 + rk[:, None]) // 16, mask=mask, other=0).to(tl.int32)
    return e2m1_to_f32(code) * e4m3_to_f32(sc)


@triton.jit
def tile_dot(a_ptr, as_ptr, arow, mask_rows, k0, K, rk, b, A_FP4: tl.constexpr, F32_DOT: tl.constexpr):
    """float32 ``[BLOCK_M, BLOCK_N]`` product of the activation tile (rows ``arow [BLOCK_M, 1]``
    int64 masked by ``mask_rows``, elements ``k0 + rk``) with the decoded weight tile ``b``. A_FP4:
    ``a`` packed e2m1 ``[., K/2]`` with e4m3 bytes ``as [., K/16]``, decoded to ``e2m1 * scale``
    (exact in bf16, so are the products in float32) for a bf16 dot (float32 if F32_DOT); else ``a``
    ``[., K]`` in the model dtype, the dot in its dtype (float32 IEEE if F32_DOT)."""
    mask_a = mask_rows & (k0 + rk[None, :] < K)
    if A_FP4:
        abyte = tl.load(a_ptr + arow * (K // 2) + k0 // 2 + rk[None, :] // 2, mask=mask_a, other=0).to(tl.int32)
        asc = tl.load(as_ptr + arow * (K // 16) + (k0 + rk[None, :]) // 16, mask=mask_a, other=0).to(tl.int32)
        a = e2m1_to_f32((abyte >> ((rk[None, :] & 1) * 4)) & 0xF) * e4m3_to_f32(asc)
        if F32_DOT:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    else:
        a = tl.load(a_ptr + arow * K + k0 + rk[None, :], mask=mask_a, other=0.0)
        if F32_DOT:
            return tl.dot(a.to(tl.float32), b, input_precision="ieee")
        else:
            return tl.dot(a, b.to(a.dtype))


@triton.jit
def _nvfp4_gemm_kernel(
    a_ptr,
    as_ptr,
    ag_ptr,
    b_ptr,
    bs_ptr,
    g_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K,
    A_FP4: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """a ``[M, K]`` bf16/fp16/fp32, or if A_FP4 packed e2m1 ``[M, K/2]`` with e4m3 bytes ``as [M, K/16]``
    and float32 global ``ag [1]``; b ``[N, K/2]`` packed e2m1, bs ``[N, K/16]`` e4m3 bytes, g ``[1]``
    float32, c ``[M, N]`` float32. Program (i, j) computes one BLOCK_M x BLOCK_N tile."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    b_rows = b_ptr + rn[None, :].to(tl.int64) * (K // 2)
    bs_rows = bs_ptr + rn[None, :].to(tl.int64) * (K // 16)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        b = load_nvfp4_tile(b_rows, bs_rows, k0, K, rk, mask_n[None, :])
        acc += tile_dot(a_ptr, as_ptr, rm[:, None].to(tl.int64), mask_m[:, None], k0, K, rk, b, A_FP4, F32_DOT)
    acc = acc / tl.load(g_ptr)
    if A_FP4:
        acc = acc / tl.load(ag_ptr)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])


def nvfp4_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    w_global: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    a_scale: torch.Tensor | None = None,
    a_global: torch.Tensor | None = None,
    block_m: int = 16,
    block_n: int = 32,
) -> torch.Tensor:
    """``a [M, K] @ dequant(w [N, K/2], w_scale [N, K/16], w_global).T (+ bias [N])`` -> float32 ``[M, N]``.

    ``dequant(w)[n, k] = e2m1(code(w, n, k)) * w_scale[n, k // 16].float() / w_global`` (code: low
    nibble of ``w[n, k // 2]`` for even k, high for odd k; compressed-tensors' NVFP4 bytes).
    ``w`` uint8 (or any 1-byte dtype), ``w_scale`` float8_e4m3fn (or its uint8 bytes), ``w_global``
    float32 with one element (``[1]``); ``bias`` any float dtype, added in float32 after the global
    scales.

    - W4A16 (``a_scale=None``): ``a`` bf16/fp16/fp32; the dot runs in ``a``'s dtype with float32
      accumulation (float32 IEEE for float32 ``a``).
    - W4A4: ``a`` packed e2m1 bytes ``[M, K/2]`` with ``a_scale`` float8_e4m3fn ``[M, K/16]`` and
      ``a_global`` float32 ``[1]``, as :func:`oq_plugin_nvfp4.kernels.quant.quantize_nvfp4_triton`
      returns them for the whole ``[M, K]`` input (the reference quantizes a linear's input the same
      way, one global scale per call); both tiles ``e2m1 * e4m3`` (exact in bf16) into a bf16 dot,
      the accumulator divided by both global scales.

    K must be a multiple of 16 (``ValueError`` otherwise, and for any operand whose shape does not
    match). Runs on CUDA, or on the CPU under ``TRITON_INTERPRET=1``.
    """
    fp4_a = a_scale is not None
    if fp4_a:
        if a.dim() != 2 or a.element_size() != 1:
            raise ValueError(f"W4A4: a must be packed e2m1 bytes [M, K/2], got {a.dtype} {tuple(a.shape)}")
        M, K = a.shape[0], a.shape[1] * 2
        if a_scale.element_size() != 1 or tuple(a_scale.shape) != (M, K // NV_BLOCK):
            raise ValueError(
                f"a_scale must be float8_e4m3fn [M, K/16] = [{M}, {K // NV_BLOCK}], got {a_scale.dtype} {tuple(a_scale.shape)}"
            )
        if a_global is None or a_global.numel() != 1:
            raise ValueError(
                f"W4A4: a_global must hold the activations' one float32 global scale ([1]), got "
                f"{None if a_global is None else tuple(a_global.shape)}"
            )
        check_operands(torch.empty((M, K), device="meta"), None, w, w_scale, bias, NV_BLOCK, "float8_e4m3fn")
    else:
        M, K = check_operands(a, None, w, w_scale, bias, NV_BLOCK, "float8_e4m3fn")[::2]
    N = w.shape[0]
    if w_global.numel() != 1:
        raise ValueError(f"w_global must hold one float32 global scale ([1]), got shape {tuple(w_global.shape)}")
    a = a.contiguous()
    c = torch.empty((M, N), dtype=torch.float32, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_() if bias is None else c.copy_(bias.float().expand(M, N))
    if fp4_a:
        from oq_toolkit.triton_support import interpreter_enabled

        a = a.view(torch.uint8)
        # bf16 dots on the decoded tiles, except under the interpreter (its bf16 tl.dot is broken)
        f32 = interpreter_enabled()
    else:
        f32 = f32_dot(a.dtype)
    g = w_global.reshape(1).to(torch.float32).contiguous()
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _nvfp4_gemm_kernel[grid](
        a,
        a_scale.contiguous().view(torch.uint8) if fp4_a else a,
        a_global.reshape(1).to(torch.float32).contiguous() if fp4_a else g,
        w.contiguous().view(torch.uint8),
        w_scale.contiguous().view(torch.uint8),
        g,
        bias.contiguous() if bias is not None else c,
        c,
        M,
        N,
        K,
        A_FP4=fp4_a,
        HAS_BIAS=bias is not None,
        F32_DOT=f32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=32,
    )
    return c
