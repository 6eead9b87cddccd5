"""Swap planned layers for their quantized wrappers (shared by load, quantize_ and reload)."""

from __future__ import annotations

from torch import nn

from oqcore.modules import QuantizedLinear, QuantizedMoE
from oqcore.planning import LayerPlan, QuantPlan


def make_method(lp: LayerPlan):
    """A fresh method instance for a planned layer (its resolved activation key, options, backend)."""
    assert lp.bound is not None and lp.backend is not None
    return lp.bound.method_cls(activation_key=lp.bound.activation_key, options=lp.bound.options, backend=lp.backend)


def make_wrapper(lp: LayerPlan, module: nn.Module) -> nn.Module:
    """The quantized wrapper for ``module`` (an ``nn.Linear`` or fused experts) with meta-device
    high-precision parameters registered by its method."""
    method = make_method(lp)
    if lp.kind == "linear":
        return QuantizedLinear.from_linear(lp.name, module, method)
    return QuantizedMoE(lp.name, module, method)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (``""`` is not allowed: the root cannot be swapped)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def install_wrappers(model: nn.Module, plan: QuantPlan) -> dict[str, nn.Module]:
    """Replace every layer the plan quantizes with its wrapper; returns ``{name: wrapper}``."""
    wrappers = {}
    for lp in plan.quantized:
        wrappers[lp.name] = make_wrapper(lp, model.get_submodule(lp.name))
    for name, w in wrappers.items():
        set_submodule(model, name, w)
    return wrappers
