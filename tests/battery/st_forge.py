"""Forging safetensors files byte by byte, for the checkpoint battery.

A safetensors file is an 8-byte little-endian header length, the JSON header, then the data bytes.
:func:`forge` writes exactly what it is given (any header text, any length field), so a test can
produce every malformed file a real writer never would.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

TAGS = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
}


def forge(path: Path, header: dict | list | str | bytes, data: bytes = b"", *, length: int | None = None) -> Path:
    """Write ``path`` as: ``length`` (default: the header's byte length) as 8 bytes little endian,
    the header (a JSON-serializable value, or raw ``bytes`` written as they are), then ``data``."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    Path(path).write_bytes(struct.pack("<Q", n) + raw + data)
    return Path(path)


def header_of(path: Path) -> tuple[dict, bytes]:
    """``(header dict, data bytes)`` of a real safetensors file."""
    blob = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def pack(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> tuple[dict, bytes]:
    """A correct ``(header, data)`` for ``tensors`` in order, contiguous from offset 0."""
    header: dict = {} if metadata is None else {"__metadata__": metadata}
    chunks, at = [], 0
    for name, t in tensors.items():
        b = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": TAGS[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + len(b)]}
        chunks.append(b)
        at += len(b)
    return header, b"".join(chunks)


def rewrite(path: Path, change) -> Path:
    """Apply ``change(header, data)`` to a real file: it edits ``header`` in place, or returns a new
    ``(header, data)`` tuple (any other return value is ignored)."""
    header, data = header_of(path)
    out = change(header, data)
    if isinstance(out, tuple):
        header, data = out
    return forge(path, header, data)


def replace_tensor(path: Path, name: str, value: torch.Tensor) -> Path:
    """Rewrite ``path`` with tensor ``name`` replaced by ``value`` (any dtype/shape), appended at
    the end of the data (the old bytes stay as an unreferenced gap, which the format allows)."""

    def change(header, data):
        b = value.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b""
        header[name] = {"dtype": TAGS[value.dtype], "shape": list(value.shape), "data_offsets": [len(data), len(data) + len(b)]}
        return header, data + b

    return rewrite(path, change)


def add_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Rewrite ``path`` with ``tensors`` appended."""
    for name, t in tensors.items():
        replace_tensor(path, name, t)
    return path
