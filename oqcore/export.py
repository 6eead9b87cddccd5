"""Saving a quantized model, and loading it back without re-quantizing.

The folder holds ``model.safetensors`` (quantized weights and scales under the wrappers' names,
everything else in high precision), the source ``config.json`` with a ``quantization_config``
entry (``quant_method: "oqcore"``, the config, the format version) and the source folder's other
small files (tokenizer, sentence-transformers metadata), so it is a complete model folder.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from oqcore.config import QuantizationConfig
from oqcore.errors import CheckpointError, ConfigError
from oqcore.loading.checkpoint import TensorReader, checkpoint_entries
from oqcore.loading.install import install_wrappers
from oqcore.loading.memory import PeakRSS
from oqcore.loading.meta import build_meta_model, read_model_config
from oqcore.loading.online import assign_tensor, finalize, param_owner
from oqcore.loading.state import LoadStats, OqState, get_state, tensor_bytes
from oqcore.planning import plan

FORMAT_VERSION = 1
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def save_quantized(model: nn.Module, out: str | Path) -> Path:
    """Write ``model`` (from :func:`oqcore.load` / :func:`oqcore.quantize_`) to folder ``out``.

    Shared storages (tied embeddings) are written once. Raises :class:`oqcore.OqError` for a model
    oqcore did not produce, :class:`oqcore.CheckpointError` if the source ``config.json`` is unknown.
    """
    from safetensors.torch import save_file

    state = get_state(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    wrapper_buffers = {f"{n}.{b}" for n, w in state.wrappers.items() for b, _ in w.named_buffers(recurse=False)}
    for name, t in model.state_dict().items():
        if name in wrapper_buffers:  # backend repacks are rebuilt by the backend at load
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = t.detach().contiguous().cpu()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "producer": "oqcore"})

    if state.source is not None:
        raw = read_model_config(state.source)
        for f in state.source.iterdir():
            if f.is_file() and f.name != "config.json" and not f.name.endswith(_SKIP_SUFFIXES):
                shutil.copy2(f, out / f.name)
            elif f.is_dir() and not (out / f.name).exists() and not any(f.rglob("*.safetensors")):
                shutil.copytree(f, out / f.name)
    elif hasattr(model, "config") and hasattr(model.config, "to_dict"):
        raw = model.config.to_dict()
    else:
        raise CheckpointError("cannot save: the model has no config.json source and no transformers config")
    raw["quantization_config"] = {
        "quant_method": "oqcore",
        "format_version": FORMAT_VERSION,
        "config": state.config.to_dict(),
    }
    raw["dtype"] = str(state.dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return out


def load_quantized(
    path: str | Path,
    config: QuantizationConfig | dict | str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    progress=None,
) -> nn.Module:
    """Read a folder written by :func:`save_quantized` (called by :func:`oqcore.load`).

    ``config`` must be ``None`` or equal to the saved one: the weights are already quantized, so a
    different config is a :class:`oqcore.ConfigError` telling the user to load the bf16 source instead.
    """
    t0 = time.perf_counter()
    path = Path(path)
    device = torch.device(device)
    raw = read_model_config(path)
    qc = raw["quantization_config"]
    if qc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / 'config.json'}: oqcore format version {qc.get('format_version')!r}, this oqcore reads {FORMAT_VERSION}")
    saved = QuantizationConfig.model_validate(qc["config"])
    if config is not None and QuantizationConfig.from_any(config) != saved:
        raise ConfigError(
            f"{path} is already quantized with {saved.to_dict()}; load it with config=None, or quantize the "
            "high-precision source with the new config"
        )
    stats = LoadStats()
    model = build_meta_model(path, dtype)
    qplan = plan(model, saved, device=device)
    with PeakRSS() as mem:
        wrappers = install_wrappers(model, qplan)
        for w in wrappers.values():
            w._parameters.clear()  # the quantized tensors come from the file under their own names
        entries = checkpoint_entries(path)
        total, done = sum(e.nbytes for e in entries), 0
        with TensorReader() as reader:
            for e in entries:
                value = reader.read(e)
                owner = param_owner(e.name, wrappers)
                if owner is None:
                    assign_tensor(model, e.name, value, device)
                else:
                    wrappers[owner].register_parameter(e.name.rpartition(".")[2], nn.Parameter(value.to(device), requires_grad=False))
                done += e.nbytes
                if progress is not None:
                    progress(done, total)
        for name, w in wrappers.items():
            if not list(w.parameters(recurse=False)):
                raise CheckpointError(f"{path}: no tensors for quantized layer {name!r}")
            w.method._finish(w)
        stats.bytes_read = done
        finalize(model, device, wrappers, str(path))
    stats.baseline_rss, stats.peak_rss = mem.baseline, mem.peak
    stats.quantized_bytes = sum(tensor_bytes(w) for w in wrappers.values())
    stats.model_bytes = tensor_bytes(model)
    stats.seconds_total = time.perf_counter() - t0
    model.eval()
    model.oq_state = OqState(saved, qplan, wrappers, device, dtype, source=path, stats=stats)
    return model
