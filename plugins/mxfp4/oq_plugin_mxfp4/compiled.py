"""Compiled (torch.compile / inductor C++) CPU MXFP4 quantizer, backend ``"compiled"``.

Same bytes as :func:`oq_plugin_mxfp4.quant.quantize_mxfp4` (itself bit-exact with torchao ``to_mx``
for ``float4_e2m1fn_x2``, OCP MX v1.0 blocks of 32 along K) for both scale rules, in fused C++
loops: inductor computes each 32-block's amax and e8m0 exponent, then the scaled elements, their e2m1
codes and the packed bytes without float32 copies of the tensor. The packing loop reads element
pairs with stride 2, which inductor does not vectorize: measured on 4096 x 4096 bf16 (2 cores,
shared), 0.23 s against the reference's 2.6 s and the C quantizer's 0.023 s (:mod:`oq_plugin_mxfp4.cpu`,
the one to prefer on CPU).

The graph is the reference's, step for step, with its integer-exact helpers (mxfp8's
:func:`~oq_plugin_mxfp8.quant.rceil_exponent` / :func:`~oq_plugin_mxfp8.quant.floor_exponent`,
:func:`oq_plugin_mxfp4.fp4.e2m1_encode`'s comparisons, :func:`oq_plugin_mxfp4.fp4.pack_fp4`'s byte
layout), so no compiler choice decides a bit. rceil's ``amax / 6`` divides by a 0-dim tensor input, not a constant
(a division by a constant may be lowered to a multiplication by ``fl(1/6)``, which rounds
differently); inductor's C++ flags keep IEEE semantics, and the tests compare with the reference.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel

from oq_plugin_mxfp4.fp4 import F4_MAX
from oq_plugin_mxfp4.quant import F4_EMAX, MX_BLOCK, check_k, e2m1_codes, scale_mode
from oq_plugin_mxfp8.quant import E8M0_NAN, exponent_to_scale, floor_exponent, rceil_exponent

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _mx4_graph(w: torch.Tensor, f4_max: torch.Tensor, floor: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The traced graph: ``w [..., K]`` float -> ``(q uint8 [..., K/2], e uint8 [..., K/32, 1])``.

    ``f4_max`` is the 0-dim float32 tensor ``6``; ``floor`` (static) picks the scale rule. The body
    is :func:`oq_plugin_mxfp4.quant.quantize_mxfp4`'s.
    """
    shape = w.shape
    x = w.reshape(*shape[:-1], shape[-1] // MX_BLOCK, MX_BLOCK).to(torch.float32)
    amax = x.abs().amax(-1, keepdim=True)
    if floor:
        e = floor_exponent(amax, emax=F4_EMAX)
        div = exponent_to_scale(e)
        div = torch.where(e == E8M0_NAN, torch.inf, div)  # torchao's divisor for NaN blocks
        y = x / div
    else:
        e = rceil_exponent(amax / f4_max)
        rcp = torch.where(e == 0, 1.0, ((254 - e.to(torch.int32)).clamp(min=1) << 23).view(torch.float32))
        rcp = torch.where(e == 254, 2.0**-127, rcp)
        rcp = torch.where(e == E8M0_NAN, torch.nan, rcp)
        y = torch.where(torch.isnan(x * rcp), 1.5, x * rcp)  # the reference's NaN-block rule
    # Even and odd elements encoded apart and packed in the same loop (pack_fp4's layout): one
    # elementwise pass writing K/2 bytes. Encoding all K codes first and packing them after makes
    # inductor recompute or re-read every code in a scalar stride-2 loop (3-4x slower, measured).
    y = y.clamp(-F4_MAX, F4_MAX).reshape(*shape[:-1], shape[-1] // 2, 2)
    return e2m1_codes(y[..., 0]) | (e2m1_codes(y[..., 1]) << 4), e


_state: dict = {}


def _graph():
    # built on first use: importing this module must not touch torch.compile
    if not _state:
        from oq_toolkit.compiled import CompiledFn

        _state["fn"] = CompiledFn(_mx4_graph)
        _state["max"] = torch.tensor(F4_MAX, dtype=torch.float32)
    return _state["fn"], _state["max"]


def quantize_mxfp4_compiled(w: torch.Tensor, options: BaseModel | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 quantize ``w`` (``[N, K]``, ``[E, N, K]``, activations ``[M, K]``; float32 / bf16 / fp16,
    CPU), fused. Returns ``(qdata uint8 [..., K/2] packed e2m1, scale float8_e8m0fnu [..., K/32])``.

    Bytes equal :func:`oq_plugin_mxfp4.quant.quantize_mxfp4` (OCP MX v1.0 with torchao ``to_mx``'s
    RCEIL / FLOOR rules, ``options.scale_mode``). Raises ``ValueError`` if K is not a multiple of
    32. Empty, non-float or non-CPU inputs go to the reference; without a C++ compiler (or with
    ``OQ_COMPILE=0``) the same graph runs eagerly.
    """
    from oq_plugin_mxfp4.quant import quantize_mxfp4

    check_k(w)
    if w.numel() == 0 or w.dtype not in _FLOAT_DTYPES or w.device.type != "cpu":
        return quantize_mxfp4(w, options)
    fn, f4_max = _graph()
    q, e = fn(w.contiguous(), f4_max, scale_mode(options) == "floor")
    return q, e.squeeze(-1).view(torch.float8_e8m0fnu)
