"""Compiled (torch.compile / inductor C++) CPU MXFP8 quantizer, backend ``"compiled"``.

Same bytes as :func:`oq_plugin_mxfp8.quant.quantize_mxfp8` (itself bit-exact with torchao
``to_mx``, OCP MX v1.0 blocks of 32 along K) for both scale rules, in one fused C++ loop: inductor
computes each 32-block's amax, its e8m0 exponent and the scaled, saturated fp8 elements in one
pass over the row (the block is re-read from L1), without float32 copies of the tensor.

The graph reuses the reference's own integer-exact helpers (:func:`rceil_exponent`,
:func:`floor_exponent`, :func:`exponent_to_scale`: exponent bits read from the float32 bits, no
libm ``log2``), so no compiler choice decides a bit. Beyond that:

- rceil's ``amax / 448`` divides by a 0-dim tensor input, not a constant (a division by a constant
  may be lowered to a multiplication by ``fl(1/448)``, which rounds differently);
- the element scaling is a multiplication by an exact power of two (rceil) or a division by one
  (floor), exactly as the reference writes it; inductor's C++ flags keep IEEE semantics
  (``-ffp-contract=off``, no unsafe-math), and the tests compare every case with the reference.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel

from oq_plugin_mxfp8.quant import (
    E8M0_NAN,
    F8_MAX,
    MX_BLOCK,
    _mode,
    exponent_to_scale,
    floor_exponent,
    rceil_exponent,
)

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _mx_graph(w: torch.Tensor, f8_max: torch.Tensor, floor: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The traced graph: ``w [..., K]`` float -> ``(q float8_e4m3fn [..., K], e uint8 [..., K/32, 1])``.

    ``f8_max`` is the 0-dim float32 tensor ``448``; ``floor`` (static) picks the scale rule. The
    body is :func:`oq_plugin_mxfp8.quant.quantize_mxfp8`'s, step for step.
    """
    shape = w.shape
    x = w.reshape(*shape[:-1], shape[-1] // MX_BLOCK, MX_BLOCK).to(torch.float32)
    amax = x.abs().amax(-1, keepdim=True)
    if floor:
        e = floor_exponent(amax)
        div = exponent_to_scale(e)
        div = torch.where(e == E8M0_NAN, torch.inf, div)  # torchao's divisor for NaN blocks
        y = x / div
    else:
        e = rceil_exponent(amax / f8_max)
        rcp = torch.where(e == 0, 1.0, ((254 - e.to(torch.int32)).clamp(min=1) << 23).view(torch.float32))
        rcp = torch.where(e == 254, 2.0**-127, rcp)
        rcp = torch.where(e == E8M0_NAN, torch.nan, rcp)
        y = x * rcp
    q = y.clamp(-F8_MAX, F8_MAX).to(torch.float8_e4m3fn).reshape(shape)
    return q, e


_state: dict = {}


def _graph():
    # built on first use: importing this module must not touch torch.compile
    if not _state:
        from oq_toolkit.compiled import CompiledFn

        _state["fn"] = CompiledFn(_mx_graph)
        _state["max"] = torch.tensor(F8_MAX, dtype=torch.float32)
    return _state["fn"], _state["max"]


def quantize_mxfp8_compiled(w: torch.Tensor, options: BaseModel | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP8 quantize ``w`` (``[N, K]``, ``[E, N, K]``, activations ``[M, K]``; float32 / bf16 / fp16,
    CPU), fused. Returns ``(qdata float8_e4m3fn, w's shape; scale float8_e8m0fnu [..., K/32])``.

    Bytes equal :func:`oq_plugin_mxfp8.quant.quantize_mxfp8` (formula: OCP MX v1.0 with torchao
    ``to_mx``'s RCEIL / FLOOR rules, ``options.scale_mode``). Raises ``ValueError`` if K is not a
    multiple of 32. Empty, non-float or non-CPU inputs go to the reference.
    """
    from oq_plugin_mxfp8.quant import _check_k, quantize_mxfp8

    _check_k(w)
    if w.numel() == 0 or w.dtype not in _FLOAT_DTYPES or w.device.type != "cpu":
        return quantize_mxfp8(w, options)
    fn, f8_max = _graph()
    q, e = fn(w.contiguous(), f8_max, _mode(options) == "floor")
    return q, e.squeeze(-1).view(torch.float8_e8m0fnu)
