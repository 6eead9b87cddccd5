"""One-pass Triton MXFP4 quantizer (both scale modes), byte for byte the torch reference
:func:`oq_plugin_mxfp4.quant.quantize_mxfp4` (itself bit-exact with torchao ``to_mx`` for fp4).

Every rounding step is exact float32 / integer arithmetic, so no backend-specific conversion
decides a bit: the e8m0 exponent from the float32 bits (rceil: oq-plugin-mxfp8's
``_rceil_exponent`` of the correctly rounded ``amax / 6``, reproducing torchao's float32 ``log2``;
floor: the exponent field minus 2), the element scaling by an exact power of two, and the e2m1
code by comparisons with the rounding thresholds (:func:`encode_e2m1`, the thresholds of
:func:`oq_plugin_mxfp4.fp4.e2m1_encode`). The even and odd elements of each 32-block are loaded
as two ``[.., 16]`` halves, so a byte is ``code(even) | code(odd) << 4`` with no interleave.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from oq_plugin_mxfp8.kernels.quant import _pow2, _rceil_exponent

from oq_plugin_mxfp4.quant import MX_BLOCK, check_k, scale_mode


@triton.jit
def encode_e2m1(y):
    """e2m1 codes (int32 0..15) of float32 ``y`` already clamped to +-6 (NaN allowed): round to
    nearest, ties to the even code, sign bit of ``y`` to bit 3 (so -0.0 gives 8), exactly
    :func:`oq_plugin_mxfp4.fp4.e2m1_encode`; a NaN gets torchao's payload-dependent magnitude code
    (:func:`oq_plugin_mxfp4.quant._torchao_nan_codes`), as the reference quantizer."""
    bits = y.to(tl.int32, bitcast=True)
    a = tl.abs(y)
    code = (
        (a > 0.25).to(tl.int32)
        + (a >= 0.75).to(tl.int32)
        + (a > 1.25).to(tl.int32)
        + (a >= 1.75).to(tl.int32)
        + (a > 2.5).to(tl.int32)
        + (a >= 3.5).to(tl.int32)
        + (a > 5.0).to(tl.int32)
    )
    ab = bits & 0x7FFFFFFF
    nan_code = ((ab + (-126 * 8388608 + 2097151) + ((ab >> 22) & 1)) >> 22) & 0xFF
    code = tl.where(y != y, nan_code, code)
    return code | (((bits >> 31) & 1) << 3)


@triton.jit
def _mxfp4_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    R,
    NBLK,
    FLOOR: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """x ``[R, NBLK*32]`` (any float dtype) -> q ``[R, NBLK*16]`` packed e2m1 bytes, s ``[R, NBLK]``
    e8m0 bytes. Program (i, j) handles rows ``i*BLOCK_R..`` and 32-blocks ``j*BLOCK_B..``."""
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    blks = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    pair = tl.arange(0, 16)
    K = NBLK * 32
    mask = (rows[:, None, None] < R) & (blks[None, :, None] < NBLK)
    offs = rows[:, None, None].to(tl.int64) * K + blks[None, :, None] * 32 + 2 * pair[None, None, :]
    x0 = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_ptr + offs + 1, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x0), axis=2), tl.max(tl.abs(x1), axis=2))
    has_nan = tl.maximum(tl.max((x0 != x0).to(tl.int32), axis=2), tl.max((x1 != x1).to(tl.int32), axis=2))
    amax = tl.where(has_nan > 0, float("nan"), amax)
    if FLOOR:
        # clamp(floor(log2(amax)) - 2, -127, 128) + 127 from the exponent field, NaN -> 255
        pow2 = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        e = tl.minimum(tl.maximum(pow2 - 2, -127), 128) + 127
        e = tl.where(amax != amax, 255, e)
        # x / max(2**(e-127), 2**-126) == x * 2**(127 - max(e, 1)) exactly; NaN blocks (e = 255)
        # divide by +inf in torchao, i.e. multiply by 0.
        rcp = tl.where(e == 255, 0.0, _pow2(127 - tl.maximum(e, 1)))
    else:
        e = _rceil_exponent(tl.math.div_rn(amax, 6.0))
        rcp = tl.where(e == 0, 1.0, _pow2(127 - tl.minimum(tl.maximum(e, 1), 253)))
        rcp = tl.where(e == 254, 2.0**-127, rcp)
        rcp = tl.where(e == 255, float("nan"), rcp)
    y0 = x0 * rcp[:, :, None]
    y1 = x1 * rcp[:, :, None]
    # NaN payloads are not left to the hardware (a GPU returns its canonical NaN, the CPU reference
    # propagates an operand's payload): the reference's are written out. rceil NaN blocks hold
    # ``x * nan`` = torch's NaN (0x7FC00000, what the CPU's multiply returns); floor keeps a NaN
    # element's own payload, quieted (``x / inf``).
    if FLOOR:
        y0 = tl.where(x0 != x0, (x0.to(tl.int32, bitcast=True) | 0x400000).to(tl.float32, bitcast=True), y0)
        y1 = tl.where(x1 != x1, (x1.to(tl.int32, bitcast=True) | 0x400000).to(tl.float32, bitcast=True), y1)
    else:
        nan_block = (e == 255)[:, :, None]
        y0 = tl.where(nan_block, tl.full(y0.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True), y0)
        y1 = tl.where(nan_block, tl.full(y1.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True), y1)
    # clamp to +-6, NaN kept (torch.clamp propagates it; tl.minimum / maximum need not)
    y0 = tl.where(y0 != y0, y0, tl.minimum(tl.maximum(y0, -6.0), 6.0))
    y1 = tl.where(y1 != y1, y1, tl.minimum(tl.maximum(y1, -6.0), 6.0))
    byte = encode_e2m1(y0) | (encode_e2m1(y1) << 4)
    q_offs = rows[:, None, None].to(tl.int64) * (K // 2) + blks[None, :, None] * 16 + pair[None, None, :]
    tl.store(q_ptr + q_offs, byte.to(tl.uint8), mask=mask)
    s_offs = rows[:, None].to(tl.int64) * NBLK + blks[None, :]
    tl.store(s_ptr + s_offs, e.to(tl.uint8), mask=(rows[:, None] < R) & (blks[None, :] < NBLK))


def quantize_mxfp4_triton(w: torch.Tensor, options=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`oq_plugin_mxfp4.quant.quantize_mxfp4`: same signature, shapes and bytes.

    ``w`` ``[..., K]`` (float32/bf16/fp16, K a multiple of 32, else ``ValueError`` stating the rule)
    -> ``(qdata uint8 [..., K/2], scale float8_e8m0fnu [..., K/32])``; ``options.scale_mode``
    ``"rceil"`` (default) or ``"floor"``. One read of ``w``, one write of each output. Runs on CUDA,
    or on the CPU under ``TRITON_INTERPRET=1``.
    """
    check_k(w)
    shape = w.shape
    x = w.contiguous().reshape(-1, shape[-1])
    R, K = x.shape
    nblk = K // MX_BLOCK
    q = torch.empty((R, K // 2), dtype=torch.uint8, device=w.device)
    s = torch.empty((R, nblk), dtype=torch.uint8, device=w.device)
    BLOCK_R, BLOCK_B = 16, 4
    if R and nblk:
        grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(nblk, BLOCK_B))
        _mxfp4_quant_kernel[grid](
            x, q, s, R, nblk, FLOOR=scale_mode(options) == "floor", BLOCK_R=BLOCK_R, BLOCK_B=BLOCK_B
        )
    return q.reshape(*shape[:-1], K // 2), s.view(torch.float8_e8m0fnu).reshape(*shape[:-1], nblk)
