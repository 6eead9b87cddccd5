"""The transformers ``HfQuantizer`` behind :class:`oqcore.hf.OqcoreConfig`: ``from_pretrained``
quantizes each layer online, the moment transformers has loaded all of its weights, with the same
plan, methods, quantizer implementations and forward backends as :func:`oqcore.load`.

Where it hooks into transformers (5.x, ``transformers.modeling_utils`` / ``core_model_loading``):

1. ``validate_environment`` / ``_process_model_before_weight_loading`` (model on the meta device,
   built by transformers): :func:`oqcore.plan` the model, swap each planned layer for its oqcore
   wrapper (meta high-precision parameters: ``weight``/``bias``, or fused experts under
   transformers' own ``gate_up_proj``/``down_proj`` names), and read the checkpoint's headers to
   map checkpoint keys to parameters (what :func:`oqcore.reload_weights` needs later).
2. ``param_needs_quantization``: true for every parameter of a wrapper, so transformers routes it
   through ``get_quantize_ops()``, an :class:`OqFeed` ``ConversionOps`` that runs after
   transformers' own converters (expert fusion, renames). The op assigns the tensor to the wrapper
   and, once the wrapper has every element, runs the method's ``process_weights_after_loading``
   (the layer's high-precision weights live only until then, as in :func:`oqcore.load`).
3. ``_process_model_after_weight_loading``: fail on a wrapper that never got all its weights,
   rebuild the backends' repacks (transformers re-creates every non-persistent buffer with
   ``empty_like`` after loading, ``_move_missing_keys_from_meta_to_device``, which turns repacked
   scales into garbage), and attach ``model.oq_state`` so :func:`oqcore.report`,
   :func:`oqcore.reload_weights` and :func:`oqcore.save_quantized` work on the model.

4. ``save_pretrained``: ``is_serializable`` (asked before transformers creates the folder) builds
   the compressed-tensors checkpoint :func:`oqcore.save_quantized` writes, or raises its
   :class:`oqcore.SaveError` (GPT-OSS experts, expert blocks straddling gate and up, ...);
   ``get_state_dict_and_metadata`` hands transformers the tensors under the model's names (experts
   per expert), which its ``revert_weight_conversion`` renames to the checkpoint's; while
   ``save_pretrained`` writes ``config.json``, :meth:`oqcore.hf.OqcoreConfig.to_dict` returns the
   compressed-tensors ``quantization_config``. The folder has the same tensors (name, dtype,
   shape, bytes) and the same ``quantization_config`` as ``save_quantized``'s; it loads in
   transformers through its compressed-tensors support without oqcore, and in :func:`oqcore.load`
   bit-identical. Unlike ``save_quantized``, ``save_pretrained`` writes in place (not atomically)
   and copies no tokenizer files, as for any transformers model.

Errors: transformers catches every exception a ``ConversionOps`` raises, logs it and ends the load
with a ``RuntimeError``; the op therefore records the first :class:`oqcore.OqError` (quantizing
stops there) and step 3 raises it, so ``from_pretrained`` fails with the same typed error
:func:`oqcore.load` would give. Errors from steps 1 and 3 propagate as they are.
"""

from __future__ import annotations

import os
import time
import warnings
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer

from oqcore.devices import resolve_device
from oqcore.errors import CheckpointError, ConfigError, InternalError, OqError, SaveError
from oqcore.hf.frames import save_pretrained_locals
from oqcore.loading.checkpoint import checkpoint_entries
from oqcore.loading.install import install_wrappers, process_layer
from oqcore.loading.memory import PeakRSS, release_free_memory
from oqcore.loading.meta import resolve_model_dtype
from oqcore.loading.names import NameMapper
from oqcore.loading.place import assign_tensor, param_owner
from oqcore.loading.siblings import SiblingQueue, sibling_groups
from oqcore.loading.state import LoadStats, OqState, get_state, tensor_bytes
from oqcore.methods import refuse_static_online
from oqcore.planning import plan
from oqcore.saved_format import QUANT_METHOD as PRODUCER_METADATA
from oqcore.torch_compat import mark_initialized


def _device_of(device_map: Any) -> torch.device:
    """The one device ``device_map`` puts the model on (``None``: the CPU). Raises
    :class:`oqcore.ConfigError` (field ``device_map``) for a map spreading the model over several
    devices or offloading it (``"auto"``, ``"disk"``): not supported by oqcore's integration yet."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        devices = set(map(str, device_map.values()))
        if len(devices) != 1:
            raise ConfigError(
                f"{device_map!r} spreads the model over {sorted(devices)}; oqcore quantizes onto one device: pass "
                "device_map='cpu' (or one device such as 'cuda:0')",
                "device_map",
            )
        device_map = next(iter(device_map.values()))
    if isinstance(device_map, int):
        device_map = f"cuda:{device_map}"
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential", "disk"):
        raise ConfigError(
            f"{device_map!r} is not supported with OqcoreConfig; pass device_map='cpu' or one device such as 'cuda:0'",
            "device_map",
        )
    dev = resolve_device(device_map, "device_map")
    if dev.type == "meta":
        raise ConfigError("the model needs a device to hold its weights ('cpu', 'cuda:0', ...), not 'meta'", "device_map")
    return dev


class OqcoreHfQuantizer(HfQuantizer):
    """transformers' quantizer for ``quant_method: "oqcore"`` (see the module docstring).

    Quantizes online only: a checkpoint whose ``config.json`` already declares ``quant_method:
    "oqcore"`` is refused with :class:`oqcore.CheckpointError` (read folders oqcore wrote with
    :func:`oqcore.load`). ``save_pretrained`` writes the compressed-tensors folder
    :func:`oqcore.save_quantized` writes (see :meth:`get_state_dict_and_metadata`)."""

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.device = torch.device("cpu")
        self.dtype: torch.dtype = torch.bfloat16
        self.source: Path | None = None
        self.qplan = None
        self.wrappers: dict[str, nn.Module] = {}
        self.remaining: dict[str, int] = {}
        self.queue = SiblingQueue({}, process_layer)
        self.groups: list = []
        self.source_shapes: dict[str, tuple[int, ...]] = {}
        self.error: OqError | None = None
        self.stats = LoadStats()
        self._mem: PeakRSS | None = None
        self._t0 = 0.0
        self._model: weakref.ref | None = None
        self._pending: tuple | None = None
        self.saved_config: dict | None = None

    # -- before loading -----------------------------------------------------------------------------

    def validate_environment(self, *args, device_map=None, **kwargs):
        """Refuse an already-quantized checkpoint (:class:`oqcore.CheckpointError`) and settle the
        device from ``device_map`` (:class:`oqcore.ConfigError`, field ``device_map``, for more
        than one device). Called by transformers before the model is built."""
        if self.pre_quantized:
            raise CheckpointError(
                "this checkpoint's config.json declares quant_method 'oqcore': from_pretrained quantizes high-precision "
                "checkpoints only; load an oqcore-quantized folder with oqcore.load(path)"
            )
        self.device = _device_of(device_map)

    def update_device_map(self, device_map):
        """``device_map`` unchanged (the base class would do the same; kept explicit: oqcore needs
        no accelerate dispatch)."""
        return device_map

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs):
        """Plan the meta-device ``model`` and install the wrappers (step 1 of the module
        docstring). ``kwargs`` from transformers: ``dtype`` (the high-precision dtype),
        ``checkpoint_files`` (safetensors files; their folder's headers are read, as
        :func:`oqcore.load` reads them). Raises what :func:`oqcore.plan` raises, and
        :class:`oqcore.CheckpointError` for unreadable headers."""
        self._t0 = time.perf_counter()
        self.error = None
        self.dtype = resolve_model_dtype(kwargs.get("dtype") or torch.get_default_dtype())
        files = kwargs.get("checkpoint_files") or []
        self.source = Path(files[0]).parent if files else None
        self.qplan = plan(model, self.quantization_config.oq_config, device=self.device)
        refuse_static_online(self.qplan.quantized)
        self.wrappers = install_wrappers(model, self.qplan)
        self.remaining = {n: sum(p.numel() for p in w.parameters(recurse=False)) for n, w in self.wrappers.items()}
        self.queue = SiblingQueue(sibling_groups(self.wrappers), process_layer)  # fused siblings share a global scale
        self.stats = stats = LoadStats()
        stats.hp_bytes = sum(self.remaining.values()) * self.dtype.itemsize
        stats.largest_layer_bytes = max(self.remaining.values(), default=0) * self.dtype.itemsize
        self._map_checkpoint(model)
        stats.seconds_build = time.perf_counter() - self._t0
        self._mem = PeakRSS().__enter__()
        return model

    def _map_checkpoint(self, model: nn.Module) -> None:
        """Checkpoint key -> parameter groups, with oqcore's mapper (transformers' own rules), kept
        for :func:`oqcore.reload_weights` in checkpoint naming. Headers only: no weight is read."""
        self.groups, self.source_shapes = [], {}
        if self.source is None or not self.source.is_dir():
            return
        entries = {e.name: e for e in checkpoint_entries(self.source)}
        names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
        self.groups, _ = NameMapper(model, names).group(entries)
        self.source_shapes = {k: entries[k].shape for g in self.groups for k in g.sources}

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs) -> bool:
        """Whether ``param_name`` (a model parameter name, after transformers' renames) belongs to
        a quantized layer: then transformers hands it to :meth:`get_quantize_ops`."""
        return param_owner(param_name, self.wrappers) is not None

    def get_quantize_ops(self):
        """The :class:`OqFeed` op transformers runs on each such parameter."""
        return OqFeed(self)

    # -- while loading (called by OqFeed) -----------------------------------------------------------

    def feed(self, model: nn.Module, name: str, value: torch.Tensor, missing_keys: set | None) -> None:
        """Put high-precision ``value`` at wrapper parameter ``name``; quantize the wrapper when
        it is complete. Records the first error instead of raising (see the module docstring)."""
        if missing_keys is not None:
            # transformers must neither re-create this key with empty_like nor report it missing
            missing_keys.discard(name)
        if self.error is not None:
            return
        try:
            owner = param_owner(name, self.wrappers)
            if owner is None:
                raise InternalError(f"oqcore.hf: parameter {name!r} was routed to oqcore but belongs to no quantized layer")
            assign_tensor(model, name, value, self.device)
            self.remaining[owner] -= model.get_parameter(name).numel()
            if self.remaining[owner] == 0:
                t = time.perf_counter()
                for done in self.queue.complete(owner, self.wrappers[owner]):
                    w = self.wrappers[done]
                    for p in w.parameters(recurse=False):
                        mark_initialized(p)
                    mark_initialized(w)
                release_free_memory()
                self.stats.seconds_quantize += time.perf_counter() - t
        except OqError as e:
            self.error = e
        except Exception as e:  # noqa: BLE001 - a bug of ours: still typed, never transformers' RuntimeError
            err = InternalError(f"oqcore.hf: loading {name!r} failed: {type(e).__name__}: {e}")
            err.__cause__ = e
            self.error = err

    # -- after loading ------------------------------------------------------------------------------

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs):
        """Step 3 of the module docstring. Raises the first error recorded while loading, or
        :class:`oqcore.CheckpointError` naming the layers that never got all their weights; warns
        (``UserWarning``, as :func:`oqcore.load`) when the config quantized no layer."""
        mem, self._mem = self._mem, None
        if mem is not None:
            mem.__exit__(None, None, None)
        if self.error is not None:
            err, self.error = self.error, None
            raise err
        incomplete = [n for n, left in self.remaining.items() if left] + self.queue.incomplete()
        if incomplete:
            tied = getattr(model, "all_tied_weights_keys", None) or {}
            hint = [f"{n}.weight is tied to {tied[n + '.weight']}" for n in incomplete if f"{n}.weight" in tied]
            raise CheckpointError(
                f"{self.source}: quantized layer(s) never received all their weights: {', '.join(incomplete)}"
                + (f" ({'; '.join(hint)}: a tied weight cannot be quantized on its own: add the layer to 'ignore')" if hint else "")
            )
        if not self.wrappers:
            cfg = self.quantization_config.oq_config
            warnings.warn(
                f"OqcoreConfig: 0 layers quantized: the config ({cfg.to_dict()}) matches no layer of "
                f"{type(model).__name__}, so every layer stays in {str(self.dtype).removeprefix('torch.')}",
                UserWarning,
                stacklevel=2,
            )
        for w in self.wrappers.values():
            # transformers replaced every non-persistent buffer (the backends' repacks) with empty_like
            prepare = w.method.backend.prepare
            if prepare is not None:
                prepare(w.method, w)
        stats = self.stats
        if mem is not None:
            stats.baseline_rss, stats.peak_rss = mem.baseline, mem.peak
        stats.quantized_bytes = sum(tensor_bytes(w) for w in self.wrappers.values())
        stats.model_bytes = tensor_bytes(model)
        stats.seconds_total = time.perf_counter() - self._t0
        model.oq_state = OqState(
            config=self.quantization_config.oq_config,
            plan=self.qplan,
            wrappers=self.wrappers,
            device=self.device,
            dtype=self.dtype,
            source=self.source,
            groups={g.target: g for g in self.groups},
            source_shapes=self.source_shapes,
            stats=stats,
        )
        self._model = weakref.ref(model)
        return model

    def __del__(self):
        # a load that transformers aborted between our hooks leaves the memory sampler running
        mem, self._mem = getattr(self, "_mem", None), None
        if mem is not None:
            mem.__exit__(None, None, None)

    def is_serializable(self):
        """Whether ``save_pretrained`` can write the model: transformers asks this first, before it
        creates the folder, so this is where a model compressed-tensors cannot hold is refused:
        :class:`oqcore.SaveError` as :func:`oqcore.save_quantized` raises it (GPT-OSS experts,
        128-row expert blocks with I % 128 != 0, a scheme without a compressed-tensors form, a
        model whose quantized layers were replaced; the folder the model was loaded from, or one
        inside or around it: the source checkpoint is never overwritten), nothing written. The checkpoint is built here
        and handed to :meth:`get_state_dict_and_metadata`."""
        model = self._model() if self._model is not None else None
        if model is None:
            raise SaveError(
                "save_pretrained: this OqcoreConfig quantizer holds no loaded model (from_pretrained did not finish); "
                "nothing to save"
            )
        source = getattr(getattr(model, "oq_state", None), "source", None)
        call = save_pretrained_locals(lambda m: m is model)
        if call is not None and source is not None:
            from oqcore.export import _check_not_source

            try:
                given = Path(os.path.abspath(os.fspath(call["save_directory"])))
            except (KeyError, TypeError):
                given = None  # not a path: transformers itself fails on it
            if given is not None:
                _check_not_source(Path(source), given.resolve(), given)
        self._pending = (self._model, *self._export(model))
        return True

    def get_state_dict_and_metadata(self, model: nn.Module):
        """``(tensors, safetensors metadata)`` for ``save_pretrained``: the tensors of
        :func:`oqcore.save_quantized`'s compressed-tensors folder under the model's names except the
        experts (per expert, already in checkpoint naming); transformers' ``revert_weight_conversion``
        then gives every name the checkpoint's (``save_original_format=False`` keeps the model's
        names, which no reader expects). The compressed-tensors ``quantization_config`` is kept
        for :meth:`oqcore.hf.OqcoreConfig.to_dict`, which returns it while this model's
        ``save_pretrained`` writes ``config.json``."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0]() is model:
            tensors, qc = pending[1], pending[2]
        else:
            tensors, qc = self._export(model)
        self.saved_config = qc
        return tensors, {"producer": PRODUCER_METADATA}

    def _export(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
        from oqcore.export import compressed_tensors_export

        try:
            state = get_state(model)
            return compressed_tensors_export(model, state, "model.save_pretrained(...)", checkpoint_names=False)
        except SaveError as e:
            hint = "" if "format='oqcore'" not in str(e) else (
                " (save_pretrained writes compressed-tensors only: use oqcore.save_quantized(model, folder, format='oqcore'))"
            )
            raise SaveError(f"{e}{hint}") from None
        except OqError as e:
            raise SaveError(f"cannot save with model.save_pretrained(...): {e}") from None

    @property
    def is_trainable(self) -> bool:
        """False: quantized layers hold no gradients (refit them with :func:`oqcore.reload_weights`)."""
        return False

    @property
    def is_compileable(self) -> bool:
        """True: the wrappers' forwards are what :func:`oqcore.load`'s model runs under
        ``torch.compile`` (transformers asks this before compiling in ``generate``)."""
        return True


class OqFeed(ConversionOps):
    """The ``ConversionOps`` transformers runs on each high-precision tensor of a quantized layer,
    after its own converters (renames, per-expert -> fused experts): hands ``{parameter name:
    tensor}`` to :meth:`OqcoreHfQuantizer.feed` and returns nothing for transformers to set (the
    wrapper holds the tensors, then their quantized form)."""

    def __init__(self, hf_quantizer: OqcoreHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], source_patterns=None, target_patterns=None, **kwargs) -> dict:
        """Feed ``input_dict`` (``{parameter name: tensor or one-tensor list}``, after
        transformers' converters) to the quantizer, drop the names from transformers'
        ``missing_keys``, and return ``{}``. Never raises: the first :class:`oqcore.OqError` is
        recorded on the quantizer (raised after loading), since transformers would turn it into a
        generic ``RuntimeError``."""
        model, missing = kwargs.get("model"), kwargs.get("missing_keys")
        for name in list(input_dict):
            value = input_dict.pop(name)
            if isinstance(value, list):
                if len(value) != 1:
                    self.hf_quantizer.error = self.hf_quantizer.error or InternalError(
                        f"oqcore.hf: {len(value)} tensors arrived for parameter {name!r} (expected one, after transformers' converters)"
                    )
                    continue
                value = value[0]
            self.hf_quantizer.feed(model, name, value, missing)
            del value
        return {}
