"""Torch reference MXFP4 quantizer: the definition of the numbers every other backend must match.

Format (OCP Microscaling Formats (MX) v1.0, sections 5.3.3 and 6.3): the last dim K is cut into
blocks of 32 consecutive elements; each block shares one E8M0 scale (a biased power-of-two
exponent, bias 127, 255 = NaN) and stores its elements as e2m1 (FP4: magnitudes 0, 0.5, 1, 1.5,
2, 3, 4, 6; :mod:`oq_plugin_mxfp4.fp4`), saturating to +-6.

Storage (torchao's ``MXTensor`` for ``torch.float4_e2m1fn_x2``, compressed-tensors' MXFP4): ``qdata``
is ``uint8 [..., K/2]``, two codes per byte, element ``2j`` in the low nibble of byte ``j``
(:func:`oq_plugin_mxfp4.fp4.pack_fp4`); ``scale`` is ``torch.float8_e8m0fnu [..., K/32]`` (its bytes,
``scale.view(torch.uint8)``, are the biased exponents). Scales are dequantization multipliers:
``w ~= e2m1(q) * 2**(scale_byte - 127)``.

Two scale rules (option ``scale_mode``), both bit-exact with torchao 0.18
``torchao.prototype.mx_formats.mx_tensor.to_mx(x, torch.float4_e2m1fn_x2, 32, scaling_mode)`` (its
``qdata`` bytes and ``scale`` bytes; float16 input, which torchao refuses, is widened to float32
exactly first):

- ``"rceil"`` (default; torchao ``RCEIL``, NVIDIA's ``cvt.rp.satfinite.ue8m0``):
  ``e = clamp(ceil(fl32(log2(fl32(amax / 6)))), -127, 127)``, elements ``x * 2**-e`` (exact: a power
  of two), clamped to +-6 and rounded to e2m1 (nearest, ties to even). A block whose exponent
  clamps to -127 (all zero, or amax <= 6 * 2**-127) is multiplied by 1 instead (torchao's rule; its
  elements all round to +-0 either way). Since ``2**e >= amax / 6``, no element saturates, except
  where torchao's float32 ``log2`` rounds to the integer just below (1 to 22 mantissa codes above a
  power of two; a relative change below 3e-6). The exponent is oq-plugin-mxfp8's
  :func:`oq_plugin_mxfp8.quant.rceil_exponent` (integer arithmetic reproducing that rounding).
- ``"floor"`` (torchao ``FLOOR``, the OCP spec's rule): ``e = clamp(floor(log2(amax)) - 2, -127, 128)``
  (2 is e2m1's largest exponent, 6 = 1.5 * 2**2), ``floor(log2)`` read from the float32 exponent
  field; elements ``clamp(x / max(2**e, 2**-126), +-6)``. ``amax / 2**e`` lies in [4, 8): block
  maxima whose mantissa puts it in (6, 8) saturate to 6 (up to 25 % error on that element).

Measured weight SQNR (float32 dequantized vs the input): N(0, 1) 4096 x 4096 (seed 0) rceil 18.75 dB,
floor 18.79 dB; MiniLM-L6's 36 linears, mean per layer, rceil 18.46 dB, floor 18.62 dB (floor better
on 34 of 36). Unlike mxfp8 (3 mantissa bits, where saturating costs more than a coarser step), the
two are close and floor is slightly ahead: when ``amax / 2**e`` falls in (6, 8) floor saturates that
one maximum, while rceil doubles the block's scale and so the rounding step of its other 31
elements. rceil stays the default for the properties it shares with mxfp8: no element ever
saturates (bounded relative error on every block maximum) and it is the hardware rule
(``cvt.rp.satfinite.ue8m0``) that dynamic activation quantization on NVIDIA GPUs uses.

NaN in a block gives the NaN scale byte 255 (both rules), Inf gives 254 (rceil). The elements of a
NaN block: rceil multiplies them by a NaN, so every code is 3 (torchao: the code its encoder gives
the default NaN, whatever the multiplication returns; with the input's NaN payload torchao's own
code would depend on which NaN operand the CPU's multiply keeps, so this one rule is fixed for
every backend); floor divides by +inf, so finite elements give +-0 and NaN elements keep their NaN,
whose code is torchao's (2, 3 or 4 by the payload, :func:`_torchao_nan_codes`, with its sign).
Weights never get here with either (:func:`oqcore.quantize_tensor` rejects them, the C quantizer raises
:class:`oqcore.NonFiniteError`). Every step is a tensor op without data-dependent control flow, so
the quantizer runs on meta tensors (the core's dry run).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from oq_plugin_mxfp4.fp4 import F4_MAX, e2m1_decode, e2m1_encode, pack_fp4, unpack_fp4
from oq_plugin_mxfp8.quant import E8M0_NAN, exponent_to_scale, floor_exponent, rceil_exponent

from oq_plugin_mxfp4.keys import MX_BLOCK  # elements per shared e8m0 scale: the keys' group shape, stated there

F4_EMAX = 2
"""Largest exponent of e2m1 (6 = 1.5 * 2**2): the floor rule's offset."""


class Mxfp4Options(BaseModel):
    """Options of the mxfp4 methods and quantizers (``QuantSpec.options``).

    ``scale_mode``: ``"rceil"`` (default, ``ceil(log2(amax / 6))``: no element saturates) or
    ``"floor"`` (OCP MX v1.0's ``floor(log2(amax)) - 2``: block maxima in (6, 8) * 2**e saturate).
    Used for the weights and for the activations alike (mxfp4, and mxfp8 in W4A8). Measured SQNR of
    both (within 0.2 dB of each other, floor slightly ahead on weights): the module docstring.
    rceil stays the default: it never saturates, it is the rule of NVIDIA's conversion instruction
    (``cvt.rp.satfinite.ue8m0``) and of mxfp8's default, and W4A8's mxfp8 activations, quantized
    with this option, lose 1.1 dB under floor.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale_mode: Literal["rceil", "floor"] = "rceil"


def scale_mode(options: BaseModel | None) -> str:
    """``options.scale_mode``, ``"rceil"`` when ``options`` is ``None`` or has no such field."""
    return getattr(options, "scale_mode", "rceil") if options is not None else "rceil"


def check_k(w: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``w``'s last dim is a multiple of 32 (whole MX blocks, an even
    number of elements to pack)."""
    if w.dim() < 1 or w.shape[-1] % MX_BLOCK:
        raise ValueError(
            f"mxfp4 needs the last dim (K) divisible by {MX_BLOCK} (one e8m0 scale per {MX_BLOCK} elements), "
            f"got shape {tuple(w.shape)}"
        )


def _torchao_nan_codes(y: torch.Tensor) -> torch.Tensor:
    """The e2m1 magnitude code (2, 3 or 4, by the NaN's payload) torchao's ``f32_to_f4_unpacked``
    gives a float32 NaN: its normal-range rounding applied to the NaN's bits,
    ``((|bits| + (1 - 127 << 23) + 2**21 - 1 + odd) >> 22) & 0xFF``. ``e2m1_encode``, whose
    comparisons are false for NaN, gives 0; only non-finite input reaches this."""
    ab = y.contiguous().view(torch.int32) & 0x7FFFFFFF
    return (((ab + ((1 - 127) * (1 << 23) + (1 << 21) - 1) + ((ab >> 22) & 1)) >> 22) & 0xFF).to(torch.uint8)


def quantize_mxfp4(w: torch.Tensor, options: BaseModel | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` (``[N, K]``, ``[E, N, K]`` or activations ``[M, K]``; float32/bf16/fp16) to MXFP4.

    Returns ``(qdata, scale)``: ``qdata`` uint8 ``[..., K/2]`` (packed e2m1 codes, element ``2j`` in the
    low nibble of byte ``j``), ``scale`` float8_e8m0fnu ``[..., K/32]`` (one exponent per 32
    consecutive elements of the last dim; leading dims, e.g. experts, are never reduced over).
    ``options.scale_mode`` picks ``rceil`` (default) or ``floor``; see the module docstring for the
    exact rules (torchao ``to_mx`` bytes). Raises ``ValueError`` if K is not a multiple of 32.
    """
    check_k(w)
    shape = w.shape
    x = w.reshape(*shape[:-1], shape[-1] // MX_BLOCK, MX_BLOCK).to(torch.float32)
    amax = x.abs().amax(-1, keepdim=True)
    if scale_mode(options) == "floor":
        e = floor_exponent(amax, emax=F4_EMAX)
        div = exponent_to_scale(e)
        # torchao builds the divisor as (e << 23) clamped to the smallest normal, so NaN blocks
        # (byte 255) divide by +inf; kept for bit-exactness.
        div = torch.where(e == E8M0_NAN, torch.inf, div)
        y = x / div
    else:
        e = rceil_exponent(amax / F4_MAX)
        # torchao's multiplier 2**(127 - e) as float32 bits: byte 0 -> 1 (all-zero blocks), 254 (Inf)
        # -> 2**-127, 255 (NaN) -> NaN.
        rcp = torch.where(e == 0, 1.0, ((254 - e.to(torch.int32)).clamp(min=1) << 23).view(torch.float32))
        rcp = torch.where(e == 254, 2.0**-127, rcp)
        rcp = torch.where(e == E8M0_NAN, torch.nan, rcp)
        y = x * rcp
        # A NaN block's elements are all NaN now, with the payload of whichever operand the
        # multiply kept: 1.5 (code 3) for all of them, in every backend (module docstring).
        y = torch.where(torch.isnan(y), 1.5, y)
    codes = e2m1_codes(y.clamp(-F4_MAX, F4_MAX).reshape(shape))
    return pack_fp4(codes), e.squeeze(-1).view(torch.float8_e8m0fnu)


def e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (uint8) of scaled, clamped float32 ``y``: :func:`oq_plugin_mxfp4.fp4.e2m1_encode`,
    and torchao's code for NaN elements (:func:`_torchao_nan_codes` with the sign bit)."""
    codes = e2m1_encode(y)
    return torch.where(torch.isnan(y), _torchao_nan_codes(y) | (codes & 8), codes)


def dequantize_mxfp4(
    qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, options: BaseModel | None = None
) -> torch.Tensor:
    """``e2m1(qdata) * 2**(scale - 127)`` per 32-block, in ``dtype``: ``[..., K]``.

    ``qdata`` uint8 ``[..., K/2]`` (packed codes); ``scale`` float8_e8m0fnu (or its uint8 bytes)
    ``[..., K/32]``. Byte 0 means ``2**-126`` (see :func:`oq_plugin_mxfp8.quant.exponent_to_scale`:
    the value that inverts both quantizers), 255 NaN. Computed in float32 (every product is exact
    there unless it underflows). ``options`` is accepted for the scheme's uniform signature and unused.
    Under ``torch.compile`` the bytes are decoded by ``oq_mxfp8::e8m0_to_float32`` (same integer math;
    inductor cannot read e8m0 tensors on the CPU).
    """
    if torch.compiler.is_compiling():
        from oq_plugin_mxfp8 import ops

        s = ops.e8m0_to_float32(scale.view(torch.uint8))
    else:
        s = exponent_to_scale(scale.view(torch.uint8))
    v = e2m1_decode(unpack_fp4(qdata))
    shape = v.shape
    x = v.reshape(*shape[:-1], shape[-1] // MX_BLOCK, MX_BLOCK) * s.unsqueeze(-1)
    return x.reshape(shape).to(dtype)
