"""A third-party scheme written the way an outside author would: a toy int4-in-int8 per-row
weight-only format, its method, quantizer and two backends. Used by the core tests so they do not
depend on the built-in schemes."""

import torch
from pydantic import BaseModel, ConfigDict

import oqcore
from oqcore import Backend, GroupShape, OnlineLinearMethodBase, OnlineMoEMethodBase, QuantKey, ScaleDesc, hookimpl

# int4 values (stored one per int8 byte, for clarity over speed)
TOY = QuantKey(torch.int4, ScaleDesc(torch.float32, True, GroupShape.PER_CHANNEL), symmetric=True)
TOY_ACT = QuantKey(torch.int4, ScaleDesc(torch.float32, False, GroupShape.PER_TOKEN))
QMAX = 7


class ToyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    qmax: int = QMAX


class ToyLinear(OnlineLinearMethodBase):
    weight_key = TOY
    supported_activation_keys = (None, TOY_ACT)
    default_activation_key = None
    options_model = ToyOptions

    @classmethod
    def check_layer(cls, name, layer):
        if layer.in_features % 2:
            raise oqcore.UnsupportedLayerError(name, f"toy needs an even K, got in_features={layer.in_features}")


class ToyMoE(OnlineMoEMethodBase):
    weight_key = TOY
    supported_activation_keys = (None,)
    options_model = ToyOptions


def quantize(w, options):
    qmax = options.qmax if options is not None else QMAX
    s = w.float().abs().amax(-1, keepdim=True) / qmax
    s = torch.where(s == 0, torch.finfo(torch.float32).eps, s)
    return (w.float() / s).round().clamp(-qmax, qmax).to(torch.int8), s


def dequantize(qdata, scale, dtype, options):
    return (qdata.float() * scale).to(dtype)


def needs_even_n(layer, device):
    if getattr(layer, "out_features", 0) % 2:
        return False, "toy-fast needs an even N"
    return True, "even N"


class ToyScheme:
    """The plugin object: hookimpls as methods (a module of functions works the same)."""

    @hookimpl
    def oq_register_quant_keys(self, register):
        register("toy_int4", weight=TOY, aliases=("toy4",), description="toy")
        register("toy_act", activation=TOY_ACT)

    @hookimpl
    def oq_register_shorthands(self, register):
        register("toy", linear={"weight": "toy_int4"}, moe={"weight": "toy_int4"})
        register("toy_moe_only", moe={"weight": "toy_int4", "activation": None})

    @hookimpl
    def oq_register_methods(self, register):
        register("linear", TOY, ToyLinear)
        register("moe", "toy_int4", ToyMoE)

    @hookimpl
    def oq_register_quantizers(self, register):
        register(TOY, "torch", quantize, dequantize)
        register(TOY_ACT, "torch", quantize, dequantize)

    @hookimpl
    def oq_backend_candidates(self, kind, weight_key):
        if weight_key != TOY:
            return []
        out = [Backend("torch", None), Backend("toy-fast", None, needs_even_n, priority=10)]
        if kind == "linear":
            out.append(Backend("torch", TOY_ACT))
        return out


def register_toy(name="toy"):
    """Register the toy scheme with the process plugin manager and return the manager."""
    pm = oqcore.get_plugin_manager()
    pm.register(ToyScheme(), name)
    return pm
