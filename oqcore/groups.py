"""Scale groups as regions of a weight: which elements share a scale, and their amax.

A :class:`oqcore.GroupShape` is written in vLLM's conventions, where per-channel weight scales are
``(-1, 1)`` although the elements sharing one scale are a *row* of the ``[N, K]`` weight. Code that
cuts weights into pieces (tensor parallelism, :mod:`oqcore.parallel`) needs the geometric region;
:func:`weight_extent` gives it, :func:`amax_grid` the max ``|w|`` of every group. No scheme math
here: what a scale is made from an amax is each plugin's business.
"""

from __future__ import annotations

import torch

from oqcore.keys import GroupShape, QuantKey, ScaleDesc


def weight_extent(group: GroupShape) -> tuple[int, int]:
    """``(rows, cols)`` of the elements of a weight ``[N, K]`` that share one scale of ``group``;
    -1 = the full extent. vLLM's per-channel ``(-1, 1)`` is one scale per output row: ``(1, -1)``."""
    if group.is_per_channel:
        return 1, -1
    return group.row, group.col


def scale_levels(key: QuantKey) -> list[ScaleDesc]:
    """The key's scale levels, innermost first: ``[scale]`` or ``[scale, scale2]``."""
    return [key.scale] if key.scale2 is None else [key.scale, key.scale2]


def outer_level(key: QuantKey) -> ScaleDesc:
    """The key's outermost scale level (``scale2`` when it has one, else ``scale``): the level whose
    amax a sharded quantizer receives (:attr:`oqcore.QuantizerImpl.takes_amax`)."""
    return key.scale2 if key.scale2 is not None else key.scale


def grid_shape(shape: tuple[int, ...], group: GroupShape) -> tuple[int, ...]:
    """The scale grid of a weight of ``shape`` (``[*lead, N, K]``) for ``group``:
    ``[*lead, ceil(N / rows), ceil(K / cols)]``, a full extent giving 1."""
    rows, cols = weight_extent(group)
    *lead, n, k = shape
    return (*lead, 1 if rows == -1 else -(-n // rows), 1 if cols == -1 else -(-k // cols))


def amax_grid(w: torch.Tensor, group: GroupShape) -> torch.Tensor:
    """Max ``|w|`` of every group of ``group`` in ``w [*lead, N, K]``, float32, shaped
    :func:`grid_shape` (per tensor ``[*lead, 1, 1]``, per channel ``[*lead, N, 1]``, 128x128
    blocks ``[*lead, ceil(N/128), ceil(K/128)]``; edge groups are partial). NaN propagates (the
    loader refuses non-finite weights before this runs). Exact: max and min round nothing; taken
    as ``max(-min, max)`` over each group, so no ``|w|`` temporary the size of ``w`` is made."""
    rows, cols = weight_extent(group)
    *lead, n, k = w.shape
    r = n if rows == -1 else rows
    c = k if cols == -1 else cols
    x = w.detach()
    if n % r or k % c:  # partial edge groups: pad (|w| >= 0 and -|w| <= 0, so zeros change no max)
        x = torch.nn.functional.pad(x, (0, -k % c, 0, -n % r))
    v = x.reshape(*lead, x.shape[-2] // r, r, x.shape[-1] // c, c)
    if r == 1:
        v = v.squeeze(-3)
        lo, hi = torch.aminmax(v, dim=-1)
    else:
        lo, hi = v.amin(dim=(-3, -1)), v.amax(dim=(-3, -1))
    return torch.maximum(-lo, hi).float()
