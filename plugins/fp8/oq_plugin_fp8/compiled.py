"""Compiled (torch.compile / inductor C++) CPU quantizers of oq-plugin-fp8, backend ``"compiled"``.

Same numbers as :mod:`oq_plugin_fp8.quant` (the reference; compressed-tensors' ``calculate_qparams``
+ ``_quantize``), byte for byte, but one fused C++ loop per call instead of a chain of eager ops
that each materialize a float32 copy of the tensor: inductor reads the bf16 weight once per row
(amax and quantize fused in one outer loop for per-channel / per-token / 1x128 groups, so the second
read hits L1/L2) or twice (per-tensor, 128x128 blocks), and writes only the fp8 bytes.

Why the graph is written the way it is (each point keeps the bytes equal to the reference):

- ``amax / 448`` divides by a 0-dim *tensor* input, not a Python constant: inductor may lower a
  division by a constant to a multiplication by its reciprocal (it does on GPU; CPU is exempt
  today, pytorch#157959), and ``amax * fl(1/448) != amax / 448`` for some amax.
- ``w / scale`` is a true division by the per-group scale (a tensor, never a constant).
- compressed-tensors' ``+ 0.0`` zero point (``-0.0 -> +0.0``) is written as
  ``where(y == 0, 0.0, y)``: inductor's no-op removal or a signed-zero-insensitive compiler could
  drop an addition of zero; a compare-and-select cannot be dropped. (It equals ``y + 0.0`` for every
  ``y``: nonzero values are unchanged, both zeros become ``+0.0``.)
- inductor compiles with ``-ffp-contract=off`` and without ``-funsafe-math-optimizations`` (no
  reassociation, no reciprocal divides, no FMA contraction), so float math is evaluated as written;
  the tests check every key on adversarial inputs against the reference anyway.
- the graph returns ``amax`` and the float32 scale is computed outside it with the reference's own
  :func:`oq_plugin_fp8.quant.scale_from_amax` on the (small) scale grid: a scale buffer *returned*
  from the graph is realized in its own loop and breaks inductor's per-row fusion (measured 1.7x
  slower on 4096x4096), while the copy computed inside the quantize loop is the identical expression.

Compilation happens on the first call per input shape/dtype (:class:`oq_toolkit.compiled.CompiledFn`),
never at import; tiny or empty inputs and non-float/odd ranks go to the reference directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oq_plugin_fp8.quant import (
    FP8_DTYPE,
    FP8_MAX,
    GROUPINGS,
    SCALE_EPS,
    TORCH_QUANTIZERS,
    Grouping,
    scale_from_amax,
)

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fp8_from_scaled(y: torch.Tensor) -> torch.Tensor:
    """``clamp(y + 0.0, +-448)`` cast to float8_e4m3fn (RNE): the ``+ 0.0`` as a select (see module doc)."""
    y = torch.where(y == 0, 0.0, y)
    return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _group_graph(w: torch.Tensor, fp8_max: torch.Tensor, gr: int, gc: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The traced graph: ``w [..., R, C]`` (float) -> ``(q float8_e4m3fn [..., R, C], amax [..., nr, 1, nc, 1])``.

    ``gr x gc`` groups (``gr``/``gc`` are concrete extents; partial edge groups are zero padded,
    which leaves ``max |w|`` unchanged, as the reference's ``group_amax``). ``fp8_max`` is the
    0-dim float32 tensor ``448`` (a tensor so the division stays a division).
    """
    r, c = w.shape[-2], w.shape[-1]
    nr, nc = -(-r // gr), -(-c // gc)
    lead = w.shape[:-2]
    x = w.float()
    if nr * gr != r or nc * gc != c:
        x = F.pad(x, (0, nc * gc - c, 0, nr * gr - r))
    xb = x.reshape(*lead, nr, gr, nc, gc)
    amax = xb.abs().amax(dim=(-3, -1), keepdim=True)
    # scale_from_amax, inline: identical float32 ops, computed per group inside the quantize loop
    scale = amax / fp8_max
    scale = torch.where(scale == 0, SCALE_EPS, scale)
    q = _fp8_from_scaled(xb / scale).reshape(*lead, nr * gr, nc * gc)
    if nr * gr != r or nc * gc != c:
        q = q[..., :r, :c]
    return q, amax


_compiled_group_graph = None
_FP8_MAX_T: torch.Tensor | None = None


def _graph():
    # built lazily: importing this module must not touch torch.compile
    global _compiled_group_graph, _FP8_MAX_T
    if _compiled_group_graph is None:
        from oq_toolkit.compiled import CompiledFn

        _FP8_MAX_T = torch.tensor(FP8_MAX, dtype=torch.float32)
        _compiled_group_graph = CompiledFn(_group_graph)
    return _compiled_group_graph, _FP8_MAX_T


def quantize_grouped_compiled(w: torch.Tensor, g: Grouping) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w [..., R, C]`` (float32 / bf16 / fp16, CPU) to fp8 with one scale per ``g`` group.

    Returns ``(qdata float8_e4m3fn [..., R, C] contiguous, scale float32)`` in exactly the layout
    and bytes of :func:`oq_plugin_fp8.quant.quantize_grouped` (compressed-tensors' formula:
    ``scale = amax / 448`` or float32 eps for a zero group, ``q = clamp(w / scale + 0.0, +-448)``).
    Inputs the compiled graph does not cover (non-float dtypes, empty, non-CPU) use the reference.
    """
    if w.dim() < 2 or w.numel() == 0 or w.dtype not in _FLOAT_DTYPES or w.device.type != "cpu":
        from oq_plugin_fp8.quant import quantize_grouped

        return quantize_grouped(w, g)
    gr, gc = g.extents(w.shape[-2], w.shape[-1])
    fn, fp8_max = _graph()
    q, amax = fn(w.contiguous(), fp8_max, gr, gc)
    grid = amax.squeeze(-1).squeeze(-2)  # [..., nr, nc]
    scale = scale_from_amax(grid)
    if g.tensor_scale:
        scale = scale.squeeze(-1)
    return q.contiguous(), scale.contiguous()


def _quantizer(g: Grouping):
    """The registered compiled quantize function for grouping ``g``."""

    def quantize(w: torch.Tensor, options=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Compiled fp8 quantizer of one grouping: ``w [N, K]`` / ``[E, N, K]`` (float32/bf16/fp16)
        -> ``(qdata float8_e4m3fn, scale float32)``, bytes equal to the torch reference (see
        :func:`quantize_grouped_compiled`)."""
        return quantize_grouped_compiled(w, g)

    return quantize


def compiled_quantizers() -> dict[str, tuple]:
    """Key name -> ``(quantize, dequantize)`` for the ``"compiled"`` backend (all six fp8 keys).

    Dequantization is the reference's (it is not on the load path)."""
    out = {}
    for name, g in GROUPINGS.items():
        out[name] = (_quantizer(g), TORCH_QUANTIZERS[name][1])
    return out
