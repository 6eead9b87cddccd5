"""One-pass Triton MXFP8 quantizer (both scale modes), byte for byte the torch reference
:func:`oq_plugin_mxfp8.quant.quantize_mxfp8` (itself bit-exact with torchao ``to_mx``).

Every rounding step is done with exact float32 / integer arithmetic so no backend-specific
conversion decides a bit: the e8m0 exponent with integer ops on the float32 bits of ``amax / 448``
(correctly rounded division), the element scaling by an exact power of two, and the float8_e4m3fn
encoding by rounding to the fp8 grid in float32 (exact) and assembling the byte with integer ops.
The last point also sidesteps Triton 3.9's interpreter, whose float -> fp8 cast mis-rounds when
rounding carries into the next exponent (125.2 -> 64 instead of 128).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from oq_plugin_mxfp8.quant import MX_BLOCK


@triton.jit
def _rceil_exponent(descale):
    """Biased e8m0 byte (int32) of ``clamp(ceil(fl32(log2(descale))), -127, 127) + 127`` (torchao RCEIL),
    the float32 rounding of log2 reproduced as in :func:`oq_plugin_mxfp8.quant.rceil_exponent`."""
    bits = descale.to(tl.int32, bitcast=True)
    biased = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    k = biased - 127
    n = tl.where(k > 0, k, -k - 1)
    limit = tl.where(
        n >= 64, 22, tl.where(n >= 32, 11, tl.where(n >= 16, 5, tl.where(n >= 8, 2, tl.where(n >= 4, 1, 0))))
    )
    normal_e = tl.where(mant == 0, k, k + 1 - (mant <= limit).to(tl.int32))
    sub_i = mant - (1 << 22)
    sub_e = tl.where(sub_i > 0, -126 - (2 * sub_i <= 22).to(tl.int32), -127)
    e = tl.where(biased == 0, sub_e, normal_e)
    e = tl.minimum(tl.maximum(e, -127), 127) + 127
    e = tl.where(biased == 255, tl.where(mant == 0, 254, 255), e)  # Inf -> 254, NaN -> 255
    return e


@triton.jit
def _floor_exponent(amax):
    """Biased e8m0 byte (int32): ``clamp(floor(log2(amax)) - 8, -127, 128) + 127``, NaN -> 255 (OCP rule)."""
    bits = amax.to(tl.int32, bitcast=True)
    pow2 = ((bits >> 23) & 0xFF) - 127
    e = tl.minimum(tl.maximum(pow2 - 8, -127), 128) + 127
    return tl.where(amax != amax, 255, e)


@triton.jit
def _pow2(e):
    """``2**e`` as float32 for integer ``e`` in [-126, 127] (built from bits: exact)."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def encode_e4m3(y):
    """float8_e4m3fn byte (int32 0..255) of float32 ``y`` already clamped to +-448, rounding to
    nearest even. ``y`` is put on the fp8 grid in float32 (spacing ``2**(E-3)``, E >= -6 so the
    subnormal range shares the spacing 2**-9) with the 1.5 * 2**23 trick, then the byte is
    ``((E + 7) << 3) + r - 8``: a carry (r = 16) lands in the exponent field by itself."""
    ybits = y.to(tl.int32, bitcast=True)
    sign = (ybits >> 31) & 1
    a = tl.abs(y)
    is_nan = a != a
    a = tl.where(is_nan, 0.0, a)  # keep NaN out of the float -> int conversion below
    E = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    E = tl.maximum(E, -6)
    t = a * _pow2(3 - E)  # exact: in [0, 16)
    r = ((t + 12582912.0) - 12582912.0).to(tl.int32)
    byte = ((E + 7) << 3) + r - 8
    byte = tl.where(is_nan, 127, byte)
    return byte | (sign << 7)


@triton.jit
def _mxfp8_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    R,
    NBLK,
    FLOOR: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """x ``[R, NBLK*32]`` (any float dtype) -> q ``[R, NBLK*32]`` fp8 bytes, s ``[R, NBLK]`` e8m0 bytes.
    Program (i, j) handles rows ``i*BLOCK_R..`` and 32-blocks ``j*BLOCK_B..``."""
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    blks = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    inner = tl.arange(0, 32)
    K = NBLK * 32
    offs = rows[:, None, None].to(tl.int64) * K + blks[None, :, None] * 32 + inner[None, None, :]
    mask = (rows[:, None, None] < R) & (blks[None, :, None] < NBLK)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=2)
    has_nan = tl.max((x != x).to(tl.int32), axis=2)
    amax = tl.where(has_nan > 0, float("nan"), amax)
    if FLOOR:
        e = _floor_exponent(amax)
        # x / max(2**(e-127), 2**-126) == x * 2**(127 - max(e, 1)) exactly; NaN blocks (e = 255)
        # divide by +inf in torchao, i.e. multiply by 0.
        rcp = tl.where(e == 255, 0.0, _pow2(127 - tl.maximum(e, 1)))
    else:
        descale = tl.math.div_rn(amax, 448.0)
        e = _rceil_exponent(descale)
        rcp = tl.where(e == 0, 1.0, _pow2(127 - tl.minimum(tl.maximum(e, 1), 253)))
        rcp = tl.where(e == 254, 2.0**-127, rcp)
        rcp = tl.where(e == 255, float("nan"), rcp)
    y = x * rcp[:, :, None]
    y = tl.where(y != y, y, tl.minimum(tl.maximum(y, -448.0), 448.0))
    tl.store(q_ptr + offs, encode_e4m3(y).to(tl.uint8), mask=mask)
    s_offs = rows[:, None].to(tl.int64) * NBLK + blks[None, :]
    s_mask = (rows[:, None] < R) & (blks[None, :] < NBLK)
    tl.store(s_ptr + s_offs, e.to(tl.uint8), mask=s_mask)


def quantize_mxfp8_triton(w: torch.Tensor, options=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`oq_plugin_mxfp8.quant.quantize_mxfp8`: same signature, shapes and bytes.

    ``w`` ``[..., K]`` (float32/bf16/fp16, K a multiple of 32) -> ``(qdata float8_e4m3fn [..., K],
    scale float8_e8m0fnu [..., K/32])``. One read of ``w``, one write of each output.
    """
    if w.shape[-1] % MX_BLOCK:
        raise ValueError(f"mxfp8 needs the last dim divisible by {MX_BLOCK}, got shape {tuple(w.shape)}")
    shape = w.shape
    x = w.contiguous().reshape(-1, shape[-1])
    R, K = x.shape
    nblk = K // MX_BLOCK
    q = torch.empty((R, K), dtype=torch.uint8, device=w.device)
    s = torch.empty((R, nblk), dtype=torch.uint8, device=w.device)
    floor = getattr(options, "scale_mode", "rceil") == "floor"
    BLOCK_R, BLOCK_B = 16, 4
    if R and nblk:
        grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(nblk, BLOCK_B))
        _mxfp8_quant_kernel[grid](x, q, s, R, nblk, FLOOR=floor, BLOCK_R=BLOCK_R, BLOCK_B=BLOCK_B)
    return q.view(torch.float8_e4m3fn).reshape(shape), s.view(torch.float8_e8m0fnu).reshape(*shape[:-1], nblk)
