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

:func:`load` checks its arguments and the headers; the steps are the methods of one
``_OnlineLoader`` per load. A folder written by :func:`oqcore.save_quantized` is read by
:mod:`oqcore.loading.saved` instead (no re-quantization), a compressed-tensors checkpoint by
:mod:`oqcore.loading.compressed`.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oqcore.config import QuantizationConfig
from oqcore.devices import resolve_device
from oqcore.errors import CheckpointError, ConfigError
from oqcore.loading.checkpoint import TensorReader, check_model_folder, checkpoint_entries
from oqcore.loading.checks import check_against_model, check_quant_metadata
from oqcore.loading.compressed import load_compressed
from oqcore.loading.ct_config import declares_compressed_tensors
from oqcore.loading.install import install_wrappers, process_layer
from oqcore.loading.memory import PeakRSS, release_free_memory
from oqcore.loading.meta import build_meta_model, read_model_config, resolve_model_dtype
from oqcore.loading.names import NameMapper, is_expert_fusion
from oqcore.loading.peer_configs import declares_peer_format
from oqcore.loading.place import assign_tensor, finalize, param_owner, placeholder_dtype
from oqcore.loading.saved import load_quantized
from oqcore.loading.siblings import SiblingQueue, sibling_groups
from oqcore.loading.staging import StagingPool
from oqcore.loading.state import LoadStats, OqState, tensor_bytes
from oqcore.methods import refuse_static_online
from oqcore.parallel.comm import resolve_group
from oqcore.parallel.forward import finish_sharded
from oqcore.parallel.localize import localize
from oqcore.parallel.plan import module_styles, plan_entries
from oqcore.parallel.shard import join_as_failed
from oqcore.parallel.sources import cut_converted, param_split, slice_group
from oqcore.planning import plan
from oqcore.saved_format import declares_export
from oqcore.torch_compat import own_parameters

ProgressFn = Callable[[int, int], None]

PREFETCH_GROUPS = 8
"""How many checkpoint target groups ahead the kernel is asked to read before a layer is quantized."""


def load(
    path: str | Path,
    config: QuantizationConfig | dict | str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.bfloat16,
    progress: ProgressFn | None = None,
    mesh: Any = None,
    parallel: str | dict | None = None,
) -> nn.Module:
    """Load the Hugging Face model folder ``path`` and quantize it while loading.

    ``config`` is a :class:`QuantizationConfig` (or a dict, a YAML path, a shorthand name); ``None``
    loads the model unquantized and says so with a ``UserWarning`` ("0 layers quantized", also
    given when a config matches no layer of this model). ``device`` is where the model lives and
    runs (checked first: :func:`oqcore.devices.resolve_device`); ``dtype`` the high-precision dtype
    of everything not quantized (and of the weights before quantization): ``torch.bfloat16``,
    ``torch.float16``, ``torch.float32``, ``torch.float64`` or their names (``"bfloat16"``).
    ``progress(done_bytes, total_bytes)`` is called as tensors are read. A folder that holds
    quantized weights is read as stored, without re-quantizing: a folder written by
    :func:`oqcore.save_quantized` (either format), a compressed-tensors checkpoint
    (``quant_method: compressed-tensors``, :mod:`oqcore.loading.compressed`), a transformers
    FineGrainedFP8 one (``quant_method: fp8``) and an NVIDIA ModelOpt FP8 one
    (``hf_quant_config.json`` or ``quant_method: modelopt``; :mod:`oqcore.loading.peer_configs`).
    With such a folder ``config`` is ``None`` (as stored) or an overlay with vLLM's semantics
    (:mod:`oqcore.loading.overlay`): the checkpoint's own scheme or an activation-only spec
    (``{"moe": {"activation": "mxfp8"}}``) keeps the stored bytes and may add the activation the
    checkpoint does not declare, and the layers it stores in high precision are quantized online
    as ``config`` says; a conflicting weight key or activation, or a target naming a stored layer,
    is a :class:`oqcore.ConfigError` naming both.

    Before any weight is read, the folder, ``config.json``, the shard index and every safetensors
    header are checked (and against the model: tensor kinds, shapes, expert counts), and a
    checkpoint that already holds quantized tensors without declaring it in ``config.json`` is
    refused. Safe to call from several threads at once: a load changes no process-wide setting (no
    allocator setting either: after each layer it only hands free memory back to the OS, see
    :func:`oqcore.loading.memory.release_free_memory`). The peak-memory figures in the report are
    the process's: with loads running concurrently, each includes what the others hold.

    **Tensor / expert parallel** (:mod:`oqcore.parallel`): with ``mesh`` (a 1-D ``DeviceMesh``, a
    ``ProcessGroup``; ``None`` = the default group) or ``parallel`` given, every rank of the group
    calls ``load`` with the same arguments and ends with its shard of the quantized model.
    ``parallel`` is ``"tp"`` (the default: transformers' ``tp_plan`` for the architecture),
    ``"ep"`` (the same with experts split by expert: ``ep_plan``) or a dict ``{module pattern:
    style}`` in transformers' syntax. Each rank reads only its slices of the checkpoint tensors (by
    file offset), MAX-reduces the amax of scale groups its cut crosses, and gets exactly the bytes
    of the unsharded result for its piece; the forward runs the collectives the plan implies. A
    cut through a scale group (a 128x128 or 1x32 block) is an :class:`oqcore.UnsupportedLayerError`
    naming the layer and sizes, before anything is read; a failure on one rank raises on every
    rank at the same point (:class:`oqcore.DistributedError` on the others). Only high-precision
    checkpoints load in parallel.

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
    sharding = None
    if mesh is not None or parallel is not None:
        sharding = (resolve_group(mesh), "tp" if parallel is None else parallel)
    path = check_model_folder(path)
    raw = read_model_config(path)
    if sharding is not None and (declares_export(raw) or declares_compressed_tensors(raw) or declares_peer_format(path, raw)):
        raise ConfigError(
            f"{path} holds quantized weights; parallel loading reads high-precision checkpoints only "
            "(load it without mesh/parallel)",
            "parallel",
        )
    if declares_export(raw):
        return load_quantized(path, config, device=dev, dtype=dtype, progress=progress)
    if declares_compressed_tensors(raw) or declares_peer_format(path, raw):
        return load_compressed(path, config, device=dev, dtype=dtype, progress=progress)
    check_quant_metadata(path, raw)
    # every header and the shard index, before the model is even built
    entries = {e.name: e for e in checkpoint_entries(path)}
    model = _OnlineLoader(path, cfg, dev, dtype, progress, entries, t0, sharding).run()
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
    missing = [f"{n}.{k}" for n, w in wrappers.items() for k in own_parameters(w) if f"{n}.{k}" not in fed]
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


class _OnlineLoader:
    """One streaming load (steps 1-4 of the module docstring), once its arguments and the
    checkpoint headers are checked: :meth:`run` builds and plans the model, maps and checks the
    checkpoint against it, streams every target group into place (quantizing each layer the
    moment its last element arrives) and finishes the model.

    Holds no tensor of its own between groups but the staging pool's buffers: a group's converted
    tensors live only in :meth:`_place_group`'s frame, so nothing outlives a layer's quantization
    and its buffers can go back to the pool. Used once; raises as :func:`load` documents.
    """

    def __init__(
        self,
        path: Path,
        cfg: QuantizationConfig,
        device: torch.device,
        dtype: torch.dtype,
        progress: ProgressFn | None,
        entries: dict,
        t0: float,
        sharding: tuple | None = None,
    ):
        self.path, self.cfg, self.device, self.dtype, self.progress = path, cfg, device, dtype, progress
        self.sharding = sharding  # (Group, parallel plan) or None
        self.shards: dict = {}  # module name -> LayerShard (a parallel load)
        self.foreign: list[str] = []  # checkpoint keys of experts other ranks own (never read)
        self.entries = entries  # checkpoint key -> TensorEntry (every header, already read)
        self.t0 = t0  # when load() started (perf_counter), for the timings in stats
        self.stats = LoadStats()
        self.model: nn.Module | None = None
        self.qplan = None
        self.wrappers: dict[str, nn.Module] = {}
        self.groups: list = []  # TargetGroups, in checkpoint read order
        self.remaining: dict[str, int] = {}  # wrapper -> elements it still waits for
        self.total = 0  # bytes the groups read
        self.done = 0  # bytes read so far
        self.pool: StagingPool | None = None
        self.reader: TensorReader | None = None  # open while streaming
        self.lender: str | None = None  # the wrapper the current group's buffers are lent to
        self.want: torch.dtype | None = None  # the floating dtype the current group's target holds

    def run(self) -> nn.Module:
        """The quantized model, in eval mode, with ``oq_state`` set."""
        self._build()
        with PeakRSS() as mem:
            self._map_and_check()
            if self.sharding is not None:
                self._shard()
            self._count()
            self._stream()
            incomplete = [n for n, left in self.remaining.items() if left] + self.queue.incomplete()
            if incomplete:
                raise CheckpointError(
                    f"{self.path}: quantized layer(s) never received all their weights: {', '.join(incomplete)}"
                    + _tied_hint(self.model, incomplete)
                )
            finalize(self.model, self.device, self.wrappers, str(self.path))
            if self.shards:
                finish_sharded(self.model, self.shards)
        return self._result(mem)

    # -- steps -------------------------------------------------------------------------------------

    def _build(self) -> None:
        """The model on the meta device, and its plan."""
        # The meta-device build allocates no tensor; it is left out of the memory figure because the
        # first build of an architecture also imports its modeling code (tens of MB of Python objects).
        self.model = build_meta_model(self.path, self.dtype)
        self.qplan = plan(self.model, self.cfg, device=self.device)
        refuse_static_online(self.qplan.quantized)
        self.stats.seconds_build = time.perf_counter() - self.t0

    def _map_and_check(self) -> None:
        """Install the wrappers, map every checkpoint key to its target group and check the
        headers against the model, before any weight is read."""
        model, stats = self.model, self.stats
        self.wrappers = wrappers = install_wrappers(model, self.qplan)
        names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
        groups, unexpected = NameMapper(model, names).group(self.entries)
        unexpected = _not_ignored(model, unexpected)
        stats.unexpected_keys = unexpected
        # headers against the model: already-quantized tensors, expert counts, kinds, shapes
        check_against_model(model, groups, unexpected, self.entries, self.path)
        _check_wrappers_fed(model, wrappers, groups, self.path)
        self.groups = groups

    def _shard(self) -> None:
        """Cut the meta model to this rank's shard and its sources to this rank's slices."""
        group, parallel = self.sharding
        styles = module_styles(self.model, plan_entries(self.model, parallel))
        if not styles:
            raise ConfigError(
                f"the parallel plan {parallel!r} splits no layer of {type(self.model).__name__} (it names no linear "
                "or quantized experts module of it); pass parallel='ep' or a dict {module pattern: style}",
                "parallel",
            )
        self.shards = localize(self.model, styles, group)
        self.entries = dict(self.entries)
        for g in self.groups:
            split = param_split(g.target, self.shards)
            if split is not None:
                self.foreign += slice_group(g, split, self.entries)

    def _count(self) -> None:
        """Elements each wrapper waits for, and the byte figures, from the (local) shapes."""
        model, stats, wrappers, groups = self.model, self.stats, self.wrappers, self.groups
        # Elements each wrapper still waits for: it is quantized the moment this reaches zero.
        self.remaining = {name: sum(p.numel() for p in w.parameters(recurse=False)) for name, w in wrappers.items()}
        self.queue = SiblingQueue(sibling_groups(wrappers), process_layer)
        stats.hp_bytes = sum(self.remaining.values()) * self.dtype.itemsize
        stats.largest_layer_bytes = max(self.remaining.values(), default=0) * self.dtype.itemsize
        self.total = sum(self.entries[k].nbytes for g in groups for k in g.sources)

    def _stream(self) -> None:
        """Read, convert and place every group; quantize each layer when it is complete."""
        if self.progress is not None:
            self.progress(0, self.total)
        # Free buffers wait for the next layer of their shape: at most one transformer block's other
        # quantized layers (its attention while the experts are lent out), capped at twice the largest.
        self.pool = StagingPool(cap_bytes=2 * self.stats.largest_layer_bytes)
        failure = None
        with TensorReader() as reader:
            self.reader = reader
            try:
                for i, g in enumerate(self.groups):
                    if failure is not None:
                        self._skip_group(g)
                        continue
                    try:
                        self._place_group(i, g)
                    except Exception as e:
                        if not self.shards:
                            raise
                        failure = e  # keep joining the collectives the other ranks will run
                        for shard in self.shards.values():  # a layer failing mid-quantization
                            shard.fail_pending(f"loading {self.path}")
                        for wrapper in self.queue.unprocessed:  # its fused siblings after it
                            self._join_failed(wrapper)
                        self._skip_group(g)  # a group failing before it was placed
                    if self.progress is not None:
                        self.progress(self.done, self.total)
            finally:
                self.reader = None
        if self.shards:
            next(iter(self.shards.values())).group.check(failure is not None, f"loading {self.path}")
        if failure is not None:
            raise failure
        self.stats.reused_bytes = self.pool.reused_bytes
        self.pool.clear()
        self.stats.bytes_read = self.done

    def _skip_group(self, g) -> None:
        """After this rank failed: count group ``g`` as placed unless it was (nothing is read)
        and join the collectives of each sharded wrapper it completes, as failed."""
        owner = param_owner(g.target, self.wrappers)
        try:
            param = self.model.get_parameter(g.target)
        except AttributeError:  # quantized (and replaced) before the failure
            return
        if owner is None or not param.is_meta:
            return
        self.remaining[owner] -= param.numel()
        if self.remaining[owner] == 0:
            self.queue.complete(owner, self.wrappers[owner], dry=self._join_failed)

    def _join_failed(self, wrapper: nn.Module) -> None:
        """A failed rank's stand-in for quantizing ``wrapper`` (:func:`~oqcore.parallel.shard.join_as_failed`)."""
        join_as_failed(wrapper, f"loading {self.path}")

    def _place_group(self, i: int, g) -> None:
        """Group ``i`` (``g``) converted and assigned; a wrapper it completes is quantized."""
        self.lender = param_owner(g.target, self.wrappers)
        # one-to-many transformers rules run their own ops on the checkpoint's dtype
        self.want = placeholder_dtype(self.model, g.target) if g.rule is None or is_expert_fusion(g.rule) else None
        converted = g.convert(self.model, self._read, self._read_into_fits, self._alloc, self._source_layout)
        for name in list(converted):
            # popped, not iterated: no reference may outlive the quantization below, or its
            # staging buffer could not go back to the pool
            value = converted.pop(name)
            if self.shards:
                value = cut_converted(name, value, self.shards)
            assign_tensor(self.model, name, value, self.device)
            del value
            owner = param_owner(name, self.wrappers)
            if owner is None:
                continue
            self.remaining[owner] -= self.model.get_parameter(name).numel()
            if self.remaining[owner] == 0:
                self._quantize(owner, i)

    def _quantize(self, owner: str, i: int) -> None:
        """Quantize wrapper ``owner`` (complete after group ``i``) and take its buffers back."""
        # the disk (if the checkpoint is not cached) reads ahead while we quantize
        self.reader.prefetch(self.entries[k] for h in self.groups[i + 1 : i + 1 + PREFETCH_GROUPS] for k in h.sources)
        t = time.perf_counter()
        for name in self.queue.complete(owner, self.wrappers[owner]):  # fused siblings wait for each other
            self.pool.give_back(name)
        release_free_memory()
        self.stats.seconds_quantize += time.perf_counter() - t

    def _result(self, mem: PeakRSS) -> nn.Module:
        """The model with its figures and ``oq_state``, in eval mode."""
        stats, model, entries = self.stats, self.model, self.entries
        stats.baseline_rss, stats.peak_rss = mem.baseline, mem.peak
        stats.quantized_bytes = sum(tensor_bytes(w) for w in self.wrappers.values())
        stats.model_bytes = tensor_bytes(model)
        stats.seconds_total = time.perf_counter() - self.t0
        model.eval()
        model.oq_state = OqState(
            config=self.cfg,
            plan=self.qplan,
            wrappers=self.wrappers,
            device=self.device,
            dtype=self.dtype,
            source=self.path,
            groups={g.target: g for g in self.groups},
            source_shapes={k: entries[k].shape for g in self.groups for k in g.sources},
            stats=stats,
            shards=self.shards,
            # what a reload under the same sharding needs to cut full tensors the way this load read them
            source_cuts={k: e for g in self.groups for k in g.sources if hasattr(e := entries[k], "full_shape")},
            foreign_sources=frozenset(self.foreign),
        )
        return model

    # -- reading, for TargetGroup.convert ------------------------------------------------------------

    def _dtype_for(self, e) -> torch.dtype:
        """Read floating tensors straight into the target's dtype (an fp32 checkpoint loaded in
        bf16 is converted chunk by chunk, never held whole in fp32)."""
        if self.want is not None and e.dtype.is_floating_point and e.dtype != self.want:
            return self.want
        return e.dtype

    def _read_into(self, key: str, dst: torch.Tensor | None) -> torch.Tensor | None:
        """Checkpoint tensor ``key``, into ``dst`` when it fits (its read dtype and shape,
        contiguous), else as a new tensor (lent by the pool for a quantized layer); ``None`` if
        ``dst`` was given and does not fit."""
        e = self.entries[key]
        if dst is not None and (dst.dtype != self._dtype_for(e) or tuple(dst.shape) != e.shape or not dst.is_contiguous()):
            return None
        if dst is None:
            dst = self._alloc(e.shape, self._dtype_for(e))
        t = time.perf_counter()
        out = self.reader.read_into(e, dst)
        self.stats.seconds_read += time.perf_counter() - t
        self.done += e.nbytes
        return out

    def _read(self, key: str) -> torch.Tensor:
        """Checkpoint tensor ``key`` as a CPU tensor (timed and counted)."""
        return self._read_into(key, None)

    def _read_into_fits(self, key: str, dst: torch.Tensor) -> bool:
        """Read checkpoint tensor ``key`` into ``dst``; whether it fitted (else nothing was read)."""
        return self._read_into(key, dst) is not None

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A new CPU tensor for the current group: lent by the pool for a quantized layer."""
        if self.lender is not None:
            return self.pool.take(self.lender, shape, dtype)
        return torch.empty(shape, dtype=dtype)

    def _source_layout(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """``(shape, dtype)`` checkpoint tensor ``key`` is read as."""
        e = self.entries[key]
        return e.shape, self._dtype_for(e)
