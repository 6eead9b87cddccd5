"""``quantize_``: the same plan applied to a model that is already in memory."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import torch
from torch import nn

from oqcore.config import QuantizationConfig
from oqcore.devices import resolve_device
from oqcore.errors import ConfigError, UnsupportedLayerError
from oqcore.loading.install import make_wrapper, process_layer, quantized_layers, set_submodule
from oqcore.loading.memory import PeakRSS
from oqcore.loading.siblings import SiblingQueue, sibling_groups
from oqcore.loading.state import LoadStats, OqState, tensor_bytes
from oqcore.methods import refuse_static_online
from oqcore.planning import plan
from oqcore.tensor import HP_DTYPES, check_finite, dtype_names
from oqcore.torch_compat import set_parameter

ROOT = "<model>"
"""How errors name the model object itself (its module name is the empty string)."""


def quantize_(
    model: nn.Module, config: QuantizationConfig | dict | str, *, device: str | torch.device | None = None
) -> nn.Module:
    """Quantize the planned layers of a materialized ``model`` in place and return it.

    ``model`` holds its parameters in float32/bfloat16/float16 on one device; ``config`` is a
    :class:`QuantizationConfig`, a dict, a YAML path or a shorthand name. ``device`` decides the
    backends and must be where the parameters are (default: there). Every planned layer's weights
    are checked (dtype, NaN/Inf) first, then each layer is quantized into its wrapper; the
    wrappers replace the original modules only once all of them succeeded, so a failure leaves
    the model exactly as it was, every parameter and buffer bit for bit at the same address (at
    the cost of holding the quantized copies, about half the layers' bf16 size for 8-bit schemes,
    beside the originals until the swap).

    The root module is never replaced (you hold a reference to it): a bare ``nn.Linear`` is
    quantized by wrapping it, ``quantize_(nn.Sequential(linear), config)[0]``. A model oqcore
    already quantized is refused: refit it with :func:`oqcore.reload_weights`, or quantize the
    high-precision model again with the new config. A model on the meta device is refused: use
    :func:`oqcore.load` to quantize while loading.

    Raises :class:`oqcore.ConfigError` (field ``model``: not a module, tensors on several devices;
    ``device``: a device that does not exist here or is not where the parameters are; ``config``
    and the config's own fields), :class:`oqcore.UnsupportedLayerError` naming the layer (already
    quantized, the root, meta parameters, a weight dtype other than float32/bfloat16/float16/
    float64, NaN/Inf, a shape a method cannot take), :class:`oqcore.NoBackendError`, and
    :class:`oqcore.PluginError` naming the plugin when its method or quantizer fails.
    """
    t0 = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module, got {type(model).__name__}", "model")
    dev = resolve_device(device)
    if config is not None and not isinstance(config, (QuantizationConfig, Mapping, str, os.PathLike)):
        raise ConfigError(
            f"expected a QuantizationConfig, a dict, a YAML path or a shorthand name, got {type(config).__name__}", "config"
        )
    cfg = QuantizationConfig.from_any(config)
    _refuse_quantized(model)
    model_dev = _model_device(model)
    if dev is not None and model_dev is not None and not _same_device(dev, model_dev):
        raise ConfigError(
            f"{str(dev)!r}, but the model's parameters are on {model_dev}; quantize_ works in place, where they are: "
            f"move the model first (model.to({str(dev)!r})) or leave device unset",
            "device",
        )
    qplan = plan(model, cfg, device=dev or model_dev)
    planned = qplan.quantized
    refuse_static_online(planned)
    for lp in planned:
        if lp.name == "":
            raise UnsupportedLayerError(
                ROOT,
                f"the model itself is a {type(model).__name__}: quantize_ replaces layers inside a model and cannot "
                "replace the object you hold; wrap it: quantize_(nn.Sequential(layer), config)[0] is the quantized layer",
            )
        module = model.get_submodule(lp.name)
        # the wrapper keeps only the weights its method knows: a buffer or a child holding
        # tensors (an adapter) would silently vanish from the model
        extra = [f"buffer {n!r}" for n, b in module.named_buffers(recurse=False) if b is not None]
        extra += [f"submodule {n!r}" for n, c in module.named_children() if any(True for _ in c.parameters()) or any(True for _ in c.buffers())]
        if extra:
            raise UnsupportedLayerError(
                lp.name,
                f"{type(module).__name__} holds {', '.join(extra)} besides its weights; the quantized layer would drop "
                "it: leave the layer unquantized (ignore) or merge it first",
            )
        for pname, p in module.named_parameters(recurse=False):
            if p.layout != torch.strided:
                raise UnsupportedLayerError(
                    lp.name, f"parameter {pname!r} has layout {p.layout}; quantize_ takes dense weights (to_dense())"
                )
            if p.dtype not in HP_DTYPES:
                raise UnsupportedLayerError(
                    lp.name, f"parameter {pname!r} has dtype {p.dtype}; quantize_ takes weights in {dtype_names()}"
                )
    stats = LoadStats()
    with PeakRSS() as mem:
        for lp in planned:
            for pname, p in model.get_submodule(lp.name).named_parameters(recurse=False):
                check_finite(p.detach(), f"{lp.name}.{pname}")
        wrappers: dict[str, nn.Module] = {}
        hp_dtype = torch.bfloat16
        made = {lp.name: make_wrapper(lp, model.get_submodule(lp.name)) for lp in planned}
        queue = SiblingQueue(sibling_groups(made), process_layer)  # fused siblings share a global scale
        for lp in planned:
            module = model.get_submodule(lp.name)
            hp_dtype = next(module.parameters()).dtype
            w = made[lp.name]
            # The wrapper borrows the original tensors (no copy); methods replace them with new
            # quantized tensors and never write into them, so the original module stays intact.
            for pname, p in module.named_parameters(recurse=False):
                set_parameter(w, pname, nn.Parameter(p.detach(), requires_grad=False))
            layer_bytes = sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
            stats.hp_bytes += layer_bytes
            stats.largest_layer_bytes = max(stats.largest_layer_bytes, layer_bytes)
            t = time.perf_counter()
            queue.complete(lp.name, w)
            stats.seconds_quantize += time.perf_counter() - t
            wrappers[lp.name] = w
        # Every layer succeeded: only now does the model change. A module reachable at several
        # paths (one nn.Linear shared by two blocks) is replaced at every path by its one wrapper,
        # else the other paths would keep running the high-precision original.
        paths: dict[int, list[str]] = {}
        for name, m in model.named_modules(remove_duplicate=False):
            paths.setdefault(id(m), []).append(name)
        for name, w in wrappers.items():
            module = model.get_submodule(name)
            _carry_module_state(module, w)
            w.oq_tied = _tied_names(model, name, module)
            for path in paths.get(id(module), [name]):
                set_submodule(model, path, w)
    stats.baseline_rss, stats.peak_rss = mem.baseline, mem.peak
    stats.quantized_bytes = sum(tensor_bytes(w) for w in wrappers.values())
    stats.model_bytes = tensor_bytes(model)
    stats.seconds_total = time.perf_counter() - t0
    model.oq_state = OqState(cfg, qplan, wrappers, qplan.device, hp_dtype, stats=stats)
    return model


# The hook tables a replaced layer hands to its wrapper, shared (not copied) so the handles the
# user holds still remove them. Without this, a forward hook registered on a layer (an
# activation probe, a LoRA-style output edit) would silently stop running after quantize_.
_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _tied_names(model: nn.Module, name: str, module: nn.Module) -> dict[str, list[str]]:
    """``{parameter of module: [the model's other names of that same tensor]}`` for weights tied
    outside the module (an lm_head sharing the embedding's weight). :func:`oqcore.reload_weights`
    feeds a new value given under one of those names to this layer too, so the quantized copy does
    not silently keep the old weight while the tied tensor moves on."""
    own = {id(p): pname for pname, p in module.named_parameters(recurse=False)}
    out: dict[str, list[str]] = {}
    prefix = name + "."
    for full, p in model.named_parameters(remove_duplicate=False):
        pname = own.get(id(p))
        if pname is not None and not (full.startswith(prefix) and "." not in full[len(prefix):]):
            out.setdefault(pname, []).append(full)
    return out


def _carry_module_state(module: nn.Module, wrapper: nn.Module) -> None:
    """Give ``wrapper`` the train/eval mode and the forward/backward hooks of ``module``."""
    wrapper.train(module.training)
    for table in _HOOK_TABLES:
        if hasattr(module, table):
            setattr(wrapper, table, getattr(module, table))
    if getattr(module, "_is_full_backward_hook", None) is not None:
        wrapper._is_full_backward_hook = module._is_full_backward_hook


def _refuse_quantized(model: nn.Module) -> None:
    """A model holding oqcore wrappers would have them orphaned (a later reload would write
    high-precision values into the old quantized storages): refuse, naming the first one."""
    done = quantized_layers(model)
    if not done:
        return
    first = model.get_submodule(done[0])
    more = f" ({len(done)} quantized layers in all)" if len(done) > 1 else ""
    raise UnsupportedLayerError(
        done[0] or ROOT,
        f"already quantized by oqcore ({type(first).__name__}, {type(first.method).__name__}){more}; quantize_ takes a "
        "model in high precision. To refit new weights use oqcore.reload_weights(model, weights); to change the "
        "scheme, quantize the high-precision model (or oqcore.load(path, config)) with the new config",
    )


def _model_device(model: nn.Module) -> torch.device | None:
    """The one device every parameter and buffer is on (``None`` for a model without tensors).

    Raises :class:`oqcore.UnsupportedLayerError` for a meta tensor and :class:`oqcore.ConfigError`
    for tensors on several devices, naming the tensors."""
    first: tuple[str, torch.device] | None = None
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_meta:
                owner = name.rpartition(".")[0]
                raise UnsupportedLayerError(
                    owner or ROOT,
                    f"{kind} {name!r} is on the meta device (no values): use oqcore.load(path, config) to quantize "
                    "while loading, or materialize the model first",
                )
            if first is None:
                first = (name, t.device)
            elif t.device != first[1]:
                raise ConfigError(
                    f"tensors on several devices ({first[0]!r} on {first[1]}, {name!r} on {t.device}); quantize_ "
                    "needs the whole model on one device: move it first with model.to(device)",
                    "model",
                )
    return first[1] if first is not None else None


def _same_device(asked: torch.device, actual: torch.device) -> bool:
    if asked.type != actual.type:
        return False
    return asked.index is None or actual.index is None or asked.index == actual.index
