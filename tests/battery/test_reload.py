"""Bad-input battery of ``oqcore.reload_weights``: all or nothing. Every failure raises one typed
error naming the weight (or layer, or plugin), and leaves every parameter and buffer bit for bit
as it was, at the same address."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import oqcore
import toy_scheme
from battery.tiny_models import FakeDevice, net
from battery.util import assert_unchanged, raises_naming, snapshot
from oqcore import CheckpointError, ConfigError, PluginError, UnsupportedLayerError
from oqcore.loading.checkpoint import iter_checkpoint
from oqcore.synthetic import perturbed_copy

BIG = 3.4e38  # finite in float32, Inf in bfloat16 (max 3.39e38)


@pytest.fixture(autouse=True)
def no_triton(monkeypatch):
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")


def new_weights(seed: int = 1, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A trainer's next weights for :func:`net`, in model naming (float32 by default, as an RL
    trainer keeps its master weights)."""
    return {k: v.detach().to(dtype) for k, v in net(seed, torch.float32).named_parameters()}


@pytest.fixture
def quantized():
    return oqcore.quantize_(net(), "fp8_per_channel")


def _set(name, value):
    return lambda w: {**w, name: value}


def _poke(name, index, value):
    def make(w):
        t = w[name].clone()
        t[index] = value
        return {**w, name: t}

    return make


def _pairs(make):
    return lambda w: list(make(w).items())


def _generator_failing_after(n):
    def make(w):
        def gen():
            for i, item in enumerate(w.items()):
                if i == n:
                    raise OSError("connection to the trainer lost")
                yield item

        return gen()

    return make


# (weights from the good ones, error, culprits)
BAD = {
    "overflow in the last layer": (_poke("layers.4.weight", (5, 9), BIG), UnsupportedLayerError,
                                   ["'layers.4.weight'", "overflow", "torch.bfloat16", "1 value(s)"]),
    "negative overflow": (_poke("layers.3.weight", (0, 0), -BIG), UnsupportedLayerError, ["'layers.3.weight'", "overflow"]),
    "overflow in an unquantized parameter": (_poke("norm.weight", 7, BIG), UnsupportedLayerError, ["'norm.weight'", "overflow"]),
    "overflow in a bias": (_poke("layers.2.bias", 1, BIG), UnsupportedLayerError, ["'layers.2.bias'", "overflow"]),
    "NaN": (_poke("layers.3.weight", (2, 2), float("nan")), UnsupportedLayerError, ["'layers.3.weight'", "1 NaN/Inf"]),
    "Inf in the embedding": (_poke("embed.weight", (0, 1), float("inf")), UnsupportedLayerError, ["'embed.weight'", "NaN/Inf"]),
    "name not a str (dict)": (lambda w: {**w, 3: w["norm.weight"]}, CheckpointError, ["name must be a str", "int 3"]),
    "name not a str (pairs)": (lambda w: [*w.items(), (("layers", 0), w["norm.weight"])], CheckpointError, ["item #", "tuple"]),
    "value a list": (_set("norm.weight", [1.0] * 64), CheckpointError, ["'norm.weight'", "torch.Tensor", "list"]),
    "value a numpy array": (_set("layers.1.weight", np.ones((64, 64), np.float32)), CheckpointError, ["'layers.1.weight'", "ndarray"]),
    "value None": (_set("layers.0.bias", None), CheckpointError, ["'layers.0.bias'", "NoneType"]),
    "meta tensor": (_set("layers.4.weight", torch.empty(64, 64, device="meta")), CheckpointError, ["'layers.4.weight'", "meta"]),
    "tensor on another device": (_set("layers.2.weight", torch.zeros(64, 64).as_subclass(FakeDevice)), CheckpointError,
                                 ["'layers.2.weight'", "cuda:1", "cpu"]),
    "int32": (_set("layers.0.weight", torch.ones(64, 64, dtype=torch.int32)), CheckpointError, ["'layers.0.weight'", "torch.int32"]),
    "bool": (_set("norm.bias", torch.ones(64, dtype=torch.bool)), CheckpointError, ["'norm.bias'", "torch.bool"]),
    "complex": (_set("layers.1.weight", torch.ones(64, 64, dtype=torch.complex64)), CheckpointError, ["'layers.1.weight'", "complex64"]),
    "fp8": (_set("layers.1.weight", torch.ones(64, 64).to(torch.float8_e4m3fn)), CheckpointError, ["'layers.1.weight'", "float8_e4m3fn"]),
    "wrong shape (quantized layer)": (_set("layers.3.weight", torch.zeros(64, 63)), CheckpointError,
                                      ["'layers.3.weight'", "[64, 63]", "expected [64, 64]"]),
    "wrong shape (unquantized)": (_set("embed.weight", torch.zeros(17, 64)), CheckpointError, ["'embed.weight'", "[17, 64]", "[16, 64]"]),
    "transposed stack of one": (_set("layers.0.bias", torch.zeros(1, 64)), CheckpointError, ["'layers.0.bias'", "[1, 64]"]),
    "not iterable": (lambda w: 42, CheckpointError, ["mapping", "int"]),
    "a str": (lambda w: "model.safetensors", CheckpointError, ["mapping", "str"]),
    "a tensor": (lambda w: w["layers.0.weight"], CheckpointError, ["mapping", "Tensor"]),
    "a module": (lambda w: nn.Linear(2, 2), CheckpointError, ["mapping", "Linear", "named_parameters()"]),
    "tensors, not pairs": (lambda w: list(w.values()), CheckpointError, ["item #0", "(name, tensor) pair", "Tensor"]),
    "triples": (lambda w: [(k, v, None) for k, v in w.items()], CheckpointError, ["item #0", "pair", "tuple"]),
    "name given twice": (lambda w: [*w.items(), ("layers.1.weight", w["layers.1.weight"])], CheckpointError,
                         ["'layers.1.weight'", "given twice"]),
    "part of a layer": (lambda w: {k: v for k, v in w.items() if k != "layers.0.bias"}, CheckpointError,
                        ["'layers.0'", "quantized as a whole", "missing layers.0.bias"]),
    "typo": (_set("layers.0.wieght", torch.zeros(64, 64)), CheckpointError, ["'layers.0.wieght'", "did you mean 'layers.0.weight'"]),
    "a quantized tensor's name": (_set("layers.0.weight_scale", torch.ones(64, 1)), CheckpointError,
                                  ["'layers.0.weight_scale'", "not a weight"]),
    "a buffer's name": (_set("pos", torch.zeros(4)), CheckpointError, ["'pos'", "not a weight"]),
    "generator raising midway": (_generator_failing_after(7), CheckpointError,
                                 ["after 7 tensor(s)", "OSError: connection to the trainer lost", "nothing was changed"]),
    "generator raising at once": (_generator_failing_after(0), CheckpointError, ["after 0 tensor(s)", "OSError"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_reload_changes_nothing(quantized, case):
    make, err, culprits = BAD[case]
    before = snapshot(quantized)
    with raises_naming(err, *culprits) as info:
        oqcore.reload_weights(quantized, make(new_weights()))
    assert type(info.value) is err
    assert_unchanged(quantized, before)


@pytest.mark.parametrize("case", ["overflow in the last layer", "NaN", "wrong shape (quantized layer)", "part of a layer"])
def test_bad_reload_as_pairs_too(quantized, case):
    make, err, culprits = BAD[case]
    before = snapshot(quantized)
    with raises_naming(err, *culprits):
        oqcore.reload_weights(quantized, _pairs(make)(new_weights()))
    assert_unchanged(quantized, before)


@pytest.mark.parametrize(
    "model, culprits",
    [(lambda: net(), ["model:", "Net", "not loaded or quantized by oqcore"]), (lambda: nn.Linear(4, 4), ["model:", "Linear"]), (lambda: {}, ["dict"])],
    ids=["plain model", "plain linear", "not a module"],
)
def test_a_model_oqcore_did_not_quantize(model, culprits):
    m = model()
    with raises_naming(ConfigError, *culprits):
        oqcore.reload_weights(m, new_weights())


def test_a_model_changed_after_quantizing(quantized):
    quantized.layers[1] = nn.Linear(64, 64).bfloat16()
    before = snapshot(quantized)
    with raises_naming(ConfigError, "model:", "'layers.1'", "Linear", "no longer in the model"):
        oqcore.reload_weights(quantized, new_weights())
    assert_unchanged(quantized, before)


# ---- plugins failing during a reload -----------------------------------------------------------


@pytest.fixture
def toy_model(monkeypatch):
    """A :func:`net` quantized with the toy scheme, whose quantizer then raises ``state["exc"]``
    on the ``state["at"]``-th call of the reload (or returns what ``state["result"]`` makes)."""
    state = {"calls": 0, "at": None, "exc": None, "result": None}
    real = toy_scheme.quantize

    def quantize(w, options):
        state["calls"] += 1
        if state["calls"] == state["at"]:
            raise state["exc"]
        out = real(w, options)
        return state["result"](*out) if state["result"] else out

    monkeypatch.setattr(toy_scheme, "quantize", quantize)
    toy_scheme.register_toy()
    model = oqcore.quantize_(net(), "toy")
    state["calls"] = 0
    return model, state


@pytest.mark.parametrize(
    "exc, err, culprits",
    [
        (RuntimeError("device lost"), PluginError, ["plugin 'toy'", "'layers.2'", "'toy_int4'", "RuntimeError: device lost"]),
        (ValueError("rows too long"), UnsupportedLayerError, ["'layers.2'", "plugin 'toy'", "rows too long"]),
        (MemoryError(), PluginError, ["plugin 'toy'", "MemoryError"]),
    ],
    ids=["RuntimeError", "ValueError", "MemoryError"],
)
def test_plugin_failing_at_the_third_of_five_layers(toy_model, exc, err, culprits):
    model, state = toy_model
    state.update(at=3, exc=exc)
    before = snapshot(model)
    with raises_naming(err, *culprits) as info:
        oqcore.reload_weights(model, new_weights())
    assert type(info.value) is err and info.value.__cause__ is exc
    assert state["calls"] == 3
    assert_unchanged(model, before)


def test_plugin_changing_the_layout_on_reload(toy_model):
    model, state = toy_model
    state["result"] = lambda q, s: (q, s[:1])  # one scale instead of one per row
    before = snapshot(model)
    with raises_naming(PluginError, "plugin 'toy'", "'layers.0'", "'weight_scale'", "[1, 1]", "[64, 1]"):
        oqcore.reload_weights(model, new_weights())
    assert_unchanged(model, before)


def test_plugin_method_failing_on_reload(toy_model, monkeypatch):
    model, _ = toy_model
    calls = []
    real = toy_scheme.ToyLinear.process_weights_after_loading

    def process(self, layer):
        calls.append(layer.layer_name)
        if len(calls) == 5:
            raise TypeError("unexpected keyword 'fast'")
        real(self, layer)

    monkeypatch.setattr(toy_scheme.ToyLinear, "process_weights_after_loading", process)
    before = snapshot(model)
    with raises_naming(PluginError, "plugin 'toy'", "ToyLinear", "'layers.4'", "TypeError"):
        oqcore.reload_weights(model, new_weights())
    assert_unchanged(model, before)


# ---- what works --------------------------------------------------------------------------------


def _bytes(model):
    return {k: v.detach().contiguous().view(torch.uint8).clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_reload_equals_quantizing_the_new_weights(quantized, dtype):
    ptrs = {k: v.data_ptr() for k, v in quantized.state_dict().items()}
    layers = oqcore.reload_weights(quantized, (kv for kv in new_weights(dtype=dtype).items()))
    assert layers == [f"layers.{i}" for i in range(5)]
    fresh = net()
    fresh.load_state_dict({k: v.to(torch.bfloat16) for k, v in new_weights().items()}, strict=False)
    fresh = oqcore.quantize_(fresh, "fp8_per_channel")
    assert {k: v.data_ptr() for k, v in quantized.state_dict().items()} == ptrs
    got, want = _bytes(quantized), _bytes(fresh)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_reload_after_a_refused_one(quantized):
    with pytest.raises(UnsupportedLayerError):
        oqcore.reload_weights(quantized, _poke("layers.4.weight", (0, 0), BIG)(new_weights()))
    assert oqcore.reload_weights(quantized, {k: v for k, v in new_weights().items() if k.startswith("layers.3.")}) == ["layers.3"]


# ---- checkpoint naming (a loaded MoE model) ----------------------------------------------------

CONFIG = {"linear": "fp8_per_block", "moe": "mxfp8"}
LATE = "model.layers.1.block_sparse_moe.experts.3.w2.weight"


@pytest.fixture(scope="module")
def mixtral(tiny_moe, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OQ_DISABLE_TRITON", "1")
        src = tiny_moe("mixtral")
        model = oqcore.load(src, CONFIG)
        new = dict(iter_checkpoint(perturbed_copy(src, tmp_path_factory.mktemp("mixtral-next"))))
    return model, new


def _fp32(make):
    return lambda w: make({k: v.float() for k, v in w.items()})


MOE_BAD = {
    "overflow in a late expert": (_fp32(_poke(LATE, (3, 4), BIG)), UnsupportedLayerError, [f"'{LATE}'", "overflow", "bfloat16"]),
    "overflow in the final norm": (_fp32(_poke("model.norm.weight", 0, -BIG)), UnsupportedLayerError, ["'model.norm.weight'", "overflow"]),
    "overflow in a renamed router": (_fp32(_poke("model.layers.1.block_sparse_moe.gate.weight", (0, 0), BIG)), UnsupportedLayerError,
                                     ["'model.layers.1.block_sparse_moe.gate.weight'", "overflow"]),
    "NaN in a late expert": (_poke(LATE, (0, 0), float("nan")), UnsupportedLayerError, [f"'{LATE}'", "NaN/Inf"]),
    "one expert missing": (lambda w: {k: v for k, v in w.items() if "layers.1.block_sparse_moe.experts.2.w3" not in k}, CheckpointError,
                           ["'model.layers.1.mlp.experts.gate_up_proj'", "1 missing", "experts.2.w3.weight"]),
    "fused and per-expert names together": (lambda w: {**w, "model.layers.0.mlp.experts.down_proj": torch.zeros(4, 160, 96)},
                                            CheckpointError, ["'model.layers.0.mlp.experts.down_proj'", "given twice"]),
    "renamed and checkpoint names together": (lambda w: {**w, "model.layers.0.mlp.gate.weight": w["model.layers.0.block_sparse_moe.gate.weight"]},
                                              CheckpointError, ["'model.layers.0.mlp.gate.weight'", "given twice"]),
    "expert of the wrong shape": (_set("model.layers.1.block_sparse_moe.experts.0.w1.weight", torch.zeros(96, 161)), CheckpointError,
                                  ["experts.0.w1.weight", "[96, 161]", "[96, 160]"]),
    "meta expert": (_set(LATE, torch.empty(160, 96, device="meta")), CheckpointError, [f"'{LATE}'", "meta"]),
    "generator raising in the last layer": (lambda w: _generator_failing_after(len(w) - 2)(w), CheckpointError,
                                            [f"after {{n}} tensor(s)", "OSError"]),
}


@pytest.mark.parametrize("case", list(MOE_BAD))
def test_bad_moe_reload_changes_nothing(mixtral, case):
    model, new = mixtral
    make, err, culprits = MOE_BAD[case]
    culprits = [c.replace("{n}", str(len(new) - 2)) for c in culprits]
    before = snapshot(model)
    with raises_naming(err, *culprits) as info:
        oqcore.reload_weights(model, make(new))
    assert type(info.value) is err
    assert_unchanged(model, before)


def test_moe_reload_from_float32_equals_a_fresh_load(mixtral, tiny_moe, tmp_path):
    """float32 checkpoint tensors into a bfloat16 model: the bytes a load of the same values gives."""
    model, new = mixtral
    oqcore.reload_weights(model, ((k, v.float()) for k, v in new.items()))
    from safetensors.torch import save_file
    import shutil

    src = tiny_moe("mixtral")
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copy(f, tmp_path / f.name)
    save_file({k: v.contiguous() for k, v in new.items()}, tmp_path / "model.safetensors")
    fresh = oqcore.load(tmp_path, CONFIG)
    got, want = _bytes(model), _bytes(fresh)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
