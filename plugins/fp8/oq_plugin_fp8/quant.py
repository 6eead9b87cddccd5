"""Torch reference quantizers of oq-plugin-fp8: the definition of the numbers.

Every quantizer here follows compressed-tensors (``quantization/utils/helpers.py::calculate_qparams``
and ``quantization/lifecycle/forward_helpers.py::_quantize``), computed in float32:

- ``amax`` = max |w| over a scale group (float32; the input is upcast to float32 first);
- ``scale = amax / 448`` (an IEEE float32 *division* by ``448.0``, as compressed-tensors divides
  by ``bit_range / 2 = 896 / 2``);
- a scale that comes out ``0`` (all-zero group, or ``amax / 448`` underflowing) is replaced by
  ``torch.finfo(torch.float32).eps``, so zeros never give ``0 / 0``;
- ``q = clamp(w / scale + 0.0, -448, 448).to(torch.float8_e4m3fn)``: a float32 division by the
  scale (not a multiplication by its reciprocal, which rounds differently), then
  round-to-nearest-even. The ``+ 0.0`` is compressed-tensors' zero point: it maps an exact ``-0.0``
  to ``+0.0`` (byte ``0x00``; tiny negatives that round to zero stay ``-0``, ``0x80``).

Dequantization is ``q.to(float32) * scale`` broadcast over the groups, then cast to ``dtype``.

Scale layouts (``[E, ...]`` leading dims of a 3D expert stack are kept, never reduced over):

============================  ==================  =========================  ==================
key                           input               scale (2D input)           scale (3D input)
============================  ==================  =========================  ==================
fp8_per_tensor_static         ``[N, K]``          ``[1]``                    ``[E, 1]``
fp8_per_channel_static        ``[N, K]``          ``[N, 1]``                 ``[E, N, 1]``
fp8_per_block_static          ``[N, K]``          ``[ceil(N/128), ceil(K/128)]``  ``[E, ...]``
fp8_per_tensor_dynamic        ``[M, K]``          ``[1]``                    ``[B, 1]``
fp8_per_token                 ``[M, K]``          ``[M, 1]``                 ``[B, M, 1]``
fp8_per_block_dynamic         ``[M, K]``          ``[M, ceil(K/128)]``       ``[B, M, ...]``
============================  ==================  =========================  ==================

So ``scale[e]`` of a 3D stack is exactly the scale of quantizing expert ``e`` alone. Edge blocks
and groups that are not full (shapes not multiples of 128) are partial: their amax is over the
elements that exist (as compressed-tensors' zero padding gives).

Externally reduced amax (tensor parallelism, :attr:`oqcore.QuantizerImpl.takes_amax`): every
quantizer here takes ``amax=``, the float32 max ``|w|`` of each group over the whole (unsharded)
tensor laid out as the group grid of ``w`` (:func:`oqcore.groups.amax_grid`: ``[*lead, 1, 1]``
per tensor, ``[*lead, N, 1]`` per channel / token, ``[*lead, ceil(N/128), ceil(K/128)]`` blocks,
``[*lead, M, ceil(K/128)]`` 1x128 groups). It replaces the amax computed from ``w``; the scale and
element rules are unchanged, so a slice ``w`` cut on group boundaries gets exactly the bytes (and
scales) it has in the quantized whole tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value (``torch.finfo(torch.float8_e4m3fn).max``)."""
SCALE_EPS = torch.finfo(torch.float32).eps
"""Scale given to a group whose ``amax / 448`` is 0 (compressed-tensors' ``_get_dtype_eps(float32)``)."""
BLOCK = 128


@dataclass(frozen=True)
class Grouping:
    """How a quantizer groups elements of the last two dims ``[R, C]`` into one scale.

    ``rows`` / ``cols`` are the group extents (``-1``: the full extent). ``tensor_scale`` marks
    per-tensor keys, whose scale is squeezed to ``[..., 1]`` instead of ``[..., 1, 1]``.
    """

    rows: int
    cols: int
    tensor_scale: bool = False

    def extents(self, r: int, c: int) -> tuple[int, int]:
        """Concrete group extents for a ``[r, c]`` matrix (at least 1, to allow empty dims)."""
        gr = r if self.rows == -1 else self.rows
        gc = c if self.cols == -1 else self.cols
        return max(gr, 1), max(gc, 1)


PER_TENSOR = Grouping(-1, -1, tensor_scale=True)
PER_CHANNEL = PER_TOKEN = Grouping(1, -1)  # one row: an output channel of W [N, K], a token of x [M, K]
BLOCK_128x128 = Grouping(BLOCK, BLOCK)
GROUP_1x128 = Grouping(1, BLOCK)


def _grid(w: torch.Tensor, g: Grouping) -> tuple[int, int, int, int]:
    r, c = w.shape[-2], w.shape[-1]
    gr, gc = g.extents(r, c)
    return gr, gc, -(-r // gr), -(-c // gc)


def group_amax(w: torch.Tensor, g: Grouping) -> torch.Tensor:
    """``max |w|`` per group in float32: ``[..., ceil(R/gr), ceil(C/gc)]`` for ``w [..., R, C]``.

    Partial edge groups are zero padded, which leaves an absolute maximum unchanged.
    """
    w = w.float()
    gr, gc, nr, nc = _grid(w, g)
    r, c = w.shape[-2], w.shape[-1]
    a = w.abs()
    if nr * gr != r or nc * gc != c:
        a = F.pad(a, (0, nc * gc - c, 0, nr * gr - r))
    a = a.reshape(*w.shape[:-2], nr, gr, nc, gc)
    return a.amax(dim=(-3, -1))


def check_amax(amax: torch.Tensor, w: torch.Tensor, g: Grouping) -> torch.Tensor:
    """An externally reduced ``amax`` for ``w [..., R, C]`` and grouping ``g``, as float32 on
    ``w``'s device, after checking its shape is the group grid ``[..., ceil(R/gr), ceil(C/gc)]``
    (:func:`group_amax` 's, :func:`oqcore.groups.amax_grid` 's). Raises ``ValueError`` naming both
    shapes otherwise (a caller's bug: the core reduces amax in this layout)."""
    gr, gc, nr, nc = _grid(w, g)
    want = (*w.shape[:-2], nr, nc)
    if not isinstance(amax, torch.Tensor) or tuple(amax.shape) != want:
        got = list(amax.shape) if isinstance(amax, torch.Tensor) else type(amax).__name__
        raise ValueError(
            f"fp8 amax for a tensor of shape {list(w.shape)} with {gr}x{gc} groups must have the group "
            f"grid's shape {list(want)}, got {got}"
        )
    return amax.to(device=w.device, dtype=torch.float32)


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """``amax / 448`` in float32, zeros replaced by float32 eps (compressed-tensors' rule)."""
    scale = amax.float() / FP8_MAX
    return torch.where(scale == 0, torch.full_like(scale, SCALE_EPS), scale)


def expand_scale(grid_scale: torch.Tensor, shape: torch.Size, g: Grouping) -> torch.Tensor:
    """Broadcast a ``[..., nr, nc]`` scale grid to the full ``[..., R, C]`` element shape."""
    r, c = shape[-2], shape[-1]
    gr, gc = g.extents(r, c)
    s = grid_scale.repeat_interleave(gr, dim=-2)[..., :r, :]
    return s.repeat_interleave(gc, dim=-1)[..., :c]


def _to_grid(scale: torch.Tensor, g: Grouping) -> torch.Tensor:
    # per-tensor scales are stored [..., 1]; the grid helpers want [..., 1, 1]
    return scale.unsqueeze(-1) if g.tensor_scale else scale


def partial_groups(shape: torch.Size, g: Grouping) -> bool:
    """True when a fixed-size group of ``g`` does not tile the last two dims of ``shape`` (partial
    edge groups: 128x128 blocks or 1x128 groups on a dim that is not a multiple of 128)."""
    return (g.rows > 1 and shape[-2] % g.rows != 0) or (g.cols > 1 and shape[-1] % g.cols != 0)


def _opaque_under_compile(shape: torch.Size, g: Grouping) -> bool:
    # Inductor's C++ loop split drops the tail of a loop indexed by k // 128 when K % 128 != 0
    # (uninitialized output: NaN/garbage); such shapes run as an opaque op (oq_plugin_fp8.ops).
    return len(shape) >= 2 and torch.compiler.is_compiling() and partial_groups(shape, g)


def quantize_grouped(w: torch.Tensor, g: Grouping, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w [..., R, C]`` (any float dtype; upcast to float32) with one scale per group.

    Returns ``(qdata float8_e4m3fn [..., R, C], scale float32)`` with the scale layout of the
    module docstring. Formula: compressed-tensors ``calculate_qparams`` + ``_quantize``. ``amax``:
    an externally reduced per-group amax (float32, the group grid ``[..., ceil(R/gr),
    ceil(C/gc)]``, see the module docstring) used instead of ``w`` 's own. Under
    ``torch.compile``, shapes with partial groups run this same function as the opaque op
    ``oq_fp8::quantize_grouped`` (see :mod:`oq_plugin_fp8.ops`). Raises ``ValueError`` for fewer
    than 2 dims or an ``amax`` of another shape.
    """
    if amax is None and _opaque_under_compile(w.shape, g):
        from oq_plugin_fp8 import ops

        return ops.quantize_grouped(w, g.rows, g.cols, g.tensor_scale)
    return quantize_grouped_eager(w, g, amax)


def quantize_grouped_eager(
    w: torch.Tensor, g: Grouping, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_grouped` without the compile dispatch (the reference math itself)."""
    if w.dim() < 2:
        raise ValueError(f"expected at least a 2D tensor, got shape {tuple(w.shape)}")
    w = w.float()
    grid_scale = scale_from_amax(group_amax(w, g) if amax is None else check_amax(amax, w, g))
    # "+ 0.0" is compressed-tensors' symmetric zero point: it turns -0.0 into +0.0 (tiny negatives
    # that round to zero keep their sign), and its bytes are what we match
    scaled = w / expand_scale(grid_scale, w.shape, g) + 0.0
    q = scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    scale = grid_scale.squeeze(-1) if g.tensor_scale else grid_scale
    return q, scale.contiguous()


def dequantize_grouped(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, g: Grouping) -> torch.Tensor:
    """``qdata.float() * scale`` broadcast over the groups, cast to ``dtype``: ``[..., R, C]``.

    ``qdata`` float8_e4m3fn ``[..., R, C]``, ``scale`` float32 in the layout of the module
    docstring. Under ``torch.compile``, shapes with partial groups run as the opaque op
    ``oq_fp8::dequantize_grouped`` (same function; see :mod:`oq_plugin_fp8.ops`).
    """
    if _opaque_under_compile(qdata.shape, g):
        from oq_plugin_fp8 import ops

        return ops.dequantize_grouped(qdata, scale, dtype, g.rows, g.cols, g.tensor_scale)
    return dequantize_grouped_eager(qdata, scale, dtype, g)


def dequantize_grouped_eager(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, g: Grouping) -> torch.Tensor:
    """:func:`dequantize_grouped` without the compile dispatch."""
    s = expand_scale(_to_grid(scale, g).float(), qdata.shape, g)
    return (qdata.float() * s).to(dtype)


def grouping_of(key) -> Grouping:
    """The :class:`Grouping` of an fp8 :class:`oqcore.QuantKey`, read from its group shape (the one
    place the two conventions meet): per tensor -> the whole ``[R, C]``; per channel (vLLM's
    ``GroupShape(-1, 1)``: one scale per output channel of ``W [N, K]``) and per token
    (``GroupShape(1, -1)``) -> one row; a ``GroupShape(r, c)`` block or group -> ``r x c``."""
    gs = key.scale.group_shape
    if gs.is_per_tensor:
        return PER_TENSOR
    if gs.is_per_channel or gs.is_per_token:
        return Grouping(1, -1)
    return Grouping(gs.row, gs.col)


def compressed_tensors_args(key) -> dict:
    """The fp8 ``key`` as compressed-tensors ``QuantizationArgs`` fields: float 8-bit symmetric, the
    strategy of its grouping (``tensor``, ``channel`` for weights / ``token`` for activations,
    ``block`` 128x128, ``group`` 128), ``dynamic`` for keys whose scales are computed per call."""
    g = grouping_of(key)
    dynamic = not key.scale.static
    args: dict = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": dynamic}
    if g.tensor_scale:
        args["strategy"] = "tensor"
    elif (g.rows, g.cols) == (1, -1):
        args["strategy"] = "token" if dynamic else "channel"
    elif g.rows == 1:
        args.update(strategy="group", group_size=g.cols)
    else:
        args.update(strategy="block", block_structure=[g.rows, g.cols])
    return args


def reference_quantizer(g: Grouping):
    """The torch reference ``quantize(w, options) -> (qdata, scale)`` of grouping ``g``."""

    def quantize(w: torch.Tensor, options=None, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``w [..., R, C]`` -> ``(qdata float8_e4m3fn, scale float32)`` for this grouping (see the
        module docstring); ``amax``: an externally reduced per-group amax (the group grid)."""
        # the two-argument call when amax is absent: the v1 call, which tests may wrap
        return quantize_grouped(w, g) if amax is None else quantize_grouped(w, g, amax)

    return quantize


def reference_dequantizer(g: Grouping):
    """The reference ``dequantize(qdata, scale, dtype, options)`` of grouping ``g``."""

    def dequantize(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, options=None) -> torch.Tensor:
        """``qdata.float() * scale`` broadcast over this grouping's groups, cast to ``dtype``."""
        return dequantize_grouped(qdata, scale, dtype, g)

    return dequantize


def quantize_static_tensor(x: torch.Tensor, state, options=None) -> torch.Tensor:
    """``x [M, K]`` quantized with a stored per-tensor scale (``state["scale"]``, float32 ``[1]``):
    ``clamp(x / scale + 0.0, ±448)`` cast to float8_e4m3fn in float32, compressed-tensors' ``_quantize``
    with a calibrated ``input_scale`` (what vLLM's static ``scaled_fp8_quant`` computes, up to its
    multiplication by ``1 / scale``). Returns qdata float8_e4m3fn ``[M, K]``."""
    scale = state["scale"].float().reshape(())
    return (x.float() / scale + 0.0).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


# The reference quantizers by grouping (public names the tests and benchmarks use).
quantize_per_tensor, dequantize_per_tensor = reference_quantizer(PER_TENSOR), reference_dequantizer(PER_TENSOR)
quantize_per_channel, dequantize_per_channel = reference_quantizer(PER_CHANNEL), reference_dequantizer(PER_CHANNEL)
quantize_per_block, dequantize_per_block = reference_quantizer(BLOCK_128x128), reference_dequantizer(BLOCK_128x128)
quantize_per_token, dequantize_per_token = reference_quantizer(PER_TOKEN), reference_dequantizer(PER_TOKEN)
quantize_per_group, dequantize_per_group = reference_quantizer(GROUP_1x128), reference_dequantizer(GROUP_1x128)


def _by_name():
    from oq_plugin_fp8.keys import KEYS

    return {name: grouping_of(key) for name, (key, _, _) in KEYS.items()}


GROUPINGS: dict[str, Grouping] = _by_name()
"""Key name -> :class:`Grouping` (derived from the keys)."""

TORCH_QUANTIZERS = {name: (reference_quantizer(g), reference_dequantizer(g)) for name, g in GROUPINGS.items()}
"""Key name -> ``(quantize, dequantize)`` torch reference pair (derived)."""
