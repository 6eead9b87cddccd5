"""Reading a folder written by :func:`oqcore.save_quantized` back, without re-quantizing.

:func:`oqcore.load` routes a folder whose ``config.json`` declares an oqcore export
(:mod:`oqcore.saved_format`) here. The folder is checked against what the saved config's methods
produce (names, shapes and dtypes of every quantized tensor, derived by :mod:`oqcore.layer_tensors`)
before any tensor is read, so a damaged or half-written folder is refused with a
:class:`oqcore.CheckpointError` naming the file and tensor. Writing lives in :mod:`oqcore.export`;
the two share only :mod:`oqcore.saved_format`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from oqcore.config import QuantizationConfig
from oqcore.devices import resolve_device
from oqcore.errors import CheckpointError, ConfigError
from oqcore.layer_tensors import TensorSpec, quantized_tensors
from oqcore.loading.checkpoint import TensorEntry, TensorReader, checkpoint_entries, checkpoint_files
from oqcore.loading.checks import placeholder
from oqcore.loading.install import OnlineFeed, install_wrappers
from oqcore.loading.memory import PeakRSS
from oqcore.loading.meta import build_meta_model, read_model_config
from oqcore.loading.overlay import overlay, stored_specs
from oqcore.loading.place import assign_tensor, finalize, param_owner
from oqcore.loading.state import LoadStats, OqState, tensor_bytes
from oqcore.planning import plan
from oqcore.saved_format import FORMAT_VERSION, QUANT_METHOD
from oqcore.torch_compat import delete_parameter, own_parameters, set_parameter

_MAX_PROBLEMS = 8


def saved_config(raw: object, cfg_file: Path) -> QuantizationConfig:
    """The config an oqcore export was quantized with, from its parsed ``config.json`` (``raw``,
    read from ``cfg_file``). Raises :class:`oqcore.CheckpointError` naming the file and the entry
    for anything missing or invalid."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file}: must hold a JSON object, found {type(raw).__name__}")
    qc = raw.get("quantization_config")
    if not isinstance(qc, dict):
        raise CheckpointError(f"{cfg_file}: quantization_config must be a JSON object, found {type(qc).__name__}")
    if qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(
            f"{cfg_file}: quantization_config.quant_method is {qc.get('quant_method')!r}, not {QUANT_METHOD!r}: "
            "not a folder written by oqcore.save_quantized"
        )
    version = qc.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_file}: quantization_config.format_version is {version!r}; this oqcore reads format {FORMAT_VERSION}"
        )
    if "config" not in qc:
        raise CheckpointError(f"{cfg_file}: quantization_config.config is missing (the config the folder was quantized with)")
    if not isinstance(qc["config"], dict):
        raise CheckpointError(f"{cfg_file}: quantization_config.config must be a JSON object, found {type(qc['config']).__name__}")
    try:
        return QuantizationConfig.model_validate(qc["config"])
    except (ValueError, TypeError) as e:  # ConfigError is a ValueError
        raise CheckpointError(f"{cfg_file}: quantization_config.config is not a valid oqcore config: {e}") from e


def _check_saved_tensors(
    model: nn.Module, wrappers: dict[str, nn.Module], expected: dict[str, dict[str, TensorSpec]], entries: list[TensorEntry], where: Path
) -> None:
    """Every tensor of the folder against the model and the quantized layers' specs, before any
    tensor is read. One :class:`oqcore.CheckpointError` listing the problems (file and tensor)."""
    problems: list[str] = []
    per_layer: dict[str, dict[str, TensorEntry]] = {name: {} for name in wrappers}
    present = set()
    for e in entries:
        present.add(e.name)
        owner = param_owner(e.name, wrappers)
        if owner is not None:
            per_layer[owner][e.name.rpartition(".")[2]] = e
            continue
        old = placeholder(model, e.name)
        if old is None:
            problems.append(f"{e.file}: unknown tensor {e.name!r} (the model has no parameter or buffer of that name)")
        elif tuple(old.shape) != e.shape:
            problems.append(f"{e.file}: tensor {e.name!r} has shape {list(e.shape)}, the model expects {list(old.shape)}")
        elif old.is_floating_point() != e.dtype.is_floating_point:
            problems.append(
                f"{e.file}: tensor {e.name!r} is {str(e.dtype).removeprefix('torch.')}, the model expects "
                f"{str(old.dtype).removeprefix('torch.')}"
            )
    for name, w in wrappers.items():
        have = per_layer[name]
        want = expected[name]
        for k, spec in want.items():
            if k not in have:
                problems.append(f"{where}: missing tensor '{name}.{k}' ({spec.describe()}) of quantized layer {name!r}")
        for k, e in have.items():
            spec = want.get(k)
            tname = f"{name}.{k}"
            if spec is None:
                problems.append(
                    f"{e.file}: unexpected tensor {tname!r}: quantized layer {name!r} ({type(w.method).__name__}) "
                    f"holds {', '.join(want) or 'nothing'}"
                )
                continue
            ok_dtype = e.dtype == spec.dtype or (spec.high_precision and e.dtype.is_floating_point)
            if e.shape != spec.shape or not ok_dtype:
                hint = ""
                layout = getattr(w, "layout", None)
                if layout is not None and e.shape and spec.shape and e.shape[0] != spec.shape[0]:
                    hint = f" ({e.shape[0]} experts, the layer has {spec.shape[0]})"
                problems.append(
                    f"{e.file}: tensor {tname!r} is {str(e.dtype).removeprefix('torch.')} {list(e.shape)}, quantized "
                    f"layer {name!r} ({type(w.method).__name__}) expects {spec.describe()}{hint}"
                )
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    for n, p in model.named_parameters(remove_duplicate=False):
        if param_owner(n, wrappers) is None and n not in present and n not in tied:
            problems.append(f"{where}: missing tensor {n!r} ({str(p.dtype).removeprefix('torch.')} {list(p.shape)})")
    if problems:
        shown = "; ".join(problems[:_MAX_PROBLEMS])
        more = f"; ... ({len(problems)} problems in all)" if len(problems) > _MAX_PROBLEMS else ""
        raise CheckpointError(f"damaged oqcore export: {shown}{more}")


def check_quantized_values(file: Path, name: str, value: torch.Tensor, what: str = "oqcore export") -> None:
    """Refuse stored values no quantizer writes, so a damaged folder cannot load and then give
    NaN/garbage at forward: a scale that is NaN, infinite, zero or negative (the quantizers clamp
    every scale to a positive finite value, even for an all-zero weight; so does compressed-tensors),
    or float8 data holding NaN bytes (the quantizers saturate, so a NaN byte never occurs). vLLM and
    compressed-tensors do not check this; we do, because a silently wrong model is worse than a
    clear error. ``what`` names the kind of folder. Raises :class:`oqcore.CheckpointError` naming
    the file and the tensor ``name``."""
    if not value.numel():
        return
    attr = name.rpartition(".")[2]
    if "scale" in attr and value.dtype.is_floating_point:
        v = value.float()
        bad = ~torch.isfinite(v) | (v <= 0)
        n = int(bad.sum())
        if n:
            first = v[bad][0].item()
            raise CheckpointError(
                f"damaged {what}: {file}: tensor {name!r} holds {n} of {v.numel()} scale value(s) "
                f"that are not finite and positive (e.g. {first}); quantizers always write scales > 0"
            )
    elif value.dtype.is_floating_point and value.element_size() == 1:
        # 8-bit float data (any format the plugins use): NaN after upcasting means a NaN byte.
        n = int(torch.isnan(value.float()).sum())
        if n:
            raise CheckpointError(
                f"damaged {what}: {file}: tensor {name!r} holds {n} NaN {str(value.dtype).removeprefix('torch.')} "
                "value(s); quantizers never write NaN"
            )


def _checkpoint_label(path: Path) -> Path:
    """The file to name for a missing tensor: the single file, or the shard index."""
    files = checkpoint_files(path)
    return files[0] if len(files) == 1 else path / "model.safetensors.index.json"


def load_quantized(
    path: str | Path,
    config: QuantizationConfig | dict | str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    progress=None,
) -> nn.Module:
    """Read a folder written by :func:`oqcore.save_quantized` (called by :func:`oqcore.load`).

    ``config`` is ``None`` (as saved) or a config overlaid on the saved one with vLLM's rules
    (:mod:`oqcore.loading.overlay`: the saved scheme's own weight key or an activation-only spec
    keep the stored bytes, an activation the saved layers do not declare is applied, layers saved
    in high precision are quantized online as the config says); a conflicting weight key or
    activation is a :class:`oqcore.ConfigError` naming both. ``device``/``dtype``/``progress`` as
    for :func:`oqcore.load`.

    Before any tensor is read, the folder is checked: ``config.json``'s ``quantization_config``
    (present, right format version, a valid config that fits the model) and every tensor of the
    safetensors file(s) against the model and against what each quantized layer's method produces
    (names, shapes, dtypes; missing, extra, truncated). Any problem is a
    :class:`oqcore.CheckpointError` naming the file and tensor; nothing half-built is returned.
    """
    t0 = time.perf_counter()
    path = Path(path)
    device = resolve_device(device)
    cfg_file = path / "config.json"
    saved = saved_config(read_model_config(path), cfg_file)
    user = None if config is None else QuantizationConfig.from_any(config)
    stats = LoadStats()
    model = build_meta_model(path, dtype)
    try:
        per_layer = stored_specs(model, saved, device)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_file}: the saved quantization config does not fit the model: {e}") from e
    ov = overlay(model, saved, per_layer, user, device, f"oqcore export {path}")
    qplan = plan(model, ov.config, device=device)
    wrappers = install_wrappers(model, qplan)
    stored = {n: w for n, w in wrappers.items() if n in ov.stored}
    feed_online = OnlineFeed(model, {n: w for n, w in wrappers.items() if n in ov.online})
    expected = quantized_tensors(stored)
    entries = checkpoint_entries(path)
    _check_saved_tensors(model, stored, expected, entries, _checkpoint_label(path))
    for w in stored.values():
        # drop only the meta high-precision placeholders: a ``bias=None`` entry must stay
        for k in [k for k, p in own_parameters(w).items() if p.is_meta]:
            delete_parameter(w, k)

    def run(reader: TensorReader, tick) -> None:
        """Read every entry: stored layers' tensors into their wrappers (checked values), the rest
        assigned (online layers quantized when complete); ``tick(bytes)`` after each."""
        for e in entries:
            value = reader.read(e)
            owner = param_owner(e.name, stored)
            if owner is None:
                assign_tensor(model, e.name, value, device)
                feed_online.placed(e.name)
            else:
                attr = e.name.rpartition(".")[2]
                spec = expected[owner][attr]
                value = value.to(device=device, dtype=spec.dtype)
                if not spec.high_precision:
                    check_quantized_values(e.file, e.name, value)
                set_parameter(wrappers[owner], attr, nn.Parameter(value, requires_grad=False))
            del value
            tick(e.nbytes)
        feed_online.check_complete(path)

    total = sum(e.nbytes for e in entries)
    return finish_stored_load(model, run, total, ov.config, qplan, wrappers, path, device, dtype, stats, t0, progress)


def finish_stored_load(
    model: nn.Module,
    run,
    total: int,
    config: QuantizationConfig,
    qplan,
    wrappers: dict[str, nn.Module],
    path: Path,
    device: torch.device,
    dtype: torch.dtype,
    stats: LoadStats,
    t0: float,
    progress=None,
) -> nn.Module:
    """The common end of reading an already-quantized folder (an oqcore export, a
    compressed-tensors checkpoint): ``run(reader, tick)`` reads every tensor into place with the
    open :class:`TensorReader`, calling ``tick(nbytes)`` as it goes (``progress(done, total)`` is
    called from it); then each quantized layer is finished by its method (no quantization: the
    backend's ``prepare`` only), the model finalized (:func:`oqcore.loading.place.finalize`) and
    ``model.oq_state`` set. Returns the model in eval mode; raises what ``run`` and ``finalize`` raise."""
    done = 0

    def tick(nbytes: int) -> None:
        """Count ``nbytes`` more read and report ``progress(done, total)``."""
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(done, total)

    with PeakRSS() as mem:
        if progress is not None:
            progress(0, total)
        with TensorReader() as reader:
            run(reader, tick)
        for w in wrappers.values():
            if not w.quantized:  # layers quantized online while loading are finished already
                w.method._finish(w)
        stats.bytes_read = done
        finalize(model, device, wrappers, str(path))
    stats.baseline_rss, stats.peak_rss = mem.baseline, mem.peak
    stats.quantized_bytes = sum(tensor_bytes(w) for w in wrappers.values())
    stats.model_bytes = tensor_bytes(model)
    stats.seconds_total = time.perf_counter() - t0
    model.eval()
    model.oq_state = OqState(config, qplan, wrappers, device, dtype, source=path, stats=stats)
    return model
