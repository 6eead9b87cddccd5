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
import math
import os
import re
import struct
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from oqcore.errors import CheckpointError

# safetensors dtype tags -> torch dtypes (https://github.com/huggingface/safetensors, src/tensor.rs);
# the tags torch cannot hold (F4, F6_*) are refused as unknown.
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
ST_TAGS: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}
FLOAT8_TAGS = frozenset({"F8_E4M3", "F8_E5M2", "F8_E8M0"})
"""The 8-bit float storage tags: no high-precision checkpoint holds such a tensor."""
MAX_HEADER_BYTES = 100 * 1024 * 1024
"""The safetensors library's own limit on the JSON header."""
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


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
        return math.prod(self.shape)

    @property
    def is_float8(self) -> bool:
        """Whether the tensor is stored as an 8-bit float (:data:`FLOAT8_TAGS`)."""
        return self.tag in FLOAT8_TAGS

    @property
    def tag(self) -> str:
        """The safetensors dtype tag (``"BF16"``)."""
        return ST_TAGS.get(self.dtype, str(self.dtype))

    def describe(self) -> str:
        """``"BF16 [160, 96]"``: dtype tag and shape, for messages."""
        return f"{self.tag} {list(self.shape)}"


# ---- strict JSON ------------------------------------------------------------------------------


class _BadJson(ValueError):
    """JSON that Python's parser accepts but the spec does not (NaN/Infinity, a key given twice)."""


def _no_constant(name: str):
    raise _BadJson(f"{name} is not valid JSON (NaN and Infinity are not allowed)")


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _BadJson(f"key {k!r} appears twice")
        out[k] = v
    return out


def json_problem(data: bytes | str) -> tuple[object, str | None]:
    """``(parsed value, None)`` for strict JSON (RFC 8259: no NaN/Infinity, no key given twice in
    one object), else ``(None, what is wrong)``."""
    try:
        if isinstance(data, bytes):
            data = data.decode("utf-8")
        return json.loads(data, parse_constant=_no_constant, object_pairs_hook=_unique_pairs), None
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text ({e})"
    except _BadJson as e:
        return None, str(e)
    except (json.JSONDecodeError, RecursionError) as e:
        return None, f"not valid JSON ({e})"


def parse_json(data: bytes | str, where: str) -> object:
    """Parse strict JSON (see :func:`json_problem`); ``where`` names the file in the
    :class:`oqcore.CheckpointError` raised on anything else."""
    obj, problem = json_problem(data)
    if problem is not None:
        raise CheckpointError(f"{where}: {problem}")
    return obj


def read_json_object(file: Path, what: str) -> dict:
    """The JSON object in ``file`` (``what`` says what the file is, for messages).

    Raises :class:`oqcore.CheckpointError` naming the file when it is missing, a directory,
    unreadable, empty, not UTF-8, not strict JSON, or not a JSON object at the top.
    """
    file = Path(file)
    if not file.exists():
        raise CheckpointError(f"{file} does not exist: {what}")
    if not file.is_file():
        raise CheckpointError(f"{file} is not a regular file (a directory?): {what} must be a JSON file")
    try:
        data = file.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read: {e}") from None
    if not data.strip():
        raise CheckpointError(f"{file} is empty: {what} must be a JSON object")
    obj = parse_json(data, str(file))
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file} holds a JSON {_json_type(obj)}, not an object: {what} must be a JSON object {{...}}")
    return obj


def _json_type(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "list"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---- safetensors headers ----------------------------------------------------------------------


def read_header(file: Path) -> tuple[dict, int]:
    """Parse a safetensors header: ``(header dict, data start offset in bytes)``.

    Checks the 8-byte length against the file's size and that the header is a strict JSON object
    whose ``__metadata__`` (if any) maps strings to strings. Raises :class:`oqcore.CheckpointError`
    naming the file if it is missing, a directory, truncated or not safetensors.
    """
    file = Path(file)
    if file.exists() and not file.is_file():
        raise CheckpointError(f"{file} is not a regular file (a directory?): expected a safetensors file")
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(
                    f"{file}: not a safetensors file ({len(raw)} bytes, shorter than the 8-byte header length)"
                )
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{file}: not a safetensors file (header length {n} bytes is implausible; the format allows "
                    f"at most {MAX_HEADER_BYTES})"
                )
            if 8 + n > size:
                raise CheckpointError(
                    f"{file}: header length {n} bytes reaches past the end of the file ({size} bytes): "
                    "truncated or not a safetensors file"
                )
            header_bytes = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: checkpoint file does not exist") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read: {e}") from None
    if len(header_bytes) < n:
        raise CheckpointError(f"{file}: truncated safetensors header ({len(header_bytes)} of {n} bytes)")
    header, problem = json_problem(header_bytes)
    if problem is not None:
        raise CheckpointError(f"{file}: corrupt safetensors header: {problem}")
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{file}: corrupt safetensors header (a JSON {_json_type(header)}, not an object): it must be a JSON "
            "object mapping tensor names to {dtype, shape, data_offsets}"
        )
    meta = header.get("__metadata__")
    if meta is not None or "__metadata__" in header:
        if not isinstance(meta, dict):
            raise CheckpointError(
                f"{file}: safetensors header field '__metadata__' is a JSON {_json_type(meta)}; it must be an "
                "object mapping strings to strings"
            )
        for k, v in meta.items():
            if not isinstance(v, str):
                raise CheckpointError(
                    f"{file}: safetensors header field '__metadata__' maps {k!r} to a JSON {_json_type(v)}; "
                    "its values must be strings"
                )
    return header, 8 + n


def _entry(file: Path, name: str, info: object, start: int, data_size: int) -> TensorEntry:
    """One header entry, checked on its own (dtype tag, shape, offsets, byte count, inside the file)."""
    at = f"{file}: tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{at}: header entry is a JSON {_json_type(info)}; it must be an object with dtype, shape, data_offsets")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise CheckpointError(f"{at}: header entry has no {', '.join(missing)} (it needs dtype, shape, data_offsets)")
    tag = info["dtype"]
    if not isinstance(tag, str) or tag not in ST_DTYPES:
        raise CheckpointError(f"{at}: unknown dtype {tag!r}; valid: {', '.join(ST_DTYPES)}")
    shape = info["shape"]
    if not isinstance(shape, list):
        raise CheckpointError(f"{at}: shape is a JSON {_json_type(shape)}; it must be a list of non-negative integers")
    bad = [d for d in shape if not _is_int(d) or d < 0]
    if bad:
        raise CheckpointError(f"{at}: shape {shape!r} has dimension {bad[0]!r}; dimensions must be non-negative integers")
    offsets = info["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(x) for x in offsets):
        raise CheckpointError(f"{at}: data_offsets {offsets!r} must be a list of two integers [begin, end]")
    begin, end = offsets
    if begin < 0 or end < 0:
        raise CheckpointError(f"{at}: data_offsets {offsets!r} are negative; they must satisfy 0 <= begin <= end")
    if end < begin:
        raise CheckpointError(f"{at}: data_offsets {offsets!r} are reversed; they must satisfy 0 <= begin <= end")
    dtype = ST_DTYPES[tag]
    entry = TensorEntry(name, file, start + begin, end - begin, dtype, tuple(shape))
    want = entry.numel * dtype.itemsize
    if entry.nbytes != want:
        raise CheckpointError(
            f"{at}: data_offsets {offsets!r} hold {entry.nbytes} bytes, but {tag} {shape} needs "
            f"{entry.numel} x {dtype.itemsize} = {want} bytes"
        )
    if end > data_size:
        raise CheckpointError(
            f"{at} ({tag} {shape}) does not fit the file: bytes [{begin}, {end}) after the header, but only "
            f"{data_size} data bytes follow it (truncated or corrupt)"
        )
    return entry


def file_entries(file: Path) -> list[TensorEntry]:
    """The tensors of one safetensors file, in file order, each checked against the format and the
    file: known dtype tag, a shape of non-negative integers, ``0 <= begin <= end`` offsets holding
    exactly ``numel * itemsize`` bytes inside the file, and no two tensors sharing a byte (gaps
    between tensors are allowed). Raises :class:`oqcore.CheckpointError` naming the file and tensor."""
    file = Path(file)
    header, start = read_header(file)
    size = file.stat().st_size
    out = [_entry(file, name, info, start, size - start) for name, info in header.items() if name != "__metadata__"]
    out.sort(key=lambda e: (e.offset, e.nbytes))
    prev: TensorEntry | None = None
    for e in out:
        if e.nbytes == 0:
            continue
        if prev is not None and e.offset < prev.offset + prev.nbytes:
            a, b = prev.offset - start, e.offset - start
            raise CheckpointError(
                f"{file}: tensors {prev.name!r} (bytes [{a}, {a + prev.nbytes})) and {e.name!r} (bytes [{b}, "
                f"{b + e.nbytes})) overlap; every tensor needs its own bytes"
            )
        prev = e
    return out


# ---- model folders and shard indexes -----------------------------------------------------------


def check_model_folder(path: object) -> Path:
    """``path`` as a :class:`~pathlib.Path` to an existing directory.

    Raises :class:`oqcore.CheckpointError` naming it when it is not a path, does not exist or is
    not a directory.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"model path must be a folder path (str or Path), got {type(path).__name__} {path!r}")
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such folder (a model folder holds config.json and safetensors weights)")
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a folder (a model folder holds config.json and safetensors weights)")
    return p


def _inside(folder: Path, target: Path) -> bool:
    """Whether ``target`` (resolved) is inside ``folder`` (resolved) or, for a Hugging Face hub
    cache snapshot (``.../snapshots/<rev>/``), inside that repository's ``blobs`` folder, where the
    hub keeps the files its snapshot symlinks point to."""
    root = folder.resolve()
    t = target.resolve()
    if t.is_relative_to(root):
        return True
    if root.parent.name == "snapshots":
        return t.is_relative_to(root.parent.parent / "blobs")
    return False


def read_index(path: Path) -> dict[str, Path]:
    """``{tensor name: shard file}`` from ``path/model.safetensors.index.json``.

    The index must be a JSON object whose ``weight_map`` maps tensor names (strings) to shard file
    names (strings) relative to the folder; a shard named by an absolute path, with ``..`` leaving
    the folder, or through a symlink resolving outside it (except a Hugging Face cache snapshot's
    links into its ``blobs`` folder) is refused, as is a shard that does not exist. Raises
    :class:`oqcore.CheckpointError` naming the index and the entry.
    """
    index = Path(path) / INDEX_NAME
    obj = read_json_object(index, "the shard index of a sharded checkpoint")
    if "weight_map" not in obj:
        raise CheckpointError(f"{index}: no 'weight_map' field (it must map each tensor name to its shard file)")
    weight_map = obj["weight_map"]
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{index}: field 'weight_map' is a JSON {_json_type(weight_map)}; it must be an object mapping tensor "
            "names to shard file names"
        )
    if not weight_map:
        raise CheckpointError(f"{index}: field 'weight_map' is empty: the index names no tensor")
    meta = obj.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise CheckpointError(f"{index}: field 'metadata' is a JSON {_json_type(meta)}; it must be an object")
    out: dict[str, Path] = {}
    checked: dict[str, Path] = {}
    for name, shard in weight_map.items():
        at = f"{index}: weight_map[{name!r}]"
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{at} is {shard!r}; it must be a shard file name (a non-empty string)")
        if shard not in checked:
            rel = Path(shard)
            if rel.is_absolute() or shard.startswith(("/", "\\")) or re.match(r"[A-Za-z]:[\\/]", shard):
                raise CheckpointError(f"{at} = {shard!r} is an absolute path; shards must be files inside {path}")
            if ".." in re.split(r"[\\/]", shard):
                raise CheckpointError(f"{at} = {shard!r} uses '..'; shards must be files inside {path}, named without '..'")
            f = Path(path) / rel
            if not f.exists():
                raise CheckpointError(f"{index} names shard(s) that do not exist: {f} ({at})")
            if not _inside(Path(path), f):
                raise CheckpointError(
                    f"{at} = {shard!r} resolves to {f.resolve()}, outside the model folder {path} (a symlink?); "
                    "shards must be files inside the folder"
                )
            if not f.is_file():
                raise CheckpointError(f"{at} = {shard!r} is not a regular file (a directory?)")
            checked[shard] = f
        out[name] = checked[shard]
    return out


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder: the shards named by ``model.safetensors.index.json``
    (validated by :func:`read_index`), else ``model.safetensors``, else the folder's only
    ``*.safetensors`` file. Raises :class:`oqcore.CheckpointError` naming what is missing or wrong."""
    path = check_model_folder(path)
    single = path / SINGLE_NAME
    if uses_index(path):
        return list(dict.fromkeys(read_index(path).values()))
    if single.exists():
        if not single.is_file():
            raise CheckpointError(f"{single} is not a regular file (a directory?): expected the safetensors weights")
        return [single]
    others = sorted(p.name for p in path.glob("*.safetensors") if p.is_file())
    if len(others) == 1:
        return [path / others[0]]
    if others:
        raise CheckpointError(
            f"{path}: no model.safetensors or model.safetensors.index.json (found {', '.join(others)}: "
            "which one is meant? add a model.safetensors.index.json)"
        )
    legacy = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack") or p.name.endswith(".bin.index.json"))
    raise CheckpointError(
        f"{path}: no model.safetensors or model.safetensors.index.json"
        + (
            f" (found {', '.join(legacy)}: oqcore reads safetensors only, since pickled checkpoints can run "
            "code; convert it, e.g. load it with transformers and save_pretrained(safe_serialization=True))"
            if legacy
            else ""
        )
    )


def uses_index(path: Path) -> bool:
    """Whether the folder's weights are the shards of ``model.safetensors.index.json``: only when
    there is no ``model.safetensors``. As in transformers (``_get_resolved_checkpoint_files``), a
    single ``model.safetensors`` wins over an index next to it, which is then not read at all."""
    path = Path(path)
    return (path / INDEX_NAME).exists() and not (path / SINGLE_NAME).exists()


def checkpoint_entries(path: Path) -> list[TensorEntry]:
    """Every tensor of the checkpoint in ``path``, file by file in storage order, every header
    checked (:func:`file_entries`). A name in two shards is a :class:`oqcore.CheckpointError`; so
    is, for a sharded checkpoint, any disagreement between the index's ``weight_map`` and the
    shards' headers (a tensor the index maps to one shard but found in another, or in none, or a
    tensor a shard holds that the index does not list)."""
    path = check_model_folder(path)
    index = path / INDEX_NAME
    weight_map = read_index(path) if uses_index(path) else None
    files = list(dict.fromkeys(weight_map.values())) if weight_map is not None else checkpoint_files(path)
    entries: list[TensorEntry] = []
    seen: dict[str, Path] = {}
    for f in files:
        for e in file_entries(f):
            if e.name in seen:
                raise CheckpointError(f"tensor {e.name!r} appears in both {seen[e.name]} and {f}")
            seen[e.name] = f
            entries.append(e)
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in seen:
                raise CheckpointError(f"{index}: weight_map maps tensor {name!r} to {shard.name}, but no shard holds it")
            if seen[name] != shard:
                raise CheckpointError(
                    f"{index}: weight_map maps tensor {name!r} to {shard.name}, but it is in {seen[name].name}"
                )
        extra = [n for n in seen if n not in weight_map]
        if extra:
            raise CheckpointError(
                f"{index}: weight_map does not list tensor {extra[0]!r} held by {seen[extra[0]]}"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            )
    return entries


PARALLEL_READ_MIN_BYTES = 2 << 20
"""Reads at least this large are split into one chunk per reading thread (4 KiB aligned)."""
PARALLEL_RUN_MIN_BYTES = 64 << 10
"""A slice whose byte runs average less than this is read in the calling thread only: with small
runs the per-run Python work, not the copy, bounds the speed, and threads would contend for the GIL."""
CONVERT_CHUNK_BYTES = 4 << 20
"""Scratch size of converting reads (checkpoint dtype -> another floating dtype)."""
PREFETCH_MAX_GAP = 64 << 10
"""Read-ahead hints join byte ranges of one file less than this apart (the kernel reads ahead that
much anyway): fewer system calls."""
PREFETCH_MAX_SPANS = 1024
"""A sliced tensor needing more read-ahead ranges than this is advised as its one covering range."""


class ReadableEntry(Protocol):
    """What :class:`TensorReader` reads: a whole :class:`TensorEntry`, or a rank's slice of one,
    :class:`oqcore.loading.slices.SlicedEntry` (which also gives its byte runs: ``iter_runs(lo,
    hi)``, ``run_count``, ``file_spans(max_gap, max_spans)``)."""

    @property
    def name(self) -> str:
        """The checkpoint key."""

    @property
    def file(self) -> Path:
        """The safetensors file holding it."""

    @property
    def dtype(self) -> torch.dtype:
        """Its stored dtype."""

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape read (a slice's local shape)."""

    @property
    def numel(self) -> int:
        """Elements read."""

    @property
    def nbytes(self) -> int:
        """Bytes read from the file."""


def _runs(entry: ReadableEntry, lo: int, hi: int) -> Iterator[tuple[int, int, int]]:
    """``(file offset, length, destination offset)`` runs of ``entry``'s bytes ``[lo, hi)``: one
    for a whole tensor, the slice's own runs for a sliced one (a SlicedEntry, duck-typed: its module
    imports this one)."""
    if isinstance(entry, TensorEntry):
        if hi > lo:
            yield entry.offset + lo, hi - lo, lo
    else:
        yield from entry.iter_runs(lo, hi)


def _label(entry: ReadableEntry) -> str:
    """``"tensor 'w'"``, plus the slice for a sliced entry, for messages."""
    if isinstance(entry, TensorEntry):
        return f"tensor {entry.name!r}"
    return f"tensor {entry.name!r} (slice {entry.describe()})"


class TensorReader:
    """Reads :class:`TensorEntry` tensors, or a rank's slices of them
    (:class:`oqcore.loading.slices.SlicedEntry`), straight into tensors, keeping files open.

    ``threads``: how many threads read a large tensor's chunks (default: torch's intra-op thread
    count, at most 4); 1 reads everything in the calling thread. ``bytes_read`` counts the bytes
    taken from the files so far (a slice costs its own bytes only, never the whole tensor's).
    """

    def __init__(self, threads: int | None = None) -> None:
        self._files: dict[Path, object] = {}
        self.threads = max(1, min(4, threads if threads is not None else torch.get_num_threads()))
        self._pool: ThreadPoolExecutor | None = None
        self._advised: set[tuple] = set()  # the entries already given to prefetch
        self._scratch: torch.Tensor | None = None  # raw bytes of converting reads, reused
        self.bytes_read = 0

    def read(self, entry: ReadableEntry) -> torch.Tensor:
        """A new CPU tensor holding ``entry``'s bytes (never a view of a mapping); for a
        :class:`~oqcore.loading.slices.SlicedEntry`, its local shape."""
        return self.read_into(entry, torch.empty(entry.shape, dtype=entry.dtype))

    def read_into(self, entry: ReadableEntry, out: torch.Tensor) -> torch.Tensor:
        """Read ``entry``'s bytes straight into ``out`` (a contiguous CPU tensor of its shape and
        dtype, e.g. one expert's slice of a fused stack): no intermediate copy. Returns ``out``.

        ``entry`` may be a rank's slice (:class:`~oqcore.loading.slices.SlicedEntry`): only its
        byte runs are read (``pread`` per run, large runs split across the threads), into ``out``
        of its local shape.

        ``out`` may have another floating dtype than a floating ``entry`` (an fp32 checkpoint loaded
        in bf16): the bytes then go through a small reused scratch buffer, chunk by chunk, and are
        converted into ``out`` (``Tensor.copy_`` rounding), never held whole in the checkpoint's dtype.

        Raises ``ValueError`` for an ``out`` that does not fit (a caller's bug), and
        :class:`oqcore.CheckpointError` naming the file and tensor when the file cannot be read or
        ends before the tensor's bytes do.
        """
        convert = out.dtype != entry.dtype and out.dtype.is_floating_point and entry.dtype.is_floating_point
        if tuple(out.shape) != tuple(entry.shape) or (out.dtype != entry.dtype and not convert) or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"read_into({entry.name!r}): needs a contiguous CPU {entry.dtype} tensor of shape {list(entry.shape)}")
        if entry.numel == 0:
            return out
        if convert:
            return self._read_converting(entry, out)
        self._read_window(entry, memoryview(out.view(-1).view(torch.uint8).numpy()), 0, entry.nbytes)
        return out

    def _read_converting(self, entry: ReadableEntry, out: torch.Tensor) -> torch.Tensor:
        item = entry.dtype.itemsize
        per = max(1, CONVERT_CHUNK_BYTES // item)
        if self._scratch is None or self._scratch.numel() < per * item:
            self._scratch = torch.empty(CONVERT_CHUNK_BYTES, dtype=torch.uint8)
        flat = out.view(-1)
        for a in range(0, entry.numel, per):
            b = min(a + per, entry.numel)
            raw = self._scratch[: (b - a) * item]
            self._read_window(entry, memoryview(raw.numpy()), a * item, b * item)
            flat[a:b].copy_(raw.view(entry.dtype))
        return out

    def _read_window(self, entry: ReadableEntry, mv: memoryview, lo: int, hi: int) -> None:
        """Fill ``mv`` with bytes ``[lo, hi)`` of ``entry`` (of its contiguous local tensor), one
        chunk per thread for large windows of large runs. Raises :class:`oqcore.CheckpointError`."""
        fd = self._fd(entry.file)
        n = hi - lo
        mean_run = entry.nbytes if isinstance(entry, TensorEntry) else entry.nbytes / max(1, entry.run_count)
        try:
            if self.threads == 1 or n < PARALLEL_READ_MIN_BYTES or mean_run < PARALLEL_RUN_MIN_BYTES:
                got = _read_runs(fd, _runs(entry, lo, hi), mv, lo)
            else:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="oq-read")
                step = ((n + self.threads - 1) // self.threads + 4095) // 4096 * 4096
                chunks = [(a, min(a + step, n)) for a in range(0, n, step)]
                # the calling thread reads the first chunk itself while the pool reads the others
                futures = [self._pool.submit(_read_runs, fd, _runs(entry, lo + a, lo + b), mv[a:b], lo + a) for a, b in chunks[1:]]
                try:
                    got = _read_runs(fd, _runs(entry, lo, lo + chunks[0][1]), mv[: chunks[0][1]], lo)
                finally:
                    wait(futures)  # never leave a thread writing into a buffer we no longer own
                got += sum(f.result() for f in futures)
        except OSError as e:
            raise CheckpointError(f"{entry.file}: cannot read {_label(entry)}: {e}") from None
        self.bytes_read += got
        if got != n:
            raise CheckpointError(f"{entry.file}: {_label(entry)} is truncated ({lo + got} of {entry.nbytes} bytes)")

    def prefetch(self, entries: Iterable[ReadableEntry]) -> None:
        """Ask the kernel to read these tensors' bytes into the page cache in the background
        (``POSIX_FADV_WILLNEED``; a no-op where unsupported). Costs no process memory.

        Each entry is advised once per reader. A slice advises only its byte runs (runs less than
        :data:`PREFETCH_MAX_GAP` apart joined), or its covering range when that would take more
        than :data:`PREFETCH_MAX_SPANS` calls; ranges of one file less than ``PREFETCH_MAX_GAP``
        apart are joined into one call."""
        advise = getattr(os, "posix_fadvise", None)
        if advise is None:
            return
        spans: dict[Path, list[tuple[int, int]]] = {}
        for e in entries:
            whole = isinstance(e, TensorEntry)
            key = (e.file, e.offset, e.nbytes) if whole else (e.file, e.entry.offset, e.dim, e.ranges)
            if key in self._advised:
                continue
            self._advised.add(key)
            if whole:
                if e.nbytes:
                    spans.setdefault(e.file, []).append((e.offset, e.offset + e.nbytes))
            else:
                spans.setdefault(e.file, []).extend(e.file_spans(PREFETCH_MAX_GAP, PREFETCH_MAX_SPANS))
        for file, ranges in spans.items():
            ranges.sort()
            joined: list[list[int]] = []
            for lo, hi in ranges:
                if joined and lo - joined[-1][1] < PREFETCH_MAX_GAP:
                    joined[-1][1] = max(joined[-1][1], hi)
                else:
                    joined.append([lo, hi])
            fd = self._fd(file)
            for lo, hi in joined:
                try:
                    advise(fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)
                except OSError:
                    return

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


def _read_runs(fd: int, runs: Iterable[tuple[int, int, int]], mv: memoryview, base: int) -> int:
    """Read each run ``(file offset, length, destination offset)`` into ``mv`` (which starts at
    destination offset ``base``); stops at the first short read. Bytes read."""
    done = 0
    preadv = os.preadv  # looked up once: with small runs the per-run Python work is the cost
    for off, n, dst in runs:
        a = dst - base
        got = preadv(fd, [mv[a : a + n]], off)
        if got != n and got > 0:  # a short read: retry the rest
            got += _pread_full(fd, mv[a + got : a + n], off + got)
        done += max(got, 0)
        if got != n:
            break
    return done


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
