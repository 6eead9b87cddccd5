"""Compiled (torch.compile / inductor C++) CPU NVFP4 quantizer, backend ``"compiled"``.

Same bytes as :func:`oq_plugin_nvfp4.quant.quantize_nvfp4` (compressed-tensors' NVFP4 on float32:
global scale ``fl(fl(1 / amax) * 2688)``, block scales ``e4m3(g * fl(amax_b / 6))`` with zero ->
0.125, elements ``e2m1(x / fl(s / g))``, -0.0 -> code 0), as one graph: inductor fuses the per-block
amax, the scale and the element encoding into generated C++ loops over the rows.

The graph is the reference's, step for step, with one precaution: divisions by the constants of
the reference (``amax / 6``) divide by 0-dim tensor inputs, not Python numbers, because a division
by a constant may be lowered to a multiplication by its rounded reciprocal, which rounds
differently; and the e2m1 codes are counted in int32 lanes (the same thresholds as
:func:`oq_plugin_mxfp4.fp4.e2m1_encode`), because inductor's uint8 sums next to float32 lanes ran
6x slower. Inductor's C++ keeps IEEE semantics (``-ffp-contract=off``, no unsafe math); the tests
compare every case with the reference.

Measured (bf16 4096x4096, one thread, CPU time): ~107 ms, vs ~700 ms for the eager reference and
~12 ms for the C quantizer (:mod:`oq_plugin_nvfp4.cpu`), which the ``cpu`` backend should prefer.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel

from oq_plugin_mxfp4.fp4 import F4_MAX
from oq_plugin_nvfp4.quant import (
    F8_MAX,
    NV_BLOCK,
    ZERO_SCALE,
    _check_global,
    _check_k,
    _global_view,
    global_scale_from_amax,
)

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _nv_graph(
    w: torch.Tensor, g: torch.Tensor | None, f4_max: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The traced graph: ``w [..., K]`` float -> ``(qdata uint8 [..., K/2], scale float8_e4m3fn
    [..., K/16], global_scale float32)``; ``g`` the global scale override or ``None``; ``f4_max`` the
    0-dim float32 tensor 6. The body is :func:`oq_plugin_nvfp4.quant.quantize_nvfp4`'s."""
    shape = w.shape
    x = w.to(torch.float32)
    if g is None:
        gshape = (shape[0], 1) if w.dim() == 3 else (1,)
        g = global_scale_from_amax(x.abs().reshape(gshape[0], -1).amax(dim=1).reshape(gshape))
    xb = x.reshape(*shape[:-1], shape[-1] // NV_BLOCK, NV_BLOCK)
    gb = _global_view(g, w)
    amax = xb.abs().amax(-1, keepdim=True)
    s = gb * (amax / f4_max)
    sf = s.clamp(-F8_MAX, F8_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    sf = torch.where(sf == 0, ZERO_SCALE, sf)
    y = (xb / (sf / gb)).clamp(-F4_MAX, F4_MAX).reshape(shape)
    codes = _e2m1_codes_i32(y).masked_fill(y == 0, 0)
    pairs = codes.reshape(*shape[:-1], shape[-1] // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8), sf.squeeze(-1).to(torch.float8_e4m3fn), g


def _e2m1_codes_i32(y: torch.Tensor) -> torch.Tensor:
    """:func:`oq_plugin_mxfp4.fp4.e2m1_encode` (its thresholds, ``_THRESHOLDS``) with int32 counts:
    inductor vectorizes 32-bit lanes alongside the float32 ones, where uint8 sums ran 30x slower."""
    from oq_plugin_mxfp4.fp4 import _THRESHOLDS

    a = y.abs()
    code = torch.zeros(y.shape, dtype=torch.int32, device=y.device)
    for t, tie_up in _THRESHOLDS:
        code = code + (a >= t if tie_up else a > t).to(torch.int32)
    sign = (y.view(torch.int32) < 0).to(torch.int32)
    return code | (sign << 3)


_state: dict = {}


def _graph():
    # built on first use: importing this module must not touch torch.compile
    if not _state:
        from oq_toolkit.compiled import CompiledFn

        _state["fn"] = CompiledFn(_nv_graph)
        _state["f4"] = torch.tensor(F4_MAX, dtype=torch.float32)
    return _state["fn"], _state["f4"]


def quantize_nvfp4_compiled(
    w: torch.Tensor, options: BaseModel | None = None, *, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 quantize ``w`` (``[N, K]``, ``[E, N, K]``, activations ``[M, K]``; float32 / bf16 /
    fp16, CPU), fused by inductor. Returns ``(qdata uint8 [..., K/2], scale float8_e4m3fn
    [..., K/16], global_scale float32 [1] / [E, 1])``, the bytes of
    :func:`oq_plugin_nvfp4.quant.quantize_nvfp4` (same ``global_scale`` override). Raises its
    ``ValueError`` s (K % 16, rank, override shape). Empty, non-float or non-CPU inputs go to the
    reference. NaN/Inf are not checked (the ``cpu`` quantizer raises for them).
    """
    from oq_plugin_nvfp4.quant import quantize_nvfp4

    _check_k(w)
    if global_scale is not None:
        _check_global(global_scale, w)
    if w.numel() == 0 or w.dtype not in _FLOAT_DTYPES or w.device.type != "cpu":
        return quantize_nvfp4(w, options, global_scale=global_scale)
    fn, f4 = _graph()
    q, s, g = fn(w.contiguous(), global_scale, f4)
    return q, s, g
