"""Shared checks of the bad-input battery: the error type, the culprit named in the message, and
that a model an operation failed on is bit-identical (same bytes at the same data_ptr) afterwards."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
from torch import nn


@dataclass(frozen=True)
class _Entry:
    data_ptr: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    data: torch.Tensor | None  # a CPU copy of the bytes (None for meta tensors)


def snapshot(model: nn.Module) -> dict[str, _Entry]:
    """Every parameter and buffer of ``model`` (duplicates included): data_ptr, dtype, shape and a
    copy of its bytes, plus the module tree's types (so a swapped submodule is noticed)."""
    out: dict[str, _Entry] = {}
    for kind, items in (("p", model.named_parameters(remove_duplicate=False)), ("b", model.named_buffers(remove_duplicate=False))):
        for name, t in items:
            if t is None:
                continue
            data = None if t.is_meta else t.detach().cpu().contiguous().view(torch.uint8).clone() if t.numel() else t.detach().cpu().clone()
            out[f"{kind}:{name}"] = _Entry(t.data_ptr() if not t.is_meta else 0, t.dtype, tuple(t.shape), data)
    for name, m in model.named_modules():
        out[f"m:{name}"] = _Entry(id(m), torch.uint8, (), None)
    return out


def assert_unchanged(model: nn.Module, before: dict[str, _Entry]) -> None:
    """Assert every parameter, buffer and submodule of ``model`` is as in ``before`` (bit for bit,
    same data_ptr, same module objects)."""
    after = snapshot(model)
    assert after.keys() == before.keys(), f"tensors/modules changed: +{sorted(after.keys() - before.keys())[:5]} -{sorted(before.keys() - after.keys())[:5]}"
    for k, b in before.items():
        a = after[k]
        assert (a.data_ptr, a.dtype, a.shape) == (b.data_ptr, b.dtype, b.shape), f"{k} moved or changed layout"
        if b.data is not None:
            assert torch.equal(a.data, b.data), f"{k} changed value"


def raises_naming(exc_type: type[BaseException], *culprits: str):
    """``pytest.raises(exc_type)`` that also asserts each of ``culprits`` appears in the message
    (plain substrings), for use as ``with raises_naming(CheckpointError, "model.safetensors", "q_proj"):``."""
    return _RaisesNaming(exc_type, culprits)


class _RaisesNaming:
    def __init__(self, exc_type, culprits):
        self.exc_type, self.culprits = exc_type, culprits
        self._cm = pytest.raises(exc_type)

    def __enter__(self):
        self.info = self._cm.__enter__()
        return self.info

    def __exit__(self, *exc):
        suppressed = self._cm.__exit__(*exc)
        if suppressed:
            msg = str(self.info.value)
            assert type(self.info.value) is not Exception
            for c in self.culprits:
                assert c in msg, f"message does not name {c!r}: {msg}"
        return suppressed


def strip_ansi(s: str) -> str:
    """Text without terminal colour codes (typer/rich output)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", s)
