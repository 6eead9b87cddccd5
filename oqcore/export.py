"""Saving a quantized model as a complete model folder (reading it back: :mod:`oqcore.loading.saved`).

The folder holds ``model.safetensors``, the source ``config.json`` with a ``quantization_config``
entry and the source folder's other small files (tokenizer, sentence-transformers metadata), so it
is a complete model folder. By default the tensors and the entry are compressed-tensors'
(:mod:`oqcore.export_ct`); ``format="oqcore"`` keeps the wrappers' names and writes
``quant_method: "oqcore"`` with the config and the format version (:mod:`oqcore.saved_format`).

Saves are atomic at folder level (:mod:`oqcore.atomic`): the folder is written as a hidden sibling,
fsynced and renamed into place, swapping out an earlier export; a failed or killed save leaves the
destination as it was. The source checkpoint is never written to, and a folder that is not an
earlier export is never replaced.

This module only writes: nothing under :mod:`oqcore.loading` imports it.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
from pathlib import Path

import torch
from torch import nn

from oqcore.atomic import stage, write_folder
from oqcore.errors import CheckpointError, ConfigError, OqError, SaveError
from oqcore.layer_tensors import TensorSpec, quantized_tensors
from oqcore.loading.checkpoint import ST_DTYPES
from oqcore.loading.meta import read_model_config
from oqcore.loading.place import param_owner
from oqcore.loading.state import OqState, get_state
from oqcore.saved_format import (
    DEFAULT_FORMAT,
    EXPORT_FORMATS,
    FORMAT_VERSION,
    PRODUCER,
    PRODUCER_CONFIG,
    QUANT_METHOD,
    is_export,
)
from oqcore.torch_compat import own_parameters

__all__ = [
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "check_destination",
    "compressed_tensors_export",
    "is_export",
    "save_quantized",
    "write_safetensors",
]

# the source's weights (any framework's) are not copied: the quantized folder has its own
_SKIP_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json", ".onnx", ".onnx_data", ".gguf", ".h5", ".msgpack", ".ot",
)
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


# ---- saving --------------------------------------------------------------------------------------


def save_quantized(model: nn.Module, out: str | Path, format: str = DEFAULT_FORMAT) -> Path:
    """Write ``model`` (from :func:`oqcore.load` / :func:`oqcore.quantize_`) to folder ``out``.

    ``format="compressed-tensors"`` (the default) writes the format llm-compressor writes and vLLM
    serves (:mod:`oqcore.export_ct`: the checkpoint's own tensor names, experts per expert, a
    compressed-tensors ``quantization_config``), which transformers, vLLM and :func:`oqcore.load`
    read. ``format="oqcore"`` writes ``model.safetensors`` with every quantized layer's tensors as
    its method leaves them (e.g. ``weight`` fp8 ``[N, K]`` + ``weight_scale`` float32; fused
    experts as ``w13_weight`` ...), everything else in the model's dtype (tied weights once) and
    ``quantization_config = {quant_method: oqcore, ...}``: only :func:`oqcore.load` reads it, but
    it holds what compressed-tensors cannot (GPT-OSS's fused experts, 128-row blocks straddling
    gate and up, a scheme declaring no compressed-tensors form). Both copy the source folder's other
    files (tokenizer, sentence-transformers modules). Returns the folder written
    (absolute, symlinks resolved; see :func:`check_destination`).

    The write is atomic: a hidden sibling folder (``.<name>.oq-tmp-*``) is written, fsynced and
    renamed into place (see :mod:`oqcore.atomic`; leftovers of a killed save are removed by the
    next save to the same folder and never read by :func:`oqcore.load`). ``out``
    may be a new path, an empty folder or an earlier oqcore export (replaced); anything else is
    refused. Raises :class:`oqcore.SaveError` naming the path for: ``out`` being the model's source
    checkpoint (or inside it, or containing it), a non-empty folder that is not an earlier export, a
    file, a read-only or full disk, a model oqcore did not produce, tensors on the meta device, a
    quantized layer whose tensors are not what its method produces, and (compressed-tensors) a layer
    that format cannot hold, naming it and pointing at ``format="oqcore"``; a ``format`` not in
    ``("compressed-tensors", "oqcore")`` is a :class:`oqcore.ConfigError`. On any error ``out`` and the
    source are exactly as before.
    """
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {format!r}; formats: {', '.join(EXPORT_FORMATS)}", "format")
    try:
        state = get_state(model)
    except OqError as e:
        raise SaveError(f"cannot save to {out}: {e}") from None
    dest = check_destination(out, state.source)
    if state.shards:
        return _save_sharded(model, state, out, format, dest)
    if format == "compressed-tensors":
        tensors, qc = compressed_tensors_export(model, state, dest)
        raw = _config_to_write(model, state, dest)
        raw["quantization_config"] = qc
    else:
        tensors = _tensors_to_save(model, state, dest)
        raw = _config_to_write(model, state, dest)
    extras = _extra_files(Path(state.source), dest) if state.source is not None else []

    def fill(tmp: Path) -> None:
        """Write the export into the temporary sibling folder ``tmp`` (swapped into place after)."""
        write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt", "producer": QUANT_METHOD})
        stage("tensors_written")
        for f in extras:
            if f.is_dir():
                shutil.copytree(f, tmp / f.name)
            else:
                shutil.copy2(f, tmp / f.name)
        stage("files_copied")
        _write_bytes(tmp / "config.json", (json.dumps(raw, indent=2) + "\n").encode())
        stage("config_written")

    return write_folder(dest, fill, replaceable=is_export)  # SaveError names dest for any failure


def compressed_tensors_export(
    model: nn.Module, state: OqState, dest: str | Path, checkpoint_names: bool = True
) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the ``quantization_config`` entry :func:`save_quantized` writes in the
    compressed-tensors format (``model.safetensors``' tensors by name, and the compressed-tensors
    config with ``producer`` and the oqcore config added); nothing is written. ``dest`` names the
    destination in errors. ``checkpoint_names=False``: the tensors before transformers' reverse
    renaming (see :func:`oqcore.export_ct.compressed_tensors_checkpoint`), for
    ``save_pretrained``, which applies it. Raises :class:`oqcore.SaveError` as :func:`save_quantized`
    does for the tensors and for a layer compressed-tensors cannot hold."""
    from oqcore.export_ct import compressed_tensors_checkpoint

    tensors = _tensors_to_save(model, state, dest)
    tensors, qc = compressed_tensors_checkpoint(model, state, tensors, str(dest), checkpoint_names)
    return tensors, {**qc, "producer": PRODUCER, PRODUCER_CONFIG: state.config.to_dict()}


def _save_sharded(model: nn.Module, state: OqState, out: str | Path, format: str, dest: Path) -> Path:
    """A tensor- / expert-parallel model: every rank sends its pieces, rank 0 writes the whole
    model (:mod:`oqcore.parallel.gather`), the same folder an unsharded export writes. Every rank
    calls it and gets the folder; a failure on rank 0 raises there and
    :class:`oqcore.DistributedError` on the others."""
    from oqcore.parallel.gather import gathered_model

    group = next(iter(state.shards.values())).group
    whole, failure = gathered_model(model), None
    if whole is not None:
        try:
            dest = save_quantized(whole, out, format)
        except Exception as e:
            failure = e
    group.check(failure is not None, f"saving {dest}")
    if failure is not None:
        raise failure
    return dest


def check_destination(out: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """The folder :func:`save_quantized` would write for ``out`` (absolute, symlinks resolved),
    after the checks it makes before writing anything; nothing is created.

    ``source`` is the folder the model was loaded from (``model.oq_state.source``), if any. Raises
    :class:`oqcore.SaveError` naming the path for: ``out`` not a path, a dangling symlink, the
    source folder itself (or a folder inside it or around it, under any name), a file in the way
    (at ``out`` or at one of its parents), a non-empty folder that is not an earlier export. (A
    read-only or full disk shows only when writing.) Tools can call it before a long load.
    """
    try:
        given = Path(os.path.abspath(os.fspath(out)))
    except TypeError:
        raise SaveError(f"out must be a folder path (str or os.PathLike), got {type(out).__name__}") from None
    if given.is_symlink() and not given.exists():
        raise SaveError(f"cannot save to {given}: it is a dangling symbolic link (to {os.readlink(given)})")
    dest = given.resolve()  # a symlink to an earlier export: the export is what gets replaced
    if source is not None:
        _check_not_source(Path(source), dest, given)
    if dest.exists() and not dest.is_dir():
        raise SaveError(f"cannot save to {dest}: a file (not a folder) is in the way; remove it or choose another path")
    for p in dest.parents:
        if p.exists():
            if not p.is_dir():
                raise SaveError(f"cannot save to {dest}: {p} is a file, not a folder")
            break
    if dest.is_dir():
        try:
            empty = not any(dest.iterdir())
        except OSError as e:
            raise SaveError(f"cannot save to {dest}: cannot list it: {e.strerror or e}") from None
        if not empty and not is_export(dest):
            raise SaveError(
                f"cannot save to {dest}: the folder exists and is not an earlier oqcore export; "
                "refusing to replace it (choose a new or empty folder, or delete it yourself)"
            )
    return dest


def _same(a: Path, b: Path) -> bool:
    try:
        return a == b or os.path.samefile(a, b)
    except OSError:
        return False


def _check_not_source(source: Path, dest: Path, given: Path | None = None) -> None:
    """Refuse a destination (``given`` by the user, ``dest`` resolved) that is the source folder,
    inside it, or one of its ancestors (even through another name: symlinks, bind mounts)."""
    src = source.resolve()
    label = f"{given} (= {dest})" if given is not None and given != dest else str(dest)
    if any(_same(p, dest) for p in (src, *src.parents)):
        what = "the folder the model was loaded from" if _same(src, dest) else "a folder containing the source checkpoint"
        raise SaveError(
            f"cannot save to {label}: it is {what} ({src}); saving would overwrite the source checkpoint. "
            "Choose another folder"
        )
    if any(_same(p, src) for p in dest.parents):
        raise SaveError(
            f"cannot save to {label}: it is inside the folder the model was loaded from ({src}); the source "
            "checkpoint is never written to. Choose a folder outside it"
        )


def _tensors_to_save(model: nn.Module, state: OqState, dest: Path) -> dict[str, torch.Tensor]:
    """Every tensor to write, by name, checked: quantized layers hold exactly what their method
    produces, nothing is on the meta device, every dtype has a safetensors name."""
    wrappers = state.wrappers
    expected = quantized_tensors(wrappers)
    for name, w in wrappers.items():
        try:
            current = model.get_submodule(name)
        except AttributeError:
            current = None
        if current is not w:
            raise SaveError(f"cannot save to {dest}: quantized layer {name!r} is no longer in the model as oqcore installed it")
        problem = _layer_problem(own_parameters(w), expected[name])
        if problem or not getattr(w, "quantized", False):
            raise SaveError(
                f"cannot save to {dest}: layer {name!r} does not hold what {type(w.method).__name__} produces: "
                f"{problem or 'it was never quantized'}"
            )
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    seen: set[tuple] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        owner = param_owner(name, wrappers)
        if owner is not None and name.rpartition(".")[2] not in expected[owner]:
            continue  # a backend's repack (rebuilt by the backend at load)
        if t.is_meta:
            raise SaveError(f"cannot save to {dest}: tensor {name!r} is on the meta device (it holds no data)")
        if t.dtype not in _ST_NAMES:
            raise SaveError(f"cannot save to {dest}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        if t.numel():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if key in seen and name in tied:
                continue  # a tied weight: transformers re-ties it at load
            seen.add(key)
        out[name] = t.detach()
    return out


def _config_to_write(model: nn.Module, state: OqState, dest: Path) -> dict:
    if state.source is not None:
        try:
            raw = read_model_config(state.source)
        except CheckpointError as e:
            raise SaveError(f"cannot save to {dest}: the model's source folder is needed for its config.json: {e}") from None
        if not isinstance(raw, dict):
            raise SaveError(f"cannot save to {dest}: {Path(state.source) / 'config.json'} does not hold a JSON object")
    elif hasattr(model, "config") and hasattr(model.config, "to_dict"):
        raw = model.config.to_dict()
    else:
        raise SaveError(f"cannot save to {dest}: the model has no source folder and no transformers config to write config.json from")
    raw = dict(raw)
    raw["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "config": state.config.to_dict(),
    }
    raw["dtype"] = str(state.dtype).removeprefix("torch.")
    return raw


def _extra_files(source: Path, dest: Path) -> list[Path]:
    """The source folder's files and folders to copy along (tokenizer, sentence-transformers
    modules): everything but weights and config.json."""
    out = []
    try:
        for f in sorted(source.iterdir()):
            if f.is_file():
                if f.name != "config.json" and not f.name.endswith(_SKIP_SUFFIXES):
                    out.append(f)
            elif f.is_dir() and not f.name.startswith(".") and not any(g.name.endswith(_SKIP_SUFFIXES) for g in f.rglob("*")):
                out.append(f)  # e.g. sentence-transformers' 1_Pooling/; not .git, .cache, onnx/
    except OSError as e:
        raise SaveError(f"cannot save to {dest}: cannot list the source folder {source}: {e.strerror or e}") from None
    return out


def _write_all(fd: int, buf: memoryview) -> None:
    while buf:
        n = os.write(fd, buf)
        buf = buf[n:]


def _write_bytes(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, memoryview(data))
    finally:
        os.close(fd)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` (any device; copied to the CPU one at a time) as a safetensors file.

    The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header
    length, the JSON header (``dtype``, ``shape``, ``data_offsets`` per tensor, padded with spaces to
    a multiple of 8 bytes), then the bytes in header order. Streaming keeps the peak at one tensor,
    not a second copy of the model; :class:`OSError` (full disk...) propagates.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, memoryview(struct.pack("<Q", len(hb)) + hb))
        for i, t in enumerate(tensors.values()):
            if t.numel():
                data = t.detach().to("cpu").contiguous()
                # the tensor's bytes as they are in memory, without a copy (any dtype, fp8 included)
                raw = (ctypes.c_char * (data.numel() * data.element_size())).from_address(data.data_ptr())
                _write_all(fd, memoryview(raw).cast("B"))
                del raw, data
            if i == len(tensors) // 2:
                stage("tensors_half")
    finally:
        os.close(fd)


def _layer_problem(have: dict[str, torch.Tensor], want: dict[str, TensorSpec]) -> str | None:
    """What is wrong with one quantized layer's tensors (exact names, shapes and dtypes), or ``None``."""
    for k, spec in want.items():
        if k not in have:
            return f"missing tensor {k!r} ({spec.describe()})"
    for k, t in have.items():
        spec = want.get(k)
        if spec is None:
            return f"unexpected tensor {k!r}; the layer holds {', '.join(want) or 'nothing'}"
        shape, dtype = tuple(t.shape), t.dtype
        if shape != spec.shape or dtype != spec.dtype:
            return f"tensor {k!r} is {str(dtype).removeprefix('torch.')} {list(shape)}, expected {spec.describe()}"
    return None
