"""Swap planned layers for their quantized wrappers and run their methods (shared by load,
quantize_ and reload)."""

from __future__ import annotations

from torch import nn

from oqcore.errors import CheckpointError, InternalError, OqError, PluginError
from oqcore.loading.memory import release_free_memory
from oqcore.loading.place import param_owner
from oqcore.loading.siblings import SiblingQueue, sibling_groups
from oqcore.modules import QuantizedLinear, QuantizedMoE
from oqcore.planning import LayerPlan, QuantPlan


def make_method(lp: LayerPlan):
    """A fresh method instance for a planned layer (see :meth:`oqcore.LayerPlan.make_method`)."""
    return lp.make_method()


def make_wrapper(lp: LayerPlan, module: nn.Module) -> nn.Module:
    """The quantized wrapper for ``module`` (an ``nn.Linear`` or fused experts) with meta-device
    high-precision parameters registered by its method."""
    method = make_method(lp)
    if lp.kind == "linear":
        return QuantizedLinear.from_linear(lp.name, module, method)
    return QuantizedMoE(lp.name, module, method)


def method_plugin(method: object) -> str:
    """The name of the plugin that registered ``method``'s class (``"?"`` if none did: a method
    made by hand)."""
    from oqcore.plugins import get_registry

    for entry in get_registry().methods.values():
        if entry.cls is type(method):
            return entry.plugin
    return "?"


def process_layer(wrapper: nn.Module) -> None:
    """``wrapper.method.process_weights_after_loading(wrapper)``, with any exception that is not an
    :class:`oqcore.OqError` (a bug in the plugin's method or backend code) raised as a
    :class:`oqcore.PluginError` naming the layer, the method and the plugin (chained)."""
    method = wrapper.method
    shard = getattr(wrapper, "oq_shard", None)
    if shard is not None:
        shard.begin()  # each of its weights owes one collective (oqcore.parallel.shard)
    try:
        method.process_weights_after_loading(wrapper)
    except OqError:
        raise
    except Exception as e:
        raise PluginError(
            f"plugin {method_plugin(method)!r}: {type(method).__name__}.process_weights_after_loading failed on layer "
            f"{wrapper.layer_name!r}: {type(e).__name__}: {e}"
        ) from e


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (``""`` is not allowed: the root cannot be swapped)."""
    if not name:
        raise InternalError("set_submodule: the root module cannot be replaced in place (callers must refuse it first)")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the submodules of ``model`` that are oqcore wrappers (already quantized layers),
    in module order; ``""`` when the model itself is one."""
    return [name for name, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedMoE))]


def install_wrappers(model: nn.Module, plan: QuantPlan) -> dict[str, nn.Module]:
    """Replace every layer the plan quantizes with its wrapper; returns ``{name: wrapper}``."""
    wrappers = {}
    for lp in plan.quantized:
        wrappers[lp.name] = make_wrapper(lp, model.get_submodule(lp.name))
    for name, w in wrappers.items():
        set_submodule(model, name, w)
    return wrappers


class OnlineFeed:
    """Quantizes wrappers as their high-precision parameters arrive, when a load that reads
    stored quantized layers also quantizes others online (a config composed with a partly
    quantized checkpoint, :mod:`oqcore.loading.overlay`): call :meth:`placed` after each parameter
    is assigned; a wrapper is processed the moment its last element is in (the streaming load's
    rule, so each layer's high-precision weights live only until then)."""

    def __init__(self, model: nn.Module, wrappers: dict[str, nn.Module]):
        self.model, self.wrappers = model, wrappers
        self.remaining = {n: sum(p.numel() for p in w.parameters(recurse=False)) for n, w in wrappers.items()}
        self.queue = SiblingQueue(sibling_groups(wrappers), process_layer)  # fused siblings share a global scale

    def placed(self, name: str) -> None:
        """Parameter ``name`` (a model name) was assigned: count it, quantize its layer when complete."""
        owner = param_owner(name, self.wrappers)
        if owner is None:
            return
        self.remaining[owner] -= self.model.get_parameter(name).numel()
        if self.remaining[owner] == 0:
            self.queue.complete(owner, self.wrappers[owner])
            release_free_memory()

    def check_complete(self, source: object) -> None:
        """Raise :class:`oqcore.CheckpointError` naming ``source`` for a wrapper that never got all
        its weights."""
        missing = [n for n, left in self.remaining.items() if left] + self.queue.incomplete()
        if missing:
            raise CheckpointError(f"{source}: layer(s) to quantize never received all their weights: {', '.join(missing)}")
