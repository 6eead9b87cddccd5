"""Bad-input battery of ``oqcore.quantize_``: one typed error naming the culprit, and the model
bit for bit as it was (same tensors at the same addresses, same modules) afterwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import oqcore
import toy_scheme
from battery.tiny_models import FakeDevice, net
from battery.util import assert_unchanged, raises_naming, snapshot
from oqcore import ConfigError, PluginError, UnsupportedLayerError
from oqcore.modules import QuantizedLinear


@pytest.fixture(autouse=True)
def no_triton(monkeypatch):
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")


def _to_meta(m: Net) -> Net:
    m.layers[3].to("meta")
    return m


def _int_weight(m: Net) -> Net:
    m.layers[2].weight = nn.Parameter(torch.ones(64, 64, dtype=torch.int8), requires_grad=False)
    return m


def _fp8_weight(m: Net) -> Net:
    m.layers[1].weight = nn.Parameter(m.layers[1].weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
    return m


def _nan(m: Net) -> Net:
    with torch.no_grad():
        m.layers[4].weight[3, 7] = float("nan")
    return m


def _fake_device_buffer(m: Net) -> Net:
    m.register_buffer("elsewhere", torch.zeros(2).as_subclass(FakeDevice))
    return m


def _quantized_once(m: Net) -> Net:
    return oqcore.quantize_(m, "fp8_per_channel")


def _partly_quantized(m: Net) -> Net:
    return oqcore.quantize_(m, {"linear": "fp8_per_channel", "ignore": ["re:layers\\.[0-2]$"]})


# (make the model, config, kwargs, error, culprits)
BAD = {
    "already quantized": (_quantized_once, "fp8_per_channel", {}, UnsupportedLayerError,
                          ["'layers.0'", "already quantized", "QuantizedLinear", "reload_weights"]),
    "partly quantized, rest asked": (_partly_quantized, {"linear": "mxfp8"}, {}, UnsupportedLayerError,
                                     ["'layers.3'", "already quantized", "2 quantized layers"]),
    "meta layer": (_to_meta, "fp8_per_channel", {}, UnsupportedLayerError, ["'layers.3.weight'", "meta", "oqcore.load(path, config)"]),
    "whole model on meta": (lambda m: m.to("meta"), "fp8_per_channel", {}, UnsupportedLayerError, ["'embed.weight'", "meta"]),
    "integer weight": (_int_weight, "fp8_per_channel", {}, UnsupportedLayerError, ["'layers.2'", "torch.int8", "bfloat16"]),
    "fp8 weight": (_fp8_weight, "fp8_per_channel", {}, UnsupportedLayerError, ["'layers.1'", "float8_e4m3fn"]),
    "NaN weight": (_nan, "fp8_per_channel", {}, UnsupportedLayerError, ["'layers.4.weight'", "1 NaN/Inf"]),
    "tensors on two devices": (_fake_device_buffer, "fp8_per_channel", {}, ConfigError, ["model:", "'elsewhere'", "cuda:1", "'embed.weight'"]),
    "unknown shorthand": (None, "fp8_per_chanel", {}, ConfigError, ["fp8_per_chanel", "did you mean 'fp8_per_channel'"]),
    "config of the wrong type": (None, 5, {}, ConfigError, ["config", "int"]),
    "config list": (None, ["fp8_per_channel"], {}, ConfigError, ["config", "list"]),
    "bad config field": (None, {"linear": 5}, {}, ConfigError, ["linear"]),
    "device that does not exist": (None, "fp8_per_channel", {"device": "cuda"}, ConfigError, ["device", "'cuda'", "cpu"]),
    "device index past the count": (None, "fp8_per_channel", {"device": "cuda:7"}, ConfigError, ["device", "cuda:7"]),
    "device that is not a device": (None, "fp8_per_channel", {"device": "gpu0"}, ConfigError, ["device", "gpu0"]),
    "device of the wrong type": (None, "fp8_per_channel", {"device": 0.5}, ConfigError, ["device", "float"]),
    "meta device asked": (None, "fp8_per_channel", {"device": "meta"}, ConfigError, ["device", "'meta'", "cpu"]),
    "mxfp8 on K=40": (lambda m: nn.Sequential(nn.Linear(40, 64)).bfloat16(), "mxfp8", {}, UnsupportedLayerError, ["'0'", "32"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_quantize_changes_nothing(case):
    make, config, kw, err, culprits = BAD[case]
    model = make(net()) if make is not None else net()
    before = snapshot(model)
    with raises_naming(err, *culprits) as info:
        oqcore.quantize_(model, config, **kw)
    # config errors may be a subclass (UnknownKeyError); the others are exactly the type named
    assert type(info.value) is err or err is ConfigError
    assert_unchanged(model, before)


@pytest.mark.parametrize("obj", [{"weight": torch.zeros(2, 2)}, None, torch.zeros(4, 4), "model.safetensors"], ids=["dict", "None", "tensor", "str"])
def test_not_a_module(obj):
    with raises_naming(ConfigError, "model:", "torch.nn.Module", type(obj).__name__):
        oqcore.quantize_(obj, "fp8_per_channel")


@pytest.mark.parametrize("root", [lambda: nn.Linear(64, 64), lambda: nn.Linear(32, 96, bias=False)], ids=["linear", "linear no bias"])
def test_root_layer_is_refused_with_a_hint(root):
    model = root().bfloat16()
    before = snapshot(model)
    with raises_naming(UnsupportedLayerError, "'<model>'", "Linear", "nn.Sequential(layer)"):
        oqcore.quantize_(model, "fp8_per_channel")
    assert_unchanged(model, before)
    assert not hasattr(model, "oq_state")


def test_wrapping_the_root_layer_works():
    linear = nn.Linear(64, 96).bfloat16()
    x = torch.randn(3, 64).bfloat16()
    q = oqcore.quantize_(nn.Sequential(linear), "fp8_per_channel")[0]
    assert isinstance(q, QuantizedLinear)
    err = (q(x).float() - linear(x).float()).abs().max() / linear(x).float().abs().max()
    assert 0 < err < 0.1


# ---- a plugin failing half-way -----------------------------------------------------------------


@pytest.fixture
def toy_fails_at(monkeypatch):
    """The toy scheme whose quantizer raises ``state["exc"]`` on call number ``state["at"]``."""
    state = {"calls": 0, "at": None, "exc": None}
    real = toy_scheme.quantize

    def quantize(w, options):
        state["calls"] += 1
        if state["calls"] == state["at"]:
            raise state["exc"]
        return real(w, options)

    monkeypatch.setattr(toy_scheme, "quantize", quantize)
    toy_scheme.register_toy()
    return state


@pytest.mark.parametrize(
    "exc, err, culprits",
    [
        (RuntimeError("out of registers"), PluginError, ["plugin 'toy'", "'layers.2'", "'toy_int4'", "RuntimeError: out of registers"]),
        (ValueError("rows must be short"), UnsupportedLayerError, ["'layers.2'", "plugin 'toy'", "rows must be short"]),
        (IndexError("x"), PluginError, ["plugin 'toy'", "'layers.2'", "IndexError"]),
    ],
    ids=["RuntimeError", "ValueError", "IndexError"],
)
def test_plugin_quantizer_failing_at_the_third_of_five_layers(toy_fails_at, exc, err, culprits):
    toy_fails_at.update(at=3, exc=exc)
    model = net()
    before = snapshot(model)
    with raises_naming(err, *culprits) as info:
        oqcore.quantize_(model, "toy")
    assert type(info.value) is err and info.value.__cause__ is exc
    assert toy_fails_at["calls"] == 3
    assert_unchanged(model, before)
    assert not hasattr(model, "oq_state")


def test_plugin_method_failing_is_a_plugin_error(monkeypatch):
    toy_scheme.register_toy()
    real = toy_scheme.ToyLinear.process_weights_after_loading
    calls = []

    def process(self, layer):
        calls.append(layer.layer_name)
        if len(calls) == 4:
            raise AttributeError("no attribute 'packed'")
        real(self, layer)

    monkeypatch.setattr(toy_scheme.ToyLinear, "process_weights_after_loading", process)
    model = net()
    before = snapshot(model)
    with raises_naming(PluginError, "plugin 'toy'", "ToyLinear", "'layers.3'", "AttributeError"):
        oqcore.quantize_(model, "toy")
    assert_unchanged(model, before)


def test_success_after_a_refusal():
    """A refused call leaves a model that quantizes normally afterwards."""
    model = net()
    with pytest.raises(ConfigError):
        oqcore.quantize_(model, "fp8_per_channel", device="meta")
    oqcore.quantize_(model, "fp8_per_channel")
    assert sorted(model.oq_state.wrappers) == [f"layers.{i}" for i in range(5)]
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 64)
