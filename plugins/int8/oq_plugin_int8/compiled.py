"""Compiled (torch.compile / inductor C++) CPU quantizer of oq-plugin-int8, backend ``"compiled"``.

Same numbers as :func:`oq_plugin_int8.quant.quantize_int8_rowwise` (vLLM's symmetric int8:
``scale = amax_row / 127`` or float32 eps for a zero row, ``q = clamp(round_half_even(x / scale),
+-127)``), byte for byte, in one fused C++ loop: inductor computes a row's amax and quantizes the
same row in one outer loop (the second read hits cache) and never materializes float32 copies.

Kept exact by construction (the tests check every case against the reference):

- ``amax / 127`` divides by a 0-dim tensor input, not a constant, so no lowering can turn it into
  a multiplication by ``fl(1/127)`` (which rounds differently);
- ``x / scale`` is a true division; ``torch.round`` lowers to a round-half-even vector instruction;
- inductor's C++ flags keep IEEE semantics (``-ffp-contract=off``, no unsafe-math);
- the graph returns ``amax`` and the float32 scale is recomputed outside from it (same two
  float32 ops on ``[..., 1]``): returning the scale buffer from the graph splits the fused loop.
"""

from __future__ import annotations

import torch

from oq_plugin_int8.quant import INT8_MAX, ZERO_ROW_SCALE

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _scale(amax: torch.Tensor, int8_max) -> torch.Tensor:
    # rowwise_scale's rule on an already reduced amax: amax / 127, zeros -> float32 eps
    scale = amax / int8_max
    return torch.where(scale == 0, ZERO_ROW_SCALE, scale)


def _rowwise_graph(x: torch.Tensor, int8_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The traced graph: ``x [..., K]`` float -> ``(q int8 [..., K], amax float32 [..., 1])``.

    ``int8_max`` is the 0-dim float32 tensor ``127`` (a tensor so the division stays a division).
    """
    x32 = x.float()
    amax = x32.abs().amax(dim=-1, keepdim=True)
    q = torch.round(x32 / _scale(amax, int8_max)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, amax


_state: dict = {}


def _graph():
    # built on first use: importing this module must not touch torch.compile
    if not _state:
        from oq_toolkit.compiled import CompiledFn

        _state["fn"] = CompiledFn(_rowwise_graph)
        _state["max"] = torch.tensor(float(INT8_MAX), dtype=torch.float32)
    return _state["fn"], _state["max"]


def quantize_int8_rowwise_compiled(x: torch.Tensor, options=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one float32 scale per row, fused: ``x [N, K] / [E, N, K] / [M, K]`` (float32,
    bf16 or fp16 on the CPU) -> ``(qdata int8, x's shape; scale float32 [..., 1])``.

    Bytes equal :func:`oq_plugin_int8.quant.quantize_int8_rowwise` (the formula's source: vLLM's
    int8 convention, see :mod:`oq_plugin_int8.quant`). ``options`` is unused. Empty, non-float or
    non-CPU inputs go to the reference.
    """
    if x.dim() < 1 or x.numel() == 0 or x.dtype not in _FLOAT_DTYPES or x.device.type != "cpu":
        from oq_plugin_int8.quant import quantize_int8_rowwise

        return quantize_int8_rowwise(x, options)
    fn, int8_max = _graph()
    q, amax = fn(x.contiguous(), int8_max)
    # the reference's own rule on [..., 1] (cheap), identical to the copy computed inside the graph
    return q, _scale(amax, INT8_MAX).contiguous()
