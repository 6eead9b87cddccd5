"""Reading safetensors checkpoints tensor by tensor, without memory-mapping them.

The safetensors format (https://github.com/huggingface/safetensors#format) is an 8-byte little-endian
header length, a JSON header mapping each tensor name to ``dtype``, ``shape`` and ``data_offsets``
(relative to the end of the header), then the raw bytes. The ``safetensors`` library reads through
``mmap``: every page it touches stays mapped and counts in the process's resident memory until the
file is closed, so streaming a whole checkpoint through it would make the bf16 model resident after
all. Here each tensor is read with one ``readinto`` into its own freshly allocated buffer: the only
resident copy is the one the loader is about to quantize and free.

Large tensors are read in chunks by a few threads (``os.preadv`` releases the GIL): one thread
copies from the page cache at ~9 GB/s on this project's 2-core VM, two at ~15 GB/s. The loader also
asks the kernel to read ahead the next tensors (``posix_fadvise(WILLNEED)``) before it quantizes, so
a checkpoint not yet in the page cache is fetched from disk while the CPU quantizes; page cache is
not process memory, so this costs no resident memory.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from oqcore.errors import CheckpointError

# safetensors dtype tags -> torch dtypes (https://github.com/huggingface/safetensors, src/tensor.rs)
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: ``file``, byte ``offset`` from the file start, ``nbytes``, ``dtype``, ``shape``."""

    name: str
    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(file: Path) -> tuple[dict, int]:
    """Parse a safetensors header: ``(header dict, data start offset in bytes)``.

    Raises :class:`oqcore.CheckpointError` naming the file if it is missing, truncated or not safetensors.
    """
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{file}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{file}: not a safetensors file (header length {n} bytes is implausible)")
            header_bytes = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: checkpoint file does not exist") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read: {e}") from None
    if len(header_bytes) < n:
        raise CheckpointError(f"{file}: truncated safetensors header ({len(header_bytes)} of {n} bytes)")
    try:
        header = json.loads(header_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    return header, 8 + n


def file_entries(file: Path) -> list[TensorEntry]:
    """The tensors of one safetensors file, in file order, checked against the file's size."""
    header, start = read_header(file)
    size = file.stat().st_size
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = ST_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: corrupt header entry for tensor {name!r}: {info!r}") from None
        entry = TensorEntry(name, file, start + begin, end - begin, dtype, shape)
        if entry.nbytes != entry.numel * dtype.itemsize or start + end > size:
            raise CheckpointError(
                f"{file}: tensor {name!r} ({info['dtype']} {list(shape)}) does not fit the file: "
                f"bytes [{begin}, {end}) after the header, file is {size} bytes (truncated or corrupt)"
            )
        out.append(entry)
    return sorted(out, key=lambda e: e.offset)


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder: ``model.safetensors`` or the shards named by
    ``model.safetensors.index.json``. Raises :class:`oqcore.CheckpointError` naming what is missing."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: corrupt shard index: {e}") from None
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
        return files
    if single.is_file():
        return [single]
    others = sorted(p.name for p in path.glob("*.safetensors")) if path.is_dir() else []
    if len(others) == 1:
        return [path / others[0]]
    raise CheckpointError(
        f"{path}: no model.safetensors or model.safetensors.index.json"
        + (f" (found {', '.join(others)})" if others else "")
    )


def checkpoint_entries(path: Path) -> list[TensorEntry]:
    """Every tensor of the checkpoint in ``path``, file by file in storage order. Duplicate names
    across shards are a :class:`oqcore.CheckpointError`."""
    entries: list[TensorEntry] = []
    seen: dict[str, Path] = {}
    for f in checkpoint_files(path):
        for e in file_entries(f):
            if e.name in seen:
                raise CheckpointError(f"tensor {e.name!r} appears in both {seen[e.name]} and {f}")
            seen[e.name] = f
            entries.append(e)
    return entries


PARALLEL_READ_MIN_BYTES = 2 << 20
"""Tensors at least this large are split into one chunk per reading thread (4 KiB aligned)."""
CONVERT_CHUNK_BYTES = 4 << 20
"""Scratch size of converting reads (checkpoint dtype -> another floating dtype)."""


class TensorReader:
    """Reads :class:`TensorEntry` tensors straight into tensors, keeping files open.

    ``threads``: how many threads read a large tensor's chunks (default: torch's intra-op thread
    count, at most 4); 1 reads everything in the calling thread.
    """

    def __init__(self, threads: int | None = None) -> None:
        self._files: dict[Path, object] = {}
        self.threads = max(1, min(4, threads if threads is not None else torch.get_num_threads()))
        self._pool: ThreadPoolExecutor | None = None
        self._advised: dict[Path, int] = {}  # per file: end of the span already advised
        self._scratch: torch.Tensor | None = None  # raw bytes of converting reads, reused

    def read(self, entry: TensorEntry) -> torch.Tensor:
        """A new CPU tensor holding ``entry``'s bytes (never a view of a mapping)."""
        return self.read_into(entry, torch.empty(entry.shape, dtype=entry.dtype))

    def read_into(self, entry: TensorEntry, out: torch.Tensor) -> torch.Tensor:
        """Read ``entry``'s bytes straight into ``out`` (a contiguous CPU tensor of its shape and
        dtype, e.g. one expert's slice of a fused stack): no intermediate copy. Returns ``out``.

        ``out`` may have another floating dtype than a floating ``entry`` (an fp32 checkpoint loaded
        in bf16): the bytes then go through a small reused scratch buffer, chunk by chunk, and are
        converted into ``out`` (``Tensor.copy_`` rounding), never held whole in the checkpoint's dtype.
        """
        convert = out.dtype != entry.dtype and out.dtype.is_floating_point and entry.dtype.is_floating_point
        if tuple(out.shape) != entry.shape or (out.dtype != entry.dtype and not convert) or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"read_into({entry.name!r}): needs a contiguous CPU {entry.dtype} tensor of shape {list(entry.shape)}")
        if entry.numel == 0:
            return out
        if convert:
            return self._read_converting(entry, out)
        fd = self._fd(entry.file)
        buf = out.view(-1).view(torch.uint8).numpy()
        n = entry.nbytes
        try:
            got = self._read_chunks(fd, memoryview(buf), entry.offset)
        except OSError as e:
            raise CheckpointError(f"{entry.file}: cannot read tensor {entry.name!r}: {e}") from None
        if got != n:
            raise CheckpointError(f"{entry.file}: tensor {entry.name!r} is truncated ({got} of {n} bytes)")
        return out

    def _read_converting(self, entry: TensorEntry, out: torch.Tensor) -> torch.Tensor:
        fd = self._fd(entry.file)
        per = max(1, CONVERT_CHUNK_BYTES // entry.dtype.itemsize)
        if self._scratch is None or self._scratch.numel() < per * entry.dtype.itemsize:
            self._scratch = torch.empty(CONVERT_CHUNK_BYTES, dtype=torch.uint8)
        flat = out.view(-1)
        for a in range(0, entry.numel, per):
            b = min(a + per, entry.numel)
            raw = self._scratch[: (b - a) * entry.dtype.itemsize]
            try:
                got = self._read_chunks(fd, memoryview(raw.numpy()), entry.offset + a * entry.dtype.itemsize)
            except OSError as e:
                raise CheckpointError(f"{entry.file}: cannot read tensor {entry.name!r}: {e}") from None
            if got != raw.numel():
                done = a * entry.dtype.itemsize + got
                raise CheckpointError(f"{entry.file}: tensor {entry.name!r} is truncated ({done} of {entry.nbytes} bytes)")
            flat[a:b].copy_(raw.view(entry.dtype))
        return out

    def _read_chunks(self, fd: int, mv: memoryview, offset: int) -> int:
        """Fill ``mv`` from ``offset``: one chunk per thread for large reads. Bytes read."""
        n = len(mv)
        if self.threads == 1 or n < PARALLEL_READ_MIN_BYTES:
            return _pread_full(fd, mv, offset)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="oq-read")
        step = ((n + self.threads - 1) // self.threads + 4095) // 4096 * 4096
        chunks = [(a, min(a + step, n)) for a in range(0, n, step)]
        # the calling thread reads the first chunk itself while the pool reads the others
        futures = [self._pool.submit(_pread_full, fd, mv[a:b], offset + a) for a, b in chunks[1:]]
        try:
            got = _pread_full(fd, mv[: chunks[0][1]], offset)
        finally:
            wait(futures)  # never leave a thread writing into a buffer we no longer own
        return got + sum(f.result() for f in futures)

    def prefetch(self, entries: Iterable[TensorEntry]) -> None:
        """Ask the kernel to read these tensors' bytes into the page cache in the background
        (``POSIX_FADV_WILLNEED``; a no-op where unsupported). Costs no process memory.

        One call per file covers the entries' whole byte span, minus what was already advised."""
        advise = getattr(os, "posix_fadvise", None)
        if advise is None:
            return
        spans: dict[Path, tuple[int, int]] = {}
        for e in entries:
            lo, hi = spans.get(e.file, (e.offset, e.offset + e.nbytes))
            spans[e.file] = (min(lo, e.offset), max(hi, e.offset + e.nbytes))
        for file, (lo, hi) in spans.items():
            lo = max(lo, self._advised.get(file, 0))
            if hi <= lo:
                continue
            try:
                advise(self._fd(file), lo, hi - lo, os.POSIX_FADV_WILLNEED)
            except OSError:
                return
            self._advised[file] = hi

    def _fd(self, file: Path) -> int:
        f = self._files.get(file)
        if f is None:
            f = self._files[file] = open(file, "rb")  # noqa: SIM115 - closed in close()
        return f.fileno()

    def close(self) -> None:
        """Close every open file and stop the reading threads."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pread_full(fd: int, buf: memoryview, offset: int) -> int:
    """Read ``len(buf)`` bytes at ``offset`` into ``buf`` (retrying short reads); bytes read."""
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            break
        done += got
    return done


def iter_checkpoint(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of a checkpoint folder, one resident at a time."""
    with TensorReader() as reader:
        for e in checkpoint_entries(path):
            yield e.name, reader.read(e)
