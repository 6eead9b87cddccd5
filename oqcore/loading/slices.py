"""A rank's slice of a checkpoint tensor, read by file offsets (tensor-parallel loading).

Under tensor parallelism each rank holds only its shard of a weight, so it reads only that shard's
bytes from the safetensors file, never the whole tensor. A :class:`SlicedEntry` is the
concatenation along one dimension ``dim`` of index ranges ``[start, stop)`` of a
:class:`~oqcore.loading.checkpoint.TensorEntry`: one range for a plain shard (rows
``[r*N/w, (r+1)*N/w)`` of rank ``r`` of ``w``), two for a "packed" shard (a fused gate|up weight
``[2I, H]`` whose rank ``r`` owns rows ``[r*I/w, (r+1)*I/w)`` of the gate half and the same rows of
the up half, ``[I + r*I/w, I + (r+1)*I/w)``).

A safetensors tensor is stored C-contiguous (row-major), so such a slice is a set of contiguous
byte runs of the file: with ``outer = prod(shape[:dim])`` and ``inner = prod(shape[dim+1:]) *
itemsize`` bytes per index along ``dim``, outer index ``o`` and range ``[a, b)`` give the run at
``offset + (o * shape[dim] + a) * inner`` of ``(b - a) * inner`` bytes. A dim-0 slice is one run; a
dim-1 slice of ``[N, K]`` is ``N`` runs; runs adjacent in the file and in the destination merge.
:class:`oqcore.loading.checkpoint.TensorReader` reads a :class:`SlicedEntry` run by run straight
into a contiguous tensor of its local shape.
"""

from __future__ import annotations

import math

from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from oqcore.errors import CheckpointError
from oqcore.loading.checkpoint import TensorEntry


class ByteRun(NamedTuple):
    """One contiguous piece of a slice: ``length`` bytes at byte ``file_offset`` of the file (from
    the file's start) go to byte ``dst_offset`` of the slice's contiguous local tensor."""

    file_offset: int
    length: int
    dst_offset: int


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class SlicedEntry:
    """Index ranges of ``entry`` along ``dim``, concatenated: a rank's shard of a checkpoint tensor.

    ``entry``: the whole tensor (:class:`~oqcore.loading.checkpoint.TensorEntry`). ``dim``: the
    sliced dimension (a negative ``dim`` counts from the end, as in torch, and is stored
    normalised). ``ranges``: one or more ``(start, stop)`` index ranges ``[start, stop)`` along
    ``dim``, non-empty, inside ``[0, shape[dim])``, sorted and disjoint (touching is fine); lists
    are accepted and stored as tuples. The slice equals
    ``torch.cat([t.narrow(dim, a, b - a) for a, b in ranges], dim)`` of the whole tensor ``t``.

    It has the attributes a loader uses of a ``TensorEntry`` (``name``, ``file``, ``dtype``,
    ``shape`` (the local shape), ``numel``, ``nbytes`` (the bytes actually read), ``tag``,
    ``is_float8``, ``describe()``), so it can be read in place of one.

    Raises :class:`oqcore.CheckpointError` naming the file and tensor, what was asked and what
    would be valid, for a ``dim`` out of range (or a scalar tensor), no ranges, a range that is not
    two integers, empty, out of bounds, or overlapping / out of order with the previous one.
    """

    entry: TensorEntry
    dim: int
    ranges: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        e = self.entry
        if not isinstance(e, TensorEntry):
            raise CheckpointError(
                f"SlicedEntry.entry must be a TensorEntry (a checkpoint tensor), got {type(e).__name__}"
            )
        at = f"{e.file}: tensor {e.name!r} ({e.describe()})"
        nd = len(e.shape)
        if nd == 0:
            raise CheckpointError(f"{at} is a scalar: it has no dimension to slice (slice dim {self.dim!r} asked)")
        if not _is_int(self.dim) or not -nd <= self.dim < nd:
            raise CheckpointError(
                f"{at}: slice dim {self.dim!r} is not a dimension of it; valid: an integer in [{-nd}, {nd - 1}]"
            )
        dim = self.dim % nd
        size = e.shape[dim]
        raw = self.ranges
        if isinstance(raw, (str, bytes)) or not isinstance(raw, (tuple, list)):
            raise CheckpointError(
                f"{at}: slice ranges {raw!r} must be a sequence of (start, stop) index pairs along dim {dim} (size {size})"
            )
        if not raw:
            raise CheckpointError(
                f"{at}: no slice ranges given; give one or more [start, stop) ranges along dim {dim} (size {size})"
            )
        ranges: list[tuple[int, int]] = []
        for r in raw:
            if not isinstance(r, (tuple, list)) or len(r) != 2 or not all(_is_int(x) for x in r):
                raise CheckpointError(
                    f"{at}: slice range {r!r} along dim {dim} must be a pair of integers (start, stop)"
                )
            a, b = r
            if a >= b:
                raise CheckpointError(
                    f"{at}: slice range [{a}, {b}) along dim {dim} is empty; a range needs start < stop"
                )
            if a < 0 or b > size:
                raise CheckpointError(
                    f"{at}: slice range [{a}, {b}) along dim {dim} is out of bounds; ranges must lie in [0, {size})"
                )
            if ranges and a < ranges[-1][1]:
                pa, pb = ranges[-1]
                how = "overlaps" if b > pa and a < pb else "comes before"
                raise CheckpointError(
                    f"{at}: slice range [{a}, {b}) along dim {dim} {how} the previous range [{pa}, {pb}); ranges must be "
                    "disjoint and sorted by start"
                )
            ranges.append((a, b))
        object.__setattr__(self, "dim", dim)
        object.__setattr__(self, "ranges", tuple(ranges))

    # ---- what a loader uses of a TensorEntry ---------------------------------------------------

    @property
    def name(self) -> str:
        """The checkpoint tensor's name."""
        return self.entry.name

    @property
    def file(self) -> Path:
        """The safetensors file holding the tensor."""
        return self.entry.file

    @property
    def dtype(self) -> torch.dtype:
        """The stored dtype."""
        return self.entry.dtype

    @property
    def full_shape(self) -> tuple[int, ...]:
        """The whole tensor's shape."""
        return self.entry.shape

    @property
    def shape(self) -> tuple[int, ...]:
        """The local (sliced) shape: ``full_shape`` with ``dim`` replaced by the ranges' total length."""
        s = list(self.entry.shape)
        s[self.dim] = sum(b - a for a, b in self.ranges)
        return tuple(s)

    @property
    def numel(self) -> int:
        """Number of local elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the slice: exactly the bytes a read takes from the file."""
        return self.numel * self.entry.dtype.itemsize

    @property
    def tag(self) -> str:
        """The safetensors dtype tag (``"BF16"``)."""
        return self.entry.tag

    @property
    def is_float8(self) -> bool:
        """Whether the tensor is stored as an 8-bit float."""
        return self.entry.is_float8

    def describe(self) -> str:
        """``"BF16 [160, 96] dim 0 [0, 80)"``: dtype tag, whole shape and the slice, for messages."""
        return f"{self.entry.describe()} dim {self.dim} " + " + ".join(f"[{a}, {b})" for a, b in self.ranges)

    # ---- byte runs -----------------------------------------------------------------------------

    def _layout(self) -> tuple[int, int, list[tuple[int, int]], int]:
        """``(outer, inner bytes, merged ranges, local bytes per outer index)``: touching ranges
        merged, since they are one run."""
        shape = self.entry.shape
        outer = 1
        for d in shape[: self.dim]:
            outer *= d
        inner = self.entry.dtype.itemsize
        for d in shape[self.dim + 1 :]:
            inner *= d
        merged: list[tuple[int, int]] = []
        for a, b in self.ranges:
            if merged and merged[-1][1] == a:
                merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        per = sum(b - a for a, b in merged) * inner
        return outer, inner, merged, per

    @property
    def run_count(self) -> int:
        """How many byte runs :meth:`runs` gives (computed, not enumerated); 0 for an empty slice."""
        outer, _, merged, per = self._layout()
        if outer == 0 or per == 0:
            return 0
        if merged == [(0, self.entry.shape[self.dim])]:
            return 1
        wraps = merged[0][0] == 0 and merged[-1][1] == self.entry.shape[self.dim]
        return outer * len(merged) - (outer - 1 if wraps else 0)

    @property
    def span(self) -> tuple[int, int]:
        """``(first byte, end byte)`` of the file range covering every run (an empty slice: ``(offset, offset)``)."""
        outer, inner, merged, per = self._layout()
        if outer == 0 or per == 0:
            return self.entry.offset, self.entry.offset
        row = self.entry.shape[self.dim] * inner
        return self.entry.offset + merged[0][0] * inner, self.entry.offset + (outer - 1) * row + merged[-1][1] * inner

    def iter_runs(self, lo: int = 0, hi: int | None = None) -> Iterator[tuple[int, int, int]]:
        """The contiguous byte runs ``(file_offset, length, dst_offset)`` of the slice bytes
        ``[lo, hi)`` (default: all), as plain tuples (no per-run object: a reader walks millions),
        in destination order, clipped to that window (``dst_offset`` stays relative to the whole
        slice); runs adjacent both in the file and in the destination are merged. Memory O(1): a
        slice of a million rows is never listed whole unless asked (:meth:`runs`)."""
        nbytes = self.nbytes
        hi = nbytes if hi is None else min(hi, nbytes)
        lo = max(0, lo)
        if hi <= lo:
            return
        _, inner, merged, per = self._layout()
        base = self.entry.offset
        size = self.entry.shape[self.dim]
        row = size * inner
        if merged == [(0, size)]:  # the whole tensor: one run
            yield base + lo, hi - lo, lo
            return
        # one outer index's runs: (file offset in the row, length, local offset in the row)
        pattern = []
        acc = 0
        for a, b in merged:
            pattern.append((a * inner, (b - a) * inner, acc))
            acc += (b - a) * inner
        k = len(pattern)
        o, within = divmod(lo, per)
        i = bisect_right([p[2] for p in pattern], within) - 1
        # a row's last run continues into the next row's first one only if the ranges touch both
        # ends of the dimension; then runs are merged as they come (rare: never for even shards)
        wraps = merged[0][0] == 0 and merged[-1][1] == size
        pending: list[int] | None = None
        dst = lo
        while dst < hi:
            fa, n, da = pattern[i]
            skip = dst - o * per - da  # bytes of this run before the window
            f = base + o * row + fa + skip
            n -= skip
            if dst + n > hi:
                n = hi - dst
            if not wraps:
                yield f, n, dst
            elif pending is not None and pending[0] + pending[1] == f:
                pending[1] += n
            else:
                if pending is not None:
                    yield tuple(pending)
                pending = [f, n, dst]
            dst += n
            i += 1
            if i == k:
                i = 0
                o += 1
        if pending is not None:
            yield tuple(pending)

    def runs(self) -> list[ByteRun]:
        """Every contiguous byte run of the slice as :class:`ByteRun` ``(file_offset, length,
        dst_offset)``, in destination order (see :meth:`iter_runs`); their lengths sum to
        :attr:`nbytes`."""
        return [ByteRun(*r) for r in self.iter_runs()]

    def file_spans(self, max_gap: int = 0, max_spans: int | None = None) -> list[tuple[int, int]]:
        """File byte ranges ``(start, end)`` covering the runs, runs less than ``max_gap`` bytes
        apart joined into one range; if that gives more than ``max_spans`` ranges, the single
        covering :attr:`span` instead (what a read-ahead hint wants: few system calls)."""
        if self.run_count == 0:
            return []
        outer, inner, merged, _ = self._layout()
        size = self.entry.shape[self.dim]
        gaps = [(merged[i + 1][0] - merged[i][1]) * inner for i in range(len(merged) - 1)]
        if outer > 1:
            gaps.append((size - merged[-1][1] + merged[0][0]) * inner)
        if max(gaps, default=0) < max_gap:  # every gap is joined: no need to walk the runs
            return [self.span]
        out: list[tuple[int, int]] = []
        for f, n, _ in self.iter_runs():
            if out and f - out[-1][1] < max_gap:
                out[-1] = (out[-1][0], f + n)
            else:
                out.append((f, f + n))
                if max_spans is not None and len(out) > max_spans:
                    return [self.span]
        return out


def _chunk(size: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of chunk ``rank`` of ``torch.chunk(range(size), world)`` (empty past the end)."""
    c = size // world if size % world == 0 else -(-size // world)
    start = min(c * rank, size)
    return start, min(start + c, size)


def shard_ranges(size: int, rank: int, world: int, split_factor: int = 1) -> tuple[tuple[int, int], ...]:
    """The index ranges along one dimension of ``size`` that rank ``rank`` of ``world`` holds, as
    :class:`SlicedEntry` takes them, following torch's DTensor placements (so a DTensor built from
    the local shard has the intended global layout):

    - ``split_factor=1``: ``Shard(dim)``, ``torch.chunk`` semantics: chunks of ``ceil(size /
      world)`` (``size / world`` when it divides), the last ranks' shorter or empty.
    - ``split_factor=k``: ``_StridedShard(dim, split_factor=k)``, a "packed" weight (gate|up:
      ``k=2``): the dimension cut in ``k`` groups of ``ceil(size / k)``, each group chunked as
      above; the rank's chunks of every group, in order (two ranges for gate|up).

    These are the intervals transformers' shard-on-read computes
    (``transformers.distributed.sharding_utils.DtensorShardOperation``, v5). Empty chunks are
    left out, so a rank holding nothing gets ``()`` (nothing to read; no :class:`SlicedEntry`).
    Raises ``ValueError`` (a caller's bug, not bad input) unless ``size >= 0``, ``world >= 1``,
    ``0 <= rank < world`` and ``split_factor >= 1`` are integers.
    """
    args = {"size": size, "rank": rank, "world": world, "split_factor": split_factor}
    bad = [f"{k}={v!r}" for k, v in args.items() if not _is_int(v)]
    if bad or size < 0 or world < 1 or not 0 <= rank < world or split_factor < 1:
        raise ValueError(
            f"shard_ranges({', '.join(f'{k}={v!r}' for k, v in args.items())}): needs integers size >= 0, world >= 1, "
            "0 <= rank < world, split_factor >= 1"
        )
    width = -(-size // split_factor)
    out: list[tuple[int, int]] = []
    for g in range(split_factor):
        g0 = g * width
        n = min(g0 + width, size) - g0
        if n <= 0:
            continue
        a, b = _chunk(n, rank, world)
        if b > a:
            out.append((g0 + a, g0 + b))
    return tuple(out)
