"""Online loading: a high-precision checkpoint goes in, a quantized model comes out, and the
high-precision model never sits in memory whole.

1. Build the model on the meta device from ``config.json`` (transformers), plan it, and swap each
   planned layer for its quantized wrapper (meta-device high-precision parameters).
2. Read the checkpoint headers, map every checkpoint key to its parameter with transformers' own
   rules (renames, per-expert -> fused experts), and count how many elements each wrapper expects.
3. Stream the tensors (``pread`` straight into tensors, no mmap), convert, and place them: a
   parameter of an unquantized module goes straight to the target device; a wrapper's parameter is
   read into a buffer lent by a :class:`~oqcore.loading.staging.StagingPool` and counted, and the
   moment the wrapper's last element arrives its method quantizes it and the buffer goes back to the
   pool for the next layer (vLLM's layerwise processing, without a fresh page fault per page per
   layer). Before each layer is quantized the kernel is asked to read ahead the next tensors, so disk
   reads overlap quantization.
4. Anything never loaded is an error listing the names; buffers and tied weights are finalized as
   transformers does. A failure at any step raises and returns nothing.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from oqcore.config import QuantizationConfig
from oqcore.devices import resolve_device
from oqcore.errors import CheckpointError, ConfigError
from oqcore.loading.checkpoint import TensorReader, check_model_folder, checkpoint_entries
from oqcore.loading.checks import check_against_model, check_quant_metadata, placeholder
from oqcore.loading.install import install_wrappers, process_layer
from oqcore.loading.memory import PeakRSS, release_free_memory, return_large_frees_to_os
from oqcore.loading.meta import build_meta_model, read_model_config, resolve_model_dtype
from oqcore.loading.names import NameMapper, is_expert_fusion
from oqcore.loading.staging import StagingPool
from oqcore.loading.state import LoadStats, OqState, tensor_bytes
from oqcore.planning import plan

ProgressFn = Callable[[int, int], None]

PREFETCH_GROUPS = 8
"""How many checkpoint target groups ahead the kernel is asked to read before a layer is quantized."""


def param_owner(name: str, wrappers: dict[str, nn.Module]) -> str | None:
    """The wrapper owning parameter ``name`` (its module path), or ``None``."""
    owner = name.rpartition(".")[0]
    return owner if owner in wrappers else None


def placeholder_dtype(model: nn.Module, name: str) -> torch.dtype | None:
    """The dtype of the (meta) parameter or buffer ``name`` if floating, else ``None``."""
    t = placeholder(model, name)
    return t.dtype if t is not None and t.is_floating_point() else None


def assign_tensor(model: nn.Module, name: str, value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Put ``value`` at parameter/buffer ``name`` (on ``device``, in the placeholder's dtype) in
    place of its meta placeholder. A floating value takes the placeholder's floating dtype, an
    integer value its integer dtype. Raises :class:`oqcore.CheckpointError` naming the tensor when
    the model has no such tensor, on a shape mismatch, a value of another kind (an integer tensor
    where the model has a floating weight, or the reverse) or a tensor loaded twice."""
    mod_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        raise CheckpointError(f"tensor {name!r} has no place in the model") from None
    old = module._parameters.get(attr) if attr in module._parameters else module._buffers.get(attr)
    if old is None:
        raise CheckpointError(f"tensor {name!r} has no place in the model")
    if not old.is_meta:
        raise CheckpointError(f"tensor {name!r} is loaded twice (the checkpoint maps two tensors onto it)")
    if tuple(value.shape) != tuple(old.shape):
        raise CheckpointError(
            f"tensor {name!r} has shape {list(value.shape)} in the checkpoint, the model expects {list(old.shape)}"
        )
    if _kind(value.dtype) != _kind(old.dtype):
        raise CheckpointError(
            f"tensor {name!r} is {str(value.dtype).removeprefix('torch.')} in the checkpoint, the model expects "
            f"{str(old.dtype).removeprefix('torch.')} ({_kind(old.dtype)})"
        )
    new = value.to(device=device, dtype=old.dtype)
    if attr in module._parameters:
        param = nn.Parameter(new, requires_grad=False)
        param._is_hf_initialized = True  # transformers' initialize_weights must not touch it
        module._parameters[attr] = param
        return param
    module._buffers[attr] = new
    return new


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating" if dtype.is_floating_point else "integer"


def finalize(model: nn.Module, device: torch.device, wrappers: dict[str, nn.Module], source: str) -> None:
    """Materialize meta buffers, let transformers initialize what it computes itself (rotary
    frequencies, position ids), tie weights, then fail on any parameter still unloaded."""
    from_pretrained_like = hasattr(model, "initialize_weights")
    for mod_name, module in model.named_modules():
        for attr, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[attr] = torch.empty_like(buf, device=device)
    for w in wrappers.values():
        w._is_hf_initialized = True
    if from_pretrained_like:
        for p in model.parameters():
            if not p.is_meta:
                p._is_hf_initialized = True
        tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
        missing = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta and n not in tied]
        if missing:
            raise CheckpointError(_missing_message(missing, source))
        # transformers computes non-persistent buffers (rotary inv_freq, position ids) in _init_weights
        model.initialize_weights()
        model.tie_weights()
    missing = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    if missing:
        raise CheckpointError(_missing_message(missing, source))


def _missing_message(missing: list[str], source: str) -> str:
    shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
    return f"{source}: the checkpoint has no tensor for {len(missing)} model weight(s): {shown}"


def load(
    path: str | Path,
    config: QuantizationConfig | dict | str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.bfloat16,
    progress: ProgressFn | None = None,
) -> nn.Module:
    """Load the Hugging Face model folder ``path`` and quantize it while loading.

    ``config`` is a :class:`QuantizationConfig` (or a dict, a YAML path, a shorthand name); ``None``
    loads the model unquantized and says so with a ``UserWarning`` ("0 layers quantized", also
    given when a config matches no layer of this model). ``device`` is where the model lives and
    runs (checked first: :func:`oqcore.devices.resolve_device`); ``dtype`` the high-precision dtype
    of everything not quantized (and of the weights before quantization): ``torch.bfloat16``,
    ``torch.float16``, ``torch.float32``, ``torch.float64`` or their names (``"bfloat16"``).
    ``progress(done_bytes, total_bytes)`` is called as tensors are read. A folder written by
    :func:`oqcore.save_quantized` is read back without re-quantizing (``config`` must then be
    ``None`` or equal to the saved one).

    Before any weight is read, the folder, ``config.json``, the shard index and every safetensors
    header are checked (and against the model: tensor kinds, shapes, expert counts), and a
    checkpoint that already holds quantized tensors without declaring it in ``config.json`` is
    refused. Safe to call from several threads at once: a load changes no process-wide state
    except glibc's mmap threshold (see :func:`oqcore.loading.memory.return_large_frees_to_os`,
    process-wide by design and harmless to other code). The peak-memory figures in the report are
    the process's: with loads running concurrently, each includes what the others hold.

    Returns the model in eval mode with ``model.oq_state`` set (see :func:`oqcore.report`).
    Raises :class:`oqcore.ConfigError` (a bad ``device``, ``dtype``, ``progress`` or config),
    :class:`oqcore.CheckpointError` for a missing/corrupt/inconsistent/already-quantized checkpoint
    (naming the file and the tensor or field) or missing tensors, :class:`oqcore.UnsupportedLayerError`
    (incl. NaN/Inf weights) or :class:`oqcore.NoBackendError`; nothing half-built is ever returned.
    """
    t0 = time.perf_counter()
    dev = resolve_device("cpu" if device is None else device)
    if dev.type == "meta":
        raise ConfigError("load needs a device to put the weights on ('cpu', 'cuda:0', ...), not 'meta'", "device")
    dtype = resolve_model_dtype(dtype)
    if progress is not None and not callable(progress):
        raise ConfigError(f"expected a callable progress(done_bytes, total_bytes) or None, got {type(progress).__name__}", "progress")
    cfg = QuantizationConfig.none() if config is None else QuantizationConfig.from_any(config)
    path = check_model_folder(path)
    raw = read_model_config(path)
    if (raw.get("quantization_config") or {}).get("quant_method") == "oqcore":
        from oqcore.export import load_quantized

        return load_quantized(path, config, device=dev, dtype=dtype, progress=progress)
    check_quant_metadata(path, raw)
    # every header and the shard index, before the model is even built
    entries = {e.name: e for e in checkpoint_entries(path)}
    model = _load_online(path, cfg, dev, dtype, progress, entries, t0)
    unexpected = model.oq_state.stats.unexpected_keys
    if unexpected:
        # transformers logs these ("Some weights ... were not used") and loads on; so do we, with a
        # warning (only once the load succeeded) naming the file(s) and the tensors skipped
        files = sorted({str(entries[k].file) for k in unexpected})
        shown = ", ".join(repr(k if len(k) <= 120 else k[:117] + "...") for k in unexpected[:5])
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        warnings.warn(
            f"oqcore.load: {len(unexpected)} tensor(s) of {', '.join(files)} are not used by "
            f"{type(model).__name__} and were skipped: {shown}{more}",
            UserWarning,
            stacklevel=3,
        )
    if not model.oq_state.wrappers:
        why = "no config was given" if config is None else f"the config ({cfg.to_dict()}) matches no layer of this model"
        warnings.warn(
            f"oqcore.load({str(path)!r}): 0 layers quantized: {why}, so every layer stays in "
            f"{str(dtype).removeprefix('torch.')}; pass a config such as 'fp8_per_block' to quantize",
            UserWarning,
            stacklevel=3,
        )
    return model


def _tied_hint(model: nn.Module, names: list[str]) -> str:
    """Why a quantized layer may have no tensor in the checkpoint: its weight is tied to another."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    pairs = [f"{n}.weight is tied to {tied[f'{n}.weight']}" for n in names if isinstance(tied, dict) and f"{n}.weight" in tied]
    if not pairs:
        return ""
    return (
        f" ({'; '.join(pairs)}, so the checkpoint holds it once, under the other name; a tied weight cannot "
        "be quantized on its own: add the layer to 'ignore')"
    )


def _check_wrappers_fed(model: nn.Module, wrappers: dict, groups: list, path: Path) -> None:
    """Before reading anything: every parameter of every quantized layer has a checkpoint tensor
    (else the load would read and quantize everything, then fail). Skipped when a transformers rule
    makes several parameters from one group (its other targets are not listed in the groups)."""
    if any(len(getattr(g.rule, "target_patterns", None) or ()) > 1 for g in groups):
        return
    fed = {g.target for g in groups}
    missing = [f"{n}.{k}" for n, w in wrappers.items() for k, p in w._parameters.items() if p is not None and f"{n}.{k}" not in fed]
    if missing:
        layers = list(dict.fromkeys(m.rpartition(".")[0] for m in missing))
        shown = ", ".join(repr(m) for m in missing[:6]) + (f" (and {len(missing) - 6} more)" if len(missing) > 6 else "")
        raise CheckpointError(
            f"{path}: the checkpoint has no tensor for {len(missing)} weight(s) of quantized layer(s): {shown}"
            + _tied_hint(model, layers)
        )


def _not_ignored(model: nn.Module, keys: list[str]) -> list[str]:
    """``keys`` without those transformers itself ignores when unused: the model's
    ``_keys_to_ignore_on_load_unexpected`` patterns (``re.search``), and stale ``rotary_emb.inv_freq``
    / ``position_ids`` buffers of old checkpoints when the model has such buffers (as in
    ``PreTrainedModel._adjust_missing_and_unexpected_keys``)."""
    import re

    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    buffers = [n for n, _ in model.named_buffers()]
    if any(n.endswith("rotary_emb.inv_freq") for n in buffers):
        patterns.add(r"rotary_emb\.inv_freq")
    if any(n.endswith("position_ids") for n in buffers):
        patterns.add(r"(^|\.)position_ids$")
    if not patterns:
        return list(keys)
    rx = re.compile("|".join(f"({p})" for p in patterns))
    return [k for k in keys if rx.search(k) is None]


def _load_online(
    path: Path,
    cfg: QuantizationConfig,
    device: torch.device,
    dtype: torch.dtype,
    progress: ProgressFn | None,
    entries: dict,
    t0: float,
) -> nn.Module:
    """The streaming load of :func:`load` once its arguments and the checkpoint headers are checked."""
    stats = LoadStats()
    # The meta-device build allocates no tensor; it is left out of the memory figure because the
    # first build of an architecture also imports its modeling code (tens of MB of Python objects).
    model = build_meta_model(path, dtype)
    qplan = plan(model, cfg, device=device)
    stats.seconds_build = time.perf_counter() - t0
    # process-wide by design (glibc has one allocator); see return_large_frees_to_os
    return_large_frees_to_os()
    with PeakRSS() as mem:
        wrappers = install_wrappers(model, qplan)
        names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
        mapper = NameMapper(model, names)
        groups, unexpected = mapper.group(entries)
        unexpected = _not_ignored(model, unexpected)
        stats.unexpected_keys = unexpected
        # headers against the model: already-quantized tensors, expert counts, kinds, shapes
        check_against_model(model, groups, unexpected, entries, path)
        _check_wrappers_fed(model, wrappers, groups, path)
        # Elements each wrapper still waits for: it is quantized the moment this reaches zero.
        remaining = {name: sum(p.numel() for p in w.parameters(recurse=False)) for name, w in wrappers.items()}
        stats.hp_bytes = sum(remaining.values()) * dtype.itemsize
        stats.largest_layer_bytes = max(remaining.values(), default=0) * dtype.itemsize
        total = sum(entries[k].nbytes for g in groups for k in g.sources)
        done = 0
        if progress is not None:
            progress(0, total)
        # Free buffers wait for the next layer of their shape: at most one transformer block's other
        # quantized layers (its attention while the experts are lent out), capped at twice the largest.
        pool = StagingPool(cap_bytes=2 * stats.largest_layer_bytes)
        with TensorReader() as reader:
            lender: str | None = None  # the wrapper the current group's buffers are lent to
            want: torch.dtype | None = None  # the floating dtype the current group's target holds

            def dtype_for(e) -> torch.dtype:
                """Read floating tensors straight into the target's dtype (an fp32 checkpoint loaded
                in bf16 is converted chunk by chunk, never held whole in fp32)."""
                if want is not None and e.dtype.is_floating_point and e.dtype != want:
                    return want
                return e.dtype

            def read_into(key: str, dst: torch.Tensor | None) -> torch.Tensor | None:
                """Checkpoint tensor ``key``, into ``dst`` when it fits (its read dtype and shape,
                contiguous), else as a new tensor (lent by the pool for a quantized layer); ``None``
                if ``dst`` was given and does not fit."""
                nonlocal done
                e = entries[key]
                if dst is not None and (dst.dtype != dtype_for(e) or tuple(dst.shape) != e.shape or not dst.is_contiguous()):
                    return None
                if dst is None:
                    dst = alloc(e.shape, dtype_for(e))
                t = time.perf_counter()
                out = reader.read_into(e, dst)
                stats.seconds_read += time.perf_counter() - t
                done += e.nbytes
                return out

            def read(key: str) -> torch.Tensor:
                """Checkpoint tensor ``key`` as a CPU tensor (timed and counted)."""
                return read_into(key, None)

            def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
                """A new CPU tensor for the current group: lent by the pool for a quantized layer."""
                return pool.take(lender, shape, dtype) if lender is not None else torch.empty(shape, dtype=dtype)

            for i, g in enumerate(groups):
                lender = param_owner(g.target, wrappers)
                # one-to-many transformers rules run their own ops on the checkpoint's dtype
                want = placeholder_dtype(model, g.target) if g.rule is None or is_expert_fusion(g.rule) else None
                converted = g.convert(
                    model, read, lambda k, dst: read_into(k, dst) is not None, alloc, lambda k: (entries[k].shape, dtype_for(entries[k]))
                )
                for name in list(converted):
                    # popped, not iterated: no reference may outlive the quantization below, or its
                    # staging buffer could not go back to the pool
                    value = converted.pop(name)
                    assign_tensor(model, name, value, device)
                    del value
                    owner = param_owner(name, wrappers)
                    if owner is None:
                        continue
                    remaining[owner] -= model.get_parameter(name).numel()
                    if remaining[owner] == 0:
                        # the disk (if the checkpoint is not cached) reads ahead while we quantize
                        reader.prefetch(entries[k] for h in groups[i + 1 : i + 1 + PREFETCH_GROUPS] for k in h.sources)
                        t = time.perf_counter()
                        w = wrappers[owner]
                        process_layer(w)
                        pool.give_back(owner)
                        release_free_memory()
                        stats.seconds_quantize += time.perf_counter() - t
                if progress is not None:
                    progress(done, total)
        stats.reused_bytes = pool.reused_bytes
        pool.clear()
        stats.bytes_read = done
        incomplete = [n for n, left in remaining.items() if left]
        if incomplete:
            raise CheckpointError(
                f"{path}: quantized layer(s) never received all their weights: {', '.join(incomplete)}"
                + _tied_hint(model, incomplete)
            )
        finalize(model, device, wrappers, str(path))
    stats.baseline_rss, stats.peak_rss = mem.baseline, mem.peak
    stats.quantized_bytes = sum(tensor_bytes(w) for w in wrappers.values())
    stats.model_bytes = tensor_bytes(model)
    stats.seconds_total = time.perf_counter() - t0
    model.eval()
    model.oq_state = OqState(
        config=cfg,
        plan=qplan,
        wrappers=wrappers,
        device=device,
        dtype=dtype,
        source=path,
        groups={g.target: g for g in groups},
        source_shapes={k: entries[k].shape for g in groups for k in g.sources},
        stats=stats,
    )
    return model
