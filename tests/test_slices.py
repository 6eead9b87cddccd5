"""A rank's slice of a safetensors tensor, read by file offsets (oqcore.loading.slices.SlicedEntry and
TensorReader): the bytes equal safetensors' own tensor sliced with torch, for every dtype, shape, dim
and rank; only the slice's bytes are read; bad slices are CheckpointErrors naming the tensor."""

from __future__ import annotations

import dataclasses
import os
import re
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

import oqcore.loading.checkpoint as ck
from oqcore import CheckpointError
from oqcore.loading.checkpoint import ST_DTYPES, TensorReader, file_entries
from oqcore.loading.slices import ByteRun, SlicedEntry, shard_ranges
from tests.battery.util import raises_naming

SHAPES = {"v": (13,), "m": (9, 7), "t": (5, 6, 7)}
"""1-D, 2-D and 3-D tensors of odd (and one even) sizes."""
RANKS = [(2, 0), (2, 1), (4, 0), (4, 1), (4, 3)]
"""(world, rank): the first and last rank of 2, the first, a middle and the last rank of 4."""


def bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s ``[start, stop)`` of ``size`` split in ``world`` near-equal parts (never empty for size >= world)."""
    return rank * size // world, (rank + 1) * size // world


def plain(size: int, rank: int, world: int) -> tuple[tuple[int, int], ...]:
    return (bounds(size, rank, world),)


def packed(size: int, rank: int, world: int) -> tuple[tuple[int, int], ...]:
    """The same share of each half ``[0, h)`` and ``[h, size)`` (a gate|up weight: two ranges)."""
    h = size // 2
    a, b = bounds(h, rank, world)
    c, d = bounds(size - h, rank, world)
    return (a, b), (h + c, h + d)


def torch_slice(t: torch.Tensor, dim: int, ranges) -> torch.Tensor:
    return torch.cat([t.narrow(dim, a, b - a) for a, b in ranges], dim)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def random_tensor(shape, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Random bytes of every value (NaNs and all, compared as bytes); bool as 0/1."""
    n = 1
    for d in shape:
        n *= d
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def cases(shape):
    """(dim, ranges) for every dim: every rank of RANKS, plain and packed (when each half holds
    ``world`` indices), the whole dimension, and both ends (whose runs continue from one row into
    the next one's)."""
    for dim, size in enumerate(shape):
        yield dim, ((0, size),)
        yield dim, ((0, 1), (size - 1, size))
        for world, rank in RANKS:
            if size >= world:
                yield dim, plain(size, rank, world)
            if size // 2 >= world:
                yield dim, packed(size, rank, world)


@pytest.mark.parametrize("tag", list(ST_DTYPES))
def test_slices_equal_safetensors_sliced_with_torch(tmp_path, tag):
    dtype = ST_DTYPES[tag]
    g = torch.Generator().manual_seed(len(tag))
    path = tmp_path / "model.safetensors"
    save_file({k: random_tensor(s, dtype, g) for k, s in SHAPES.items()}, str(path))
    ref = load_file(str(path))
    entries = {e.name: e for e in file_entries(path)}
    n = 0
    with TensorReader(threads=2) as reader:
        for name, shape in SHAPES.items():
            for dim, ranges in cases(shape):
                s = SlicedEntry(entries[name], dim, ranges)
                want = torch_slice(ref[name], dim, ranges)
                got = reader.read(s)
                assert got.dtype == dtype and tuple(got.shape) == tuple(want.shape) == s.shape, (name, dim, ranges)
                assert torch.equal(as_bytes(got), as_bytes(want)), (name, dim, ranges)
                # into a caller's buffer (e.g. a stack's row): the same bytes, in place
                out = torch.empty(s.shape, dtype=dtype)
                assert reader.read_into(s, out) is out and torch.equal(as_bytes(out), as_bytes(want))
                n += 1
    # 12 slices of v, 21 of m (12 along dim 0, 9 along dim 1), 27 of t (9 along each dim)
    assert n == 60


def expected_runs(s: SlicedEntry) -> list[tuple[int, int, int]]:
    """The runs, computed independently: each local element's file offset (the whole tensor's
    offsets sliced with torch), grouped while consecutive."""
    e = s.entry
    item = e.dtype.itemsize
    offs = e.offset + torch.arange(e.numel, dtype=torch.int64).reshape(e.shape) * item
    flat = torch_slice(offs, s.dim, s.ranges).reshape(-1).tolist()
    runs: list[list[int]] = []
    for i, f in enumerate(flat):
        if runs and runs[-1][0] + runs[-1][1] == f:
            runs[-1][1] += item
        else:
            runs.append([f, item, i * item])
    return [tuple(r) for r in runs]


@pytest.fixture(scope="module")
def layout_entries(tmp_path_factory):
    path = tmp_path_factory.mktemp("slices") / "model.safetensors"
    save_file(
        {
            "pad": torch.zeros(3, dtype=torch.uint8),  # the tensors do not start at the data's start
            "v": torch.zeros(13, dtype=torch.bfloat16),
            "m": torch.zeros(9, 7, dtype=torch.float32),
            "t": torch.zeros(5, 6, 7, dtype=torch.float16),
            "w": torch.zeros(4, 8, dtype=torch.int32),
            "z": torch.zeros(0, 4, dtype=torch.float32),
        },
        str(path),
    )
    return {e.name: e for e in file_entries(path)}


def test_runs_are_the_element_offsets_grouped(layout_entries):
    for name in ("v", "m", "t"):
        for dim, ranges in cases(layout_entries[name].shape):
            s = SlicedEntry(layout_entries[name], dim, ranges)
            runs = s.runs()
            assert [tuple(r) for r in runs] == expected_runs(s), (name, dim, ranges)
            assert s.run_count == len(runs) and sum(r.length for r in runs) == s.nbytes
            lo, hi = s.span
            assert lo == runs[0].file_offset and hi == runs[-1].file_offset + runs[-1].length


def test_run_counts_follow_the_layout(layout_entries):
    m, t, w = layout_entries["m"], layout_entries["t"], layout_entries["w"]
    # a dim-0 slice is one run, at the rows' offset
    assert SlicedEntry(m, 0, [(3, 6)]).runs() == [ByteRun(m.offset + 3 * 7 * 4, 3 * 7 * 4, 0)]
    # a dim-1 slice of [N, K] is N runs
    assert SlicedEntry(m, 1, [(2, 5)]).run_count == 9
    # a packed dim-0 slice is two runs; touching ranges are one
    assert SlicedEntry(m, 0, [(0, 2), (5, 7)]).run_count == 2
    assert SlicedEntry(m, 0, [(0, 2), (2, 7)]).runs() == [ByteRun(m.offset, 7 * 7 * 4, 0)]
    # the whole tensor, in any number of touching ranges along any dim, is one run
    assert SlicedEntry(t, 2, [(0, 3), (3, 7)]).runs() == [ByteRun(t.offset, t.nbytes, 0)]
    # packed gate|up rows of a 3-D expert stack [E, 2I, H]: two runs per expert
    assert SlicedEntry(t, 1, packed(6, 0, 2)).run_count == 2 * 5
    # a row's last range is adjacent to the next row's first, in the file and in dst: merged
    runs = SlicedEntry(w, 1, [(0, 1), (7, 8)]).runs()
    assert len(runs) == 4 + 1 and runs[1] == ByteRun(w.offset + 7 * 4, 2 * 4, 4)
    # an empty tensor has no runs
    z = SlicedEntry(layout_entries["z"], 1, [(1, 3)])
    assert z.shape == (0, 2) and z.nbytes == 0 and z.runs() == [] and z.run_count == 0


def test_windows_of_the_runs_tile_the_slice(layout_entries):
    """``iter_runs(lo, hi)`` (what each reading thread and each conversion chunk reads) is the
    runs clipped to the window, for windows cutting runs anywhere."""
    for name, dim, ranges in [
        ("t", 1, packed(6, 1, 2)),
        ("t", 2, plain(7, 1, 4)),
        ("m", 1, [(0, 1), (6, 7)]),
        ("v", 0, [(2, 11)]),
    ]:
        s = SlicedEntry(layout_entries[name], dim, ranges)
        item = s.dtype.itemsize
        byte_map = [f + k for f, n, _ in expected_runs(s) for k in range(n)]  # file offset of each slice byte
        for lo in range(0, s.nbytes, item):
            for hi in (lo + item, lo + 3 * item, lo + 17 * item, s.nbytes):
                got = [f + k for f, n, _ in s.iter_runs(lo, hi) for k in range(n)]
                assert got == byte_map[lo:hi], (name, dim, ranges, lo, hi)
                dst = [d + k for _, n, d in s.iter_runs(lo, hi) for k in range(n)]
                assert dst == list(range(lo, min(hi, s.nbytes)))


def test_sliced_entry_mirrors_a_tensor_entry(layout_entries):
    t = layout_entries["t"]
    s = SlicedEntry(t, -2, [[1, 2], [4, 6]])  # negative dim and lists, as torch users write them
    assert s.dim == 1 and s.ranges == ((1, 2), (4, 6))
    assert (s.name, s.file, s.dtype, s.tag, s.is_float8) == ("t", t.file, torch.float16, "F16", False)
    assert s.shape == (5, 3, 7) and s.full_shape == (5, 6, 7)
    assert s.numel == 105 and s.nbytes == 210 and s.nbytes < t.nbytes
    assert s.describe() == "F16 [5, 6, 7] dim 1 [1, 2) + [4, 6)"
    assert hash(s) == hash(SlicedEntry(t, 1, ((1, 2), (4, 6))))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.dim = 0


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_large_slices_are_read_by_threads(tmp_path, threads, monkeypatch):
    """Big runs split across the threads (the 2 MiB threshold lowered to 4 KiB), windows cutting
    runs anywhere: still the torch slice byte for byte."""
    monkeypatch.setattr(ck, "PARALLEL_READ_MIN_BYTES", 4096)
    monkeypatch.setattr(ck, "PARALLEL_RUN_MIN_BYTES", 64)
    g = torch.Generator().manual_seed(1)
    tensors = {"w": torch.randn(301, 67, generator=g), "e": torch.randn(6, 50, 33, generator=g).bfloat16()}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    entries = {e.name: e for e in file_entries(path)}
    with TensorReader(threads=threads) as reader:
        for name, dim, ranges in [
            ("w", 0, plain(301, 1, 2)),
            ("w", 1, packed(67, 0, 2)),
            ("e", 1, packed(50, 1, 4)),
            ("e", 2, plain(33, 3, 4)),
        ]:
            got = reader.read(SlicedEntry(entries[name], dim, ranges))
            assert torch.equal(got, torch_slice(tensors[name], dim, ranges)), (name, dim, ranges)


@pytest.mark.parametrize(
    ("src", "dst"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16)]
)
def test_converting_reads_of_slices(tmp_path, monkeypatch, src, dst):
    """A slice read into another floating dtype, through a scratch smaller than the slice (chunks
    ending mid-run): equal to the torch slice converted with ``Tensor.to``."""
    monkeypatch.setattr(ck, "CONVERT_CHUNK_BYTES", 256)
    g = torch.Generator().manual_seed(2)
    tensors = {"w": torch.randn(37, 29, generator=g).to(src), "e": (torch.randn(3, 10, 9, generator=g) * 1e3).to(src)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    entries = {e.name: e for e in file_entries(path)}
    with TensorReader(threads=2) as reader:
        for name, shape in (("w", (37, 29)), ("e", (3, 10, 9))):
            for dim, ranges in cases(shape):
                s = SlicedEntry(entries[name], dim, ranges)
                got = reader.read_into(s, torch.full(s.shape, float("nan"), dtype=dst))
                want = torch_slice(tensors[name], dim, ranges).to(dst)
                assert torch.equal(got, want), (name, dim, ranges)


def test_only_the_slice_bytes_are_read(tmp_path, monkeypatch):
    """Every byte the reader takes from the file (counted on ``os.preadv``) lies in the slice's
    runs, and they add up to its ``nbytes``: the whole tensor is never read."""
    monkeypatch.setattr(ck, "PARALLEL_READ_MIN_BYTES", 4096)
    monkeypatch.setattr(ck, "PARALLEL_RUN_MIN_BYTES", 64)
    calls: list[tuple[int, int]] = []
    lock = threading.Lock()
    real = os.preadv

    def counting(fd, buffers, offset):
        got = real(fd, buffers, offset)
        with lock:
            calls.append((offset, got))
        return got

    monkeypatch.setattr(os, "preadv", counting)
    g = torch.Generator().manual_seed(3)
    tensors = {"w": torch.randn(128, 96, generator=g), "e": torch.randn(4, 64, 48, generator=g).bfloat16()}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    entries = {e.name: e for e in file_entries(path)}
    for name, dim, ranges, dtype in [
        ("w", 0, plain(128, 1, 4), torch.float32),
        ("w", 1, plain(96, 3, 4), torch.float32),
        ("e", 1, packed(64, 1, 2), torch.bfloat16),
        ("e", 2, plain(48, 0, 2), torch.bfloat16),
        ("e", 1, packed(64, 0, 4), torch.float32),  # converting
        ("w", 1, packed(96, 1, 2), torch.bfloat16),  # converting
    ]:
        s = SlicedEntry(entries[name], dim, ranges)
        calls.clear()
        with TensorReader(threads=2) as reader:
            out = reader.read_into(s, torch.empty(s.shape, dtype=dtype))
            assert reader.bytes_read == s.nbytes
        assert torch.equal(out, torch_slice(tensors[name], dim, ranges).to(dtype))
        assert sum(got for _, got in calls) == s.nbytes < entries[name].nbytes
        allowed = {f + k for f, n, _ in s.runs() for k in range(n)}
        touched = [off + k for off, got in calls for k in range(got)]
        assert len(touched) == len(set(touched)) and set(touched) == allowed, (name, dim, ranges)


def test_prefetch_advises_the_slice_runs(tmp_path, monkeypatch):
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: calls.append((off, off + n)), raising=False)
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(64, 40), "e": torch.zeros(4, 32, 48, dtype=torch.bfloat16)}, str(path))
    entries = {e.name: e for e in file_entries(path)}
    s = SlicedEntry(entries["e"], 1, packed(32, 1, 2))
    monkeypatch.setattr(ck, "PREFETCH_MAX_GAP", 0)
    with TensorReader() as reader:
        reader.prefetch([s])
        assert calls == [(r.file_offset, r.file_offset + r.length) for r in s.runs()] and len(calls) == 8
        calls.clear()
        reader.prefetch([s])  # advised once per reader
        assert calls == []
        # a whole entry is one range, as before
        reader.prefetch([entries["a"]])
        assert calls == [(entries["a"].offset, entries["a"].offset + entries["a"].nbytes)]
    # runs closer than the gap are joined: here into the slice's covering range
    monkeypatch.setattr(ck, "PREFETCH_MAX_GAP", 64 << 10)
    calls.clear()
    with TensorReader() as reader:
        reader.prefetch([s])
    assert calls == [s.span] and s.span[1] - s.span[0] < entries["e"].nbytes
    # more runs than PREFETCH_MAX_SPANS: the covering range, one call
    monkeypatch.setattr(ck, "PREFETCH_MAX_GAP", 0)
    monkeypatch.setattr(ck, "PREFETCH_MAX_SPANS", 4)
    calls.clear()
    with TensorReader() as reader:
        reader.prefetch([s])
    assert calls == [s.span]


def test_a_truncated_file_names_the_sliced_tensor(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(200, 100)}, str(path))
    (e,) = file_entries(path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1000)
    with TensorReader() as reader:
        reader.read(SlicedEntry(e, 0, [(0, 100)]))  # the first half is all there
        with raises_naming(CheckpointError, str(path), "'w'", "truncated (39000 of 40000 bytes)"):
            reader.read(SlicedEntry(e, 0, [(100, 200)]))
        # the file ends at row 197, column 50: the slice's rows 197..199 are missing (3 x 50 x 4 bytes)
        with raises_naming(CheckpointError, str(path), "'w'", "dim 1 [50, 100)", "truncated (39400 of 40000 bytes)"):
            reader.read_into(SlicedEntry(e, 1, [(50, 100)]), torch.empty(200, 50, dtype=torch.bfloat16))


@pytest.mark.parametrize(
    ("dim", "ranges", "culprits"),
    [
        (2, [(0, 1)], ["slice dim 2", "[-2, 1]"]),
        (-3, [(0, 1)], ["slice dim -3", "[-2, 1]"]),
        (True, [(0, 1)], ["slice dim True"]),
        ("0", [(0, 1)], ["slice dim '0'"]),
        (0, [], ["no slice ranges", "size 9"]),
        (0, "01", ["'01'", "(start, stop)"]),
        (0, [(0, 1, 2)], ["(0, 1, 2)", "pair of integers"]),
        (1, [(0, 1.5)], ["(0, 1.5)", "pair of integers"]),
        (1, [(3, 3)], ["[3, 3)", "empty", "start < stop"]),
        (1, [(5, 2)], ["[5, 2)", "empty"]),
        (0, [(-1, 2)], ["[-1, 2)", "out of bounds", "[0, 9)"]),
        (1, [(0, 8)], ["[0, 8)", "out of bounds", "[0, 7)"]),
        (0, [(0, 4), (3, 6)], ["[3, 6)", "overlaps", "[0, 4)", "disjoint and sorted"]),
        (0, [(5, 6), (0, 2)], ["[0, 2)", "comes before", "[5, 6)"]),
    ],
)
def test_bad_slices_name_the_tensor(layout_entries, dim, ranges, culprits):
    m = layout_entries["m"]
    with raises_naming(CheckpointError, str(m.file), "tensor 'm'", "F32 [9, 7]", *culprits):
        SlicedEntry(m, dim, ranges)


def test_a_scalar_cannot_be_sliced(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"s": torch.tensor(1.0)}, str(path))
    (e,) = file_entries(path)
    with raises_naming(CheckpointError, str(path), "tensor 's'", "scalar"):
        SlicedEntry(e, 0, [(0, 1)])


def chunk_of(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s ``torch.chunk`` (empty when ``torch.chunk`` gives fewer than ``world`` chunks)."""
    parts = torch.chunk(t, world, dim)
    return parts[rank] if rank < len(parts) else t.narrow(dim, 0, 0)


def test_shard_ranges_are_torch_chunks_and_strided_chunks(tmp_path):
    """``shard_ranges`` gives DTensor's Shard (``torch.chunk``) and, with ``split_factor``, its
    _StridedShard (each of ``k`` groups chunked): read through SlicedEntry, equal to torch's chunks."""
    g = torch.Generator().manual_seed(4)
    t = torch.randn(2, 11, 10, generator=g)
    path = tmp_path / "model.safetensors"
    save_file({"t": t}, str(path))
    (e,) = file_entries(path)
    with TensorReader() as reader:
        for dim in (1, 2):
            for world in (1, 2, 3, 4):
                for rank in range(world):
                    for k in (1, 2):
                        ranges = shard_ranges(t.shape[dim], rank, world, k)
                        want = torch.cat([chunk_of(grp, dim, rank, world) for grp in torch.chunk(t, k, dim)], dim)
                        if not ranges:
                            assert want.numel() == 0, (dim, world, rank, k)
                            continue
                        got = reader.read(SlicedEntry(e, dim, ranges))
                        assert torch.equal(got, want), (dim, world, rank, k, ranges)
    assert shard_ranges(8, 1, 2, split_factor=2) == ((2, 4), (6, 8))  # gate|up rows of rank 1 of 2
    assert shard_ranges(7, 1, 2) == ((4, 7),) and shard_ranges(5, 3, 4) == () and shard_ranges(0, 0, 2) == ()


def test_shard_ranges_match_transformers_shard_on_read():
    """The same intervals as transformers' shard-on-read for Shard / _StridedShard placements (its
    interval helpers use no instance state, hence ``None`` for ``self``)."""
    sharding = pytest.importorskip("transformers.distributed.sharding_utils")
    op = getattr(sharding, "DtensorShardOperation", None)
    if op is None or not hasattr(op, "_compute_strided_slice"):
        pytest.skip("this transformers has no DtensorShardOperation interval helpers")
    for size in range(13):
        for world in range(1, 6):
            for k in (1, 2, 3):
                for rank in range(world):
                    if k == 1:
                        ref = op._compute_contiguous_slice(None, [(0, size)], rank, world)
                    else:
                        ref = op._compute_strided_slice(None, [(0, size)], rank, world, k)
                    want = tuple((a, b) for a, b in ref if b > a)
                    assert shard_ranges(size, rank, world, k) == want, (size, world, k, rank)


@pytest.mark.parametrize(
    ("args", "culprit"),
    [
        ((8, 2, 2), "rank=2"),
        ((8, 0, 0), "world=0"),
        ((8, 0, 2, 0), "split_factor=0"),
        ((-1, 0, 2), "size=-1"),
        ((8.0, 0, 2), "size=8.0"),
    ],
)
def test_shard_ranges_refuse_bad_arguments(args, culprit):
    with pytest.raises(ValueError, match=re.escape(culprit)):
        shard_ranges(*args)
