"""Bad Scheme records and broken v2 quantizers: each one fails its plugin with a message naming the
field or the contract rule, and leaves the other plugins working."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import oqcore
from oqcore import GroupShape, KeyFormat, OnlineMoEMethodBase, QuantizerImpl, QuantKey, ScaleDesc, Scheme, hookimpl
from oqcore.plugins import PluginWarning

KEY = QuantKey(torch.uint8, ScaleDesc(torch.float32, True, GroupShape(1, 8)), symmetric=False)
ACT = QuantKey(torch.uint8, ScaleDesc(torch.float32, False, GroupShape.PER_TOKEN), symmetric=False)


def quantize(w, options=None):
    x = w.float()
    s = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
    return (x / s).round().clamp(-127, 127).to(torch.int8).view(torch.uint8), s


def dequantize(q, s, dtype, options=None):
    return (q.view(torch.int8).float() * s).to(dtype)


FMT = KeyFormat(KEY, dequantize, (QuantizerImpl("torch", quantize),))
ACT_FMT = KeyFormat(ACT, dequantize, (QuantizerImpl("torch", quantize),))
GOOD = Scheme("bs_good", FMT, activations=(None, ACT_FMT))


class MoEChecks(OnlineMoEMethodBase):
    pass


def plugin_for(scheme, *, name_key=True):
    class P:
        @hookimpl
        def oq_register_quant_keys(self, register):
            if name_key:
                register("bs_key", weight=KEY)
            register("bs_act", activation=ACT)

        @hookimpl
        def oq_register_schemes(self, register):
            register(scheme)

    return P()


BAD = {
    "not a Scheme": ({"name": "x"}, "register() takes an oqcore.Scheme, got dict"),
    "bad name": (dataclasses.replace(GOOD, name="1 bad"), "scheme name '1 bad'"),
    "weight not a KeyFormat": (dataclasses.replace(GOOD, weight=KEY), "weight must be a KeyFormat"),
    "activations a list": (dataclasses.replace(GOOD, activations=[None]), "activations must be a tuple"),
    "no activations": (dataclasses.replace(GOOD, activations=()), "activations is empty"),
    "default not served": (dataclasses.replace(GOOD, default_activation=KEY), "default_activation"),
    "unknown kind": (dataclasses.replace(GOOD, kinds=("linear", "attention")), "kinds"),
    "kind twice": (dataclasses.replace(GOOD, kinds=("linear", "linear")), "kinds"),
    "options not a model": (dataclasses.replace(GOOD, options_model=dict), "options_model"),
    "method for an unserved kind": (dataclasses.replace(GOOD, kinds=("linear",), methods={"moe": MoEChecks}), "kind 'moe'"),
    "method of the wrong base": (dataclasses.replace(GOOD, methods={"linear": MoEChecks}), "must subclass OnlineLinearMethodBase"),
    "no reference": (dataclasses.replace(GOOD, weight=dataclasses.replace(FMT, implementations=(QuantizerImpl("fast", quantize),))), "no 'torch' reference"),
    "implementation twice": (
        dataclasses.replace(GOOD, weight=dataclasses.replace(FMT, implementations=(QuantizerImpl("torch", quantize),) * 2)),
        "'torch' is declared twice",
    ),
    "tensors without qdata first": (dataclasses.replace(GOOD, weight=dataclasses.replace(FMT, tensors=("scale", "qdata"))), "starting with 'qdata'"),
    "tensor named twice": (dataclasses.replace(GOOD, weight=dataclasses.replace(FMT, tensors=("qdata", "scale", "scale"))), "repeat a name"),
    "packing zero": (dataclasses.replace(GOOD, weight=dataclasses.replace(FMT, values_per_element=0)), "values_per_element"),
    "priority not an int": (
        dataclasses.replace(GOOD, weight=dataclasses.replace(FMT, implementations=(QuantizerImpl("torch", quantize, priority="high"),))),
        "priority",
    ),
    "serving format not a name": (dataclasses.replace(GOOD, compressed_tensors_format={None: 3}), "compressed_tensors_format"),
    "serving format for an unserved activation": (
        dataclasses.replace(GOOD, compressed_tensors_format={KEY: "float-quantized"}),
        "compressed_tensors_format names activation",
    ),
    "serving args not a mapping": (
        dataclasses.replace(GOOD, weight=dataclasses.replace(FMT, compressed_tensors=["num_bits", 8])),
        "compressed_tensors must be a mapping",
    ),
    "backends raising": (dataclasses.replace(GOOD, backends=lambda kind, act: 1 / 0), "ZeroDivisionError"),
    "backend for another activation": (
        dataclasses.replace(GOOD, backends=lambda kind, act: [oqcore.Backend("bs-fast", ACT)] if act is None else []),
        "another activation key",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_scheme_fails_its_plugin_only(case):
    scheme, fragment = BAD[case]
    pm = oqcore.get_plugin_manager()
    pm.register(plugin_for(scheme), "badscheme")
    with pytest.warns(PluginWarning):
        reg = pm.registry
    record = pm.records["badscheme"]
    assert record.status == "failed" and record.hook == "oq_register_schemes", record
    assert fragment in record.error and "'badscheme'" in record.error
    # nothing of it stays; the built-in schemes work
    assert reg.keys.get("bs_key") is None and reg.method("linear", KEY) is None
    assert oqcore.quantize_tensor(torch.randn(4, 32), "fp8_per_tensor_static").qdata.dtype == torch.float8_e4m3fn


def test_scheme_needs_a_named_weight_key():
    pm = oqcore.get_plugin_manager()
    pm.register(plugin_for(GOOD, name_key=False), "badscheme")
    with pytest.warns(PluginWarning):
        pm.registry
    assert "has no name; register one in oq_register_quant_keys" in pm.records["badscheme"].error


def test_good_scheme_registers_and_two_plugins_clash():
    pm = oqcore.get_plugin_manager()
    pm.register(plugin_for(GOOD), "goodscheme")
    reg = pm.registry
    assert reg.method("linear", KEY).cls.__name__ == "BsGoodLinearMethod"
    assert reg.format(ACT).implementations[0].plugin == "goodscheme"

    class Clash:
        @hookimpl
        def oq_register_schemes(self, register):
            register(dataclasses.replace(GOOD, name="bs_other"))

    pm.register(Clash(), "clash")
    with pytest.raises(oqcore.PluginConflictError, match="'goodscheme'.*'clash'|'clash'.*'goodscheme'"):
        pm.registry


@pytest.mark.parametrize(
    "result, fragment",
    [
        (lambda w, o: {"qdata": quantize(w)[0]}, r"expected the tensors \(qdata, scale\)"),
        (lambda w, o: {"qdata": quantize(w)[0], "scale": quantize(w)[1], "extra": quantize(w)[1]}, "expected the tensors"),
        (lambda w, o: (quantize(w)[0][..., :4], quantize(w)[1]), "qdata must keep the input's shape"),
    ],
    ids=["a tensor missing", "an unknown tensor", "wrong qdata shape"],
)
def test_quantizer_breaking_the_format_is_a_plugin_error(result, fragment):
    fmt = dataclasses.replace(FMT, implementations=(QuantizerImpl("torch", result),))
    pm = oqcore.get_plugin_manager()
    pm.register(plugin_for(dataclasses.replace(GOOD, weight=fmt)), "goodscheme")
    with pytest.raises(oqcore.PluginError, match=fragment) as e:
        oqcore.quantize_tensor(torch.randn(4, 32), "bs_key", name="m.proj")
    assert "'m.proj'" in str(e.value) and "plugin 'goodscheme'" in str(e.value)


def test_packed_format_checks_the_packed_shape():
    def packed(w, o):
        q, s = quantize(w)
        return q[..., : (w.shape[-1] + 1) // 2], s

    fmt = dataclasses.replace(FMT, implementations=(QuantizerImpl("torch", packed),), values_per_element=2)
    pm = oqcore.get_plugin_manager()
    pm.register(plugin_for(dataclasses.replace(GOOD, weight=fmt)), "goodscheme")
    qt = oqcore.quantize_tensor(torch.randn(4, 31), "bs_key")
    assert tuple(qt.qdata.shape) == (4, 16) and qt.shape == (4, 31)
    fmt_wrong = dataclasses.replace(fmt, implementations=(QuantizerImpl("torch", lambda w, o: quantize(w)),))
    pm.unregister("goodscheme")
    pm.register(plugin_for(dataclasses.replace(GOOD, weight=fmt_wrong)), "goodscheme")
    with pytest.raises(oqcore.PluginError, match=r"qdata must be \(4, 16\) \(2 values per element"):
        oqcore.quantize_tensor(torch.randn(4, 31), "bs_key")


def test_unsupported_everywhere_pinned_is_a_no_backend_error(monkeypatch):
    never = QuantizerImpl("bs-never", quantize, priority=5, is_supported=lambda d, s, t: (False, "never here"))
    fmt = dataclasses.replace(FMT, implementations=(QuantizerImpl("torch", quantize), never))
    pm = oqcore.get_plugin_manager()
    pm.register(plugin_for(dataclasses.replace(GOOD, weight=fmt)), "goodscheme")
    assert oqcore.quantize_tensor(torch.randn(4, 32), "bs_key").qdata.dtype == torch.uint8  # the reference
    monkeypatch.setenv("OQ_QUANTIZER", "bs-never")
    with pytest.raises(oqcore.NoBackendError, match="never here"):
        oqcore.quantize_tensor(torch.randn(4, 32), "bs_key", name="m.proj")
    # keys without that implementation keep the oracle's choice
    assert oqcore.quantize_tensor(torch.randn(4, 32), "fp8_per_tensor_static").qdata.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize(
    "args, field",
    [
        ((None, "cpu", [(4, 8)], torch.float32), "impls"),
        (([QuantizerImpl("torch", quantize)], None, [(4, 8)], torch.float32), "device"),
        (([QuantizerImpl("torch", quantize)], "tpu", [(4, 8)], torch.float32), "device"),
        (([QuantizerImpl("torch", quantize)], "cpu", [], torch.float32), "shapes"),
        (([QuantizerImpl("torch", quantize)], "cpu", [(4, -1)], torch.float32), "shapes"),
        (([QuantizerImpl("torch", quantize)], "cpu", "4x8", torch.float32), "shapes"),
        (([QuantizerImpl("torch", quantize)], "cpu", [(4, 8)], "bf16"), "dtype"),
        (([QuantizerImpl("torch", quantize)], "cpu", [(4, 8)], torch.float32, 3), "quantizer"),
    ],
)
def test_select_quantizer_bad_arguments_are_config_errors(args, field):
    *pos, = args
    kwargs = {"pinned": pos.pop()} if len(pos) == 5 else {}
    with pytest.raises(oqcore.ConfigError) as e:
        oqcore.select_quantizer(*pos, **kwargs)
    assert e.value.field == field


def test_resolve_bad_arguments_are_config_errors():
    cfg = oqcore.QuantizationConfig(linear="fp8_per_tensor")
    with pytest.raises(oqcore.ConfigError) as e:
        oqcore.resolve(cfg, registry="default")
    assert e.value.field == "registry"
