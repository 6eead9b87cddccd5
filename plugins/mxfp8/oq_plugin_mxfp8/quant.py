"""Torch reference MXFP8 quantizer: the definition of the numbers every other backend must match.

Format (OCP Microscaling Formats (MX) v1.0, section 5 and 6.3): the last dim K is cut into blocks
of 32 consecutive elements; each block shares one E8M0 scale (a biased power-of-two exponent,
bias 127, 255 = NaN) and stores its elements as float8_e4m3fn, saturating to +-448.

Storage chosen here (and by torchao): ``qdata`` is ``torch.float8_e4m3fn`` with the input's shape;
``scale`` is ``torch.float8_e8m0fnu`` of shape ``[..., N, K/32]`` (its bytes, ``scale.view(torch.uint8)``,
are the biased exponents). Scales are dequantization multipliers: ``w ~= qdata * 2**(scale_byte - 127)``.

Two scale rules (option ``scale_mode``), both bit-exact with torchao
``torchao.prototype.mx_formats.mx_tensor.to_mx(x, torch.float8_e4m3fn, 32, scaling_mode)``:

- ``"rceil"`` (default; torchao ``RCEIL``, NVIDIA's ``cvt.rp.satfinite.ue8m0``):
  ``e = clamp(ceil(log2(amax / 448)), -127, 127)``, elements ``clamp(x * 2**-e, +-448)``; a block
  whose exponent clamps to -127 (all zero, or amax <= 448 * 2**-127) is multiplied by 1 instead
  (torchao's rule; its elements are all zero either way). torchao evaluates ``log2`` in float32:
  for 1 to 22 mantissa codes just above each power of two the rounded logarithm is the integer
  itself and the ceiling picks the smaller exponent (the block maximum then saturates to 448, a
  relative change below 3e-6). :func:`rceil_exponent` reproduces that rounding with integer
  arithmetic (no libm), so every backend and device gets the same bytes.
- ``"floor"`` (torchao ``FLOOR``, the OCP spec's rule): ``e = clamp(floor(log2(amax)) - 8, -127, 128)``
  with ``floor(log2)`` read from the float32 exponent field; elements ``clamp(x / max(2**e, 2**-126), +-448)``.
  Block maxima whose mantissa puts ``amax / 2**e`` in [448, 512) saturate.

NaN in a block gives the NaN scale byte 255 (both rules), Inf gives 254 (rceil); weights never get
here with either (:func:`oqcore.quantize_tensor` rejects them).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from oq_plugin_mxfp8.keys import MX_BLOCK  # the block size is the keys' group shape, stated there

F8_MAX = 448.0
E8M0_BIAS = 127
E8M0_NAN = 255
F32_MIN_NORMAL = 2.0**-126


class Mxfp8Options(BaseModel):
    """Options of the mxfp8 methods and quantizers (``QuantSpec.options``).

    ``scale_mode``: ``"rceil"`` (default, ``ceil(log2(amax / 448))``) or ``"floor"`` (OCP MX v1.0's
    ``floor(log2(amax)) - 8``). Used for the weights and for the dynamic activations alike.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale_mode: Literal["rceil", "floor"] = "rceil"


def _mode(options: BaseModel | None) -> str:
    return getattr(options, "scale_mode", "rceil") if options is not None else "rceil"


def _log2_round_down_limit(n: torch.Tensor) -> torch.Tensor:
    """How many mantissa codes above ``2**k`` have ``fl32(log2(x)) == k`` (torch/torchao's log2).

    ``n`` is ``k`` for ``k > 0`` and ``-k - 1`` for ``k < 0``: the magnitude just on the side of ``k``
    the exact ``log2`` lies on, whose binade ``q = floor(log2 n)`` sets the float32 spacing there.
    ``k + f / ln 2`` rounds to ``k`` while ``f < ln2 * 2**(q - 24)``, i.e. for mantissa codes
    ``m <= floor(ln2 * 2**(q - 1))``: 0, 0, 1, 2, 5, 11, 22 for q = 0..6 (|k| <= 127). Checked
    exhaustively against ``torch.log2`` over every float32 in the tests.
    """
    return torch.where(
        n >= 64, 22, torch.where(n >= 32, 11, torch.where(n >= 16, 5, torch.where(n >= 8, 2, torch.where(n >= 4, 1, 0))))
    )


def rceil_exponent(descale: torch.Tensor) -> torch.Tensor:
    """Biased e8m0 exponent (uint8) of ``clamp(ceil(fl32(log2(descale))), -127, 127) + 127``.

    ``descale`` is float32 ``amax / 448`` (>= 0 or NaN). Equals torchao's RCEIL fallback
    ``torch.ceil(torch.log2(descale))`` bit for bit, including its float32 rounding of ``log2``
    (see :func:`_log2_round_down_limit`), with NaN -> 255 and Inf -> 254.
    """
    bits = descale.contiguous().view(torch.int32)
    biased = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    k = biased - E8M0_BIAS
    n = torch.where(k > 0, k, -k - 1)
    limit = _log2_round_down_limit(n)
    normal_e = torch.where(mant == 0, k, k + 1 - (mant <= limit).to(torch.int32))
    # float32 subnormals: (2**-127, 2**-126) has ceil -126 unless log2 rounds to -127 (codes in
    # units of 2**-22 here, so half as many); everything smaller clamps to -127.
    sub_i = mant - (1 << 22)
    sub_e = torch.where(sub_i > 0, -126 - (2 * sub_i <= 22).to(torch.int32), -127)
    e = torch.where(biased == 0, sub_e, normal_e).clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS
    e = torch.where(torch.isinf(descale), 254, e)
    e = torch.where(torch.isnan(descale), E8M0_NAN, e)
    return e.to(torch.uint8)


def floor_exponent(amax: torch.Tensor, emax: int = 8) -> torch.Tensor:
    """Biased e8m0 exponent (uint8) of the OCP rule: ``clamp(floor(log2(amax)) - emax, -127, 128) + 127``,
    ``floor(log2)`` being the float32 exponent field (so subnormals and zero count as -127), NaN -> 255.
    ``emax`` is the element format's largest exponent: 8 for e4m3 (448 = 1.75 * 2**8, the default),
    2 for e2m1 (6 = 1.5 * 2**2, oq-plugin-mxfp4). The ``128`` upper bound (-> byte 255) is
    torchao's, kept for bit-exactness; finite inputs stay below.
    """
    bits = amax.contiguous().view(torch.int32)
    pow2 = ((bits >> 23) & 0xFF) - E8M0_BIAS
    e = (pow2 - emax).clamp(-E8M0_BIAS, E8M0_BIAS + 1) + E8M0_BIAS
    e = torch.where(torch.isnan(amax), E8M0_NAN, e)
    return e.to(torch.uint8)


def exponent_to_scale(e: torch.Tensor) -> torch.Tensor:
    """float32 dequantization multipliers of biased e8m0 bytes (uint8): ``2**(e - 127)``, NaN for 255.

    Byte 0 gives ``2**-126`` rather than the spec's ``2**-127``: the floor quantizer divided that
    block by ``2**-126`` (torchao clamps the scale to the smallest normal float32), and an rceil
    block with byte 0 holds only zeros, so this is the value that inverts both quantizers.
    """
    e32 = e.to(torch.int32).clamp(min=1)
    scale = (e32 << 23).view(torch.float32)
    return torch.where(e == E8M0_NAN, torch.nan, scale)


def _check_k(w: torch.Tensor) -> None:
    if w.dim() < 1 or w.shape[-1] % MX_BLOCK:
        raise ValueError(f"mxfp8 needs the last dim divisible by {MX_BLOCK}, got shape {tuple(w.shape)}")


def quantize_mxfp8(w: torch.Tensor, options: BaseModel | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` (``[N, K]``, ``[E, N, K]`` or activations ``[M, K]``; float32/bf16/fp16) to MXFP8.

    Returns ``(qdata, scale)``: ``qdata`` float8_e4m3fn of ``w``'s shape, ``scale`` float8_e8m0fnu
    ``[..., K/32]`` (one exponent per 32 consecutive elements of the last dim; leading dims,
    e.g. experts, are never reduced over). ``options.scale_mode`` picks ``rceil`` (default) or
    ``floor``; see the module docstring for the exact rules (torchao ``to_mx``). Raises
    ``ValueError`` if K is not a multiple of 32.
    """
    _check_k(w)
    shape = w.shape
    x = w.reshape(*shape[:-1], shape[-1] // MX_BLOCK, MX_BLOCK).to(torch.float32)
    amax = x.abs().amax(-1, keepdim=True)
    if _mode(options) == "floor":
        e = floor_exponent(amax)
        div = exponent_to_scale(e)
        # torchao builds the divisor as (e << 23) clamped to the smallest normal, so NaN blocks
        # (byte 255) divide by +inf; keep that for bit-exactness.
        div = torch.where(e == E8M0_NAN, torch.inf, div)
        y = x / div
    else:
        descale = amax / F8_MAX
        e = rceil_exponent(descale)
        rcp = torch.where(e == 0, 1.0, ((254 - e.to(torch.int32)).clamp(min=1) << 23).view(torch.float32))
        rcp = torch.where(e == 254, 2.0**-127, rcp)
        rcp = torch.where(e == E8M0_NAN, torch.nan, rcp)
        y = x * rcp
    q = y.clamp(-F8_MAX, F8_MAX).to(torch.float8_e4m3fn).reshape(shape)
    return q, e.squeeze(-1).view(torch.float8_e8m0fnu)


def dequantize_mxfp8(
    qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, options: BaseModel | None = None
) -> torch.Tensor:
    """``qdata * 2**(scale - 127)`` per 32-block, in ``dtype``.

    ``qdata`` float8_e4m3fn ``[..., K]``; ``scale`` float8_e8m0fnu (or its uint8 bytes) ``[..., K/32]``.
    Byte 0 means ``2**-126`` (see :func:`exponent_to_scale`), 255 NaN. Computed in float32.
    Under ``torch.compile`` the bytes are decoded by the op ``oq_mxfp8::e8m0_to_float32`` (same
    integer math; inductor cannot read e8m0 tensors on the CPU, see :mod:`oq_plugin_mxfp8.ops`).
    """
    shape = qdata.shape
    if torch.compiler.is_compiling():
        from oq_plugin_mxfp8 import ops

        s = ops.e8m0_to_float32(scale.view(torch.uint8))
    else:
        s = exponent_to_scale(scale.view(torch.uint8))
    x = qdata.to(torch.float32).reshape(*shape[:-1], shape[-1] // MX_BLOCK, MX_BLOCK) * s.unsqueeze(-1)
    return x.reshape(shape).to(dtype)
