"""Helpers for the tests of quantizers that take an externally reduced amax (``takes_amax``).

Imported by name (``from amax_testutil import ...``) by tests/plugins/{fp8,int8,nvfp4}/test_*_amax.py.
The slicing here is what tensor parallelism does: cut ``w [*lead, N, K]`` along N or K on the
boundaries of the outermost scale level's groups, and give each slice the whole tensor's amax grid
restricted to the slice's groups (:func:`oqcore.groups.amax_grid`).
"""

from __future__ import annotations

import itertools

import torch

from oqcore.groups import amax_grid, weight_extent

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def cuts(length: int, group: int, pieces: int) -> list[tuple[int, int]] | None:
    """``pieces`` nonempty ``[start, stop)`` ranges covering ``[0, length)``, each a whole number of
    groups of ``group`` elements (the last group may be partial; ``group`` -1: the dim is one group,
    so any cut is allowed, as for a per-tensor scale). ``None`` when there are fewer groups than
    pieces."""
    g = 1 if group == -1 else group
    ngroups = -(-length // g)
    if ngroups < pieces:
        return None
    edges = [min(length, (ngroups * i // pieces) * g) for i in range(pieces + 1)]
    return list(itertools.pairwise(edges))


def group_range(start: int, stop: int, extent: int) -> slice:
    """The grid entries of elements ``[start, stop)`` along a dim whose groups have ``extent``
    elements (-1: one entry for the whole dim)."""
    if extent == -1:
        return slice(0, 1)
    return slice(start // extent, -(-stop // extent))


def slices(w: torch.Tensor, group, dim: int, pieces: int, cut_group: int | None = None):
    """``(w_slice, amax_slice, grid_index)`` for cutting ``w [*lead, N, K]`` into ``pieces`` along
    ``dim`` (-2: N, -1: K) on the boundaries of ``group`` (an :class:`oqcore.GroupShape`);
    ``amax_slice`` is the WHOLE tensor's amax grid restricted to the slice's groups (full-extent
    grid dims are kept whole), ``grid_index`` the index of those groups in the whole grid.
    ``cut_group`` overrides the element granularity of the cuts (e.g. 16 for nvfp4's K blocks).
    ``None`` when the dim has too few groups."""
    rows, cols = weight_extent(group)
    extent = rows if dim == -2 else cols
    whole = amax_grid(w, group)
    ranges = cuts(w.shape[dim], cut_group if cut_group is not None else extent, pieces)
    if ranges is None:
        return None
    out = []
    for a, b in ranges:
        idx = [slice(None)] * w.dim()
        idx[dim] = slice(a, b)
        gidx = [slice(None)] * w.dim()
        gidx[dim] = group_range(a, b, extent)
        out.append((w[tuple(idx)], whole[tuple(gidx)], tuple(gidx)))
    return out


SLICE_CASES = ("randn", "zero_part", "outlier", "underflow", "all_zero")
"""The inputs the slicing tests use (the ones where a slice's own amax differs from the whole's)."""


def inputs(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0, names=None) -> dict[str, torch.Tensor]:
    """Named inputs of ``shape`` in ``dtype``: random, zero rows and a zero quarter (a slice whose own
    amax is 0 while the whole tensor's is not), values so tiny that ``amax / qmax`` underflows
    (float32 only: the zero-scale rule), large outliers in one corner, and ``-0.0``; only those in
    ``names`` if given."""
    g = torch.Generator().manual_seed(seed)
    n, k = shape[-2], shape[-1]
    base = torch.randn(shape, generator=g)
    zero_rows = base.clone()
    zero_rows[..., ::3, :] = 0.0
    zero_part = base.clone()
    zero_part[..., : max(1, n // 4), :] = 0.0
    zero_part[..., :, : max(1, k // 4)] = 0.0
    outlier = base.clone()
    outlier[..., -1, -1] = 300.0
    neg_zero = base.clone()
    neg_zero[..., 1::2, :] = -0.0
    out = {"randn": base, "zero_rows": zero_rows, "zero_part": zero_part, "outlier": outlier, "neg_zero": neg_zero}
    tiny = torch.finfo(dtype).smallest_normal
    out["small"] = base * (tiny * 64)  # small, normal values
    out = {name: t.to(dtype) for name, t in out.items()}
    if dtype == torch.float32:
        out["underflow"] = (torch.randn(shape, generator=g) * 1e-44).to(dtype)  # amax / qmax == 0: eps scale
    out["all_zero"] = torch.zeros(shape, dtype=dtype)
    return out if names is None else {name: t for name, t in out.items() if name in names}


def u8(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a 1-byte tensor (float8 / uint8 / int8) or the bits of a float32 one, for
    bitwise comparison (``torch.equal`` on floats accepts ``-0.0 == 0.0`` and rejects NaN == NaN)."""
    if t.element_size() == 1:
        return t.view(torch.uint8)
    return t.contiguous().view(torch.int32) if t.dtype == torch.float32 else t


def poisoned(group, shape: tuple[int, ...]):
    """For every dtype and every non-finite value: ``(w_bad, amax_ok, w_ok, amax_bad)``: ``w_bad``
    holds it in its last element (with the amax grid of the clean tensor), ``w_ok`` is clean but
    ``amax_bad`` (as another rank's NaN / Inf reduced into it) holds it."""
    for dtype in DTYPES:
        for bad in (float("nan"), float("inf"), float("-inf")):
            w = torch.randn(shape).to(dtype)
            amax_ok = amax_grid(w, group)
            w_bad = w.clone()
            w_bad.view(-1)[-1] = bad
            yield w_bad, amax_ok, w, amax_grid(w_bad, group)
