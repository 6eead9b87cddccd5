"""Bad-input battery of ``oqcore.quantize_tensor``: one typed error naming the tensor (and the
plugin, for its own failures), and the default backend giving the reference bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import oqcore
import toy_scheme
from battery.util import raises_naming
from oqcore import ConfigError, PluginError, UnknownKeyError, UnsupportedLayerError
from oqcore.oracle import select_quantizer
from oqcore.tensor import REFERENCE_BACKEND

W = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)).bfloat16()

# (input, key, kwargs, error type, culprits the message must name)
BAD = {
    "1-D": (torch.randn(96), "fp8_per_tensor_static", {}, UnsupportedLayerError, ["w.q", "2D", "[96]"]),
    "4-D": (torch.randn(2, 2, 4, 32), "mxfp8", {}, UnsupportedLayerError, ["w.q", "[2, 2, 4, 32]"]),
    "0-D": (torch.tensor(1.0), "fp8_per_tensor_static", {}, UnsupportedLayerError, ["w.q", "shape []"]),
    "0-size rows": (torch.empty(0, 64), "fp8_per_channel_static", {}, UnsupportedLayerError, ["w.q", "empty", "[0, 64]"]),
    "0-size experts": (torch.empty(0, 4, 64), "mxfp8", {}, UnsupportedLayerError, ["w.q", "empty"]),
    "int32": (torch.ones(4, 32, dtype=torch.int32), "fp8_per_tensor_static", {}, UnsupportedLayerError, ["w.q", "torch.int32", "bfloat16"]),
    "int8": (torch.ones(4, 32, dtype=torch.int8), "int8_per_channel_static", {}, UnsupportedLayerError, ["w.q", "torch.int8"]),
    "bool": (torch.ones(4, 32, dtype=torch.bool), "mxfp8", {}, UnsupportedLayerError, ["w.q", "torch.bool"]),
    "complex": (torch.ones(4, 32, dtype=torch.complex64), "mxfp8", {}, UnsupportedLayerError, ["w.q", "complex64"]),
    "already fp8": (torch.ones(4, 32).to(torch.float8_e4m3fn), "fp8_per_tensor_static", {}, UnsupportedLayerError, ["w.q", "float8_e4m3fn"]),
    "list": ([[1.0] * 32] * 4, "mxfp8", {}, UnsupportedLayerError, ["w.q", "torch.Tensor", "list"]),
    "numpy": (np.ones((4, 32), dtype=np.float32), "mxfp8", {}, UnsupportedLayerError, ["w.q", "ndarray"]),
    "None": (None, "mxfp8", {}, UnsupportedLayerError, ["w.q", "NoneType"]),
    "mxfp8 K=40": (torch.randn(8, 40), "mxfp8", {}, UnsupportedLayerError, ["w.q", "divisible by 32", "mxfp8", "plugin"]),
    "mxfp8 K=40 reference": (torch.randn(8, 40), "mxfp8", {"backend": "torch"}, UnsupportedLayerError, ["w.q", "divisible by 32"]),
    "mxfp8 stack K=48": (torch.randn(3, 8, 48), "mxfp8", {}, UnsupportedLayerError, ["w.q", "divisible by 32"]),
    "NaN": (torch.tensor([[1.0, float("nan")] * 16] * 2), "fp8_per_tensor_static", {}, UnsupportedLayerError, ["w.q", "32 NaN/Inf value(s) of 64"]),
    "Inf in an expert": (torch.zeros(3, 2, 32).index_put_((torch.tensor(2), torch.tensor(1), torch.tensor(5)), torch.tensor(float("inf"))),
                         "mxfp8", {}, UnsupportedLayerError, ["w.q[expert 2]"]),
    "unknown key": (W, "fp8_per_tensr_static", {}, UnknownKeyError, ["fp8_per_tensr_static", "did you mean 'fp8_per_tensor_static'"]),
    "key of the wrong type": (W, 8, {}, ConfigError, ["key", "int"]),
    "activation-only key as weight": (W, "fp8_per_token", {}, ConfigError, ["fp8_per_token", "weight"]),
    "bad role": (W, "mxfp8", {"role": "bias"}, ConfigError, ["role", "'bias'"]),
    "unknown backend": (W, "mxfp8", {"backend": "cuda-magic"}, ConfigError, ["backend", "cuda-magic", "cpu", "torch"]),
    "backend of the wrong type": (W, "mxfp8", {"backend": 3}, ConfigError, ["backend", "int"]),
    "unknown option": (W, "mxfp8", {"options": {"scale_mod": "floor"}}, ConfigError, ["options", "scale_mod"]),
    "bad option value": (W, "mxfp8", {"options": {"scale_mode": "ceil"}}, ConfigError, ["options.scale_mode"]),
    "options not a mapping": (W, "mxfp8", {"options": ["floor"]}, ConfigError, ["options", "list"]),
    "options model of another method": (W, "fp8_per_tensor_static", {"options": toy_scheme.ToyOptions()}, ConfigError, ["options", "ToyOptions"]),
    "meta on a native backend": (torch.empty(4, 32, device="meta"), "mxfp8", {"backend": "cpu"}, ConfigError, ["backend", "meta", "'torch'"]),
    # the v2 name of the argument (backend= above is its v1 alias; errors name the one given)
    "unknown quantizer": (W, "mxfp8", {"quantizer": "cuda-magic"}, ConfigError, ["quantizer", "cuda-magic", "cpu", "torch"]),
    "quantizer of the wrong type": (W, "mxfp8", {"quantizer": 3}, ConfigError, ["quantizer", "int"]),
    "meta on a native quantizer": (torch.empty(4, 32, device="meta"), "mxfp8", {"quantizer": "cpu"}, ConfigError, ["quantizer", "meta", "'torch'"]),
    "quantizer and backend disagree": (W, "mxfp8", {"quantizer": "cpu", "backend": "torch"}, ConfigError, ["quantizer", "'cpu'", "'torch'"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
    w, key, kw, err, culprits = BAD[case]
    with raises_naming(err, *culprits) as info:
        oqcore.quantize_tensor(w, key, name="w.q", **kw)
    assert type(info.value) is err
    if err is UnsupportedLayerError:
        assert info.value.layer.startswith("w.q")


# ---- a plugin's own failures -----------------------------------------------------------------


@pytest.fixture
def toy_failing(monkeypatch):
    """The toy scheme with a quantizer that raises whatever ``fail["exc"]`` holds (or returns
    ``fail["result"]``)."""
    fail: dict = {}

    def quantize(w, options):
        if "exc" in fail:
            raise fail["exc"]
        if "result" in fail:
            return fail["result"]
        return toy_quantize(w, options)

    toy_quantize = toy_scheme.quantize
    monkeypatch.setattr(toy_scheme, "quantize", quantize)
    toy_scheme.register_toy()
    return fail


def test_plugin_value_error_means_unsupported_input(toy_failing):
    toy_failing["exc"] = ValueError("toy needs rows of at most 7 elements")
    with raises_naming(UnsupportedLayerError, "layer 'm.q_proj'", "toy_int4", "plugin 'toy'", "at most 7") as info:
        oqcore.quantize_tensor(torch.randn(4, 8), "toy_int4", name="m.q_proj")
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize("exc", [RuntimeError("kernel exploded"), KeyError("scale"), ZeroDivisionError("x"), NotImplementedError("bf16")])
def test_plugin_bug_is_a_plugin_error(toy_failing, exc):
    toy_failing["exc"] = exc
    with raises_naming(PluginError, "plugin 'toy'", "'toy_int4'", "'torch'", "'m.q_proj'", type(exc).__name__) as info:
        oqcore.quantize_tensor(torch.randn(4, 8), "toy_int4", name="m.q_proj")
    assert type(info.value) is PluginError and info.value.__cause__ is exc


@pytest.mark.parametrize(
    "result, culprit",
    [(None, "NoneType"), ((torch.zeros(4, 8),), "tuple"), ((torch.zeros(4, 4, dtype=torch.int8), torch.ones(4, 1)), "shape [4, 4]")],
    ids=["None", "one tensor", "wrong qdata shape"],
)
def test_plugin_breaking_the_return_contract(toy_failing, result, culprit):
    toy_failing["result"] = result
    with raises_naming(PluginError, "plugin 'toy'", "'m.q_proj'", culprit):
        oqcore.quantize_tensor(torch.randn(4, 8), "toy_int4", name="m.q_proj")


def test_errors_leaving_the_public_api_are_typed():
    """Through the public wrapper too (no InternalError for bad input)."""
    with pytest.raises(UnsupportedLayerError):
        oqcore.quantize_tensor(torch.randn(8, 40), "mxfp8")
    with pytest.raises(UnsupportedLayerError, match="'<tensor>'"):
        oqcore.quantize_tensor([1.0], "mxfp8")


# ---- the default backend ---------------------------------------------------------------------

WEIGHT_KEYS = ["fp8_per_tensor_static", "fp8_per_channel_static", "fp8_per_block_static", "mxfp8", "int8_per_channel_static", "mxfp4", "nvfp4"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("key", WEIGHT_KEYS)
def test_default_backend_gives_the_reference_bytes(key, dtype):
    g = torch.Generator().manual_seed(1)
    for w in (torch.randn(130, 160, generator=g).to(dtype), torch.randn(3, 40, 64, generator=g).to(dtype)):
        fast = oqcore.quantize_tensor(w, key)
        ref = oqcore.quantize_tensor(w, key, backend=REFERENCE_BACKEND)
        assert fast.qdata.dtype == ref.qdata.dtype and fast.scale.dtype == ref.scale.dtype
        assert torch.equal(fast.qdata.view(torch.uint8), ref.qdata.view(torch.uint8))
        assert torch.equal(fast.scale.contiguous().view(torch.uint8), ref.scale.contiguous().view(torch.uint8))


@pytest.mark.parametrize("key", WEIGHT_KEYS)
def test_default_backend_is_the_one_a_load_uses(key, monkeypatch):
    reg = oqcore.get_registry()
    k = reg.resolve_key(key, "weight")
    chosen = select_quantizer(reg.format(k).implementations, W.device, [tuple(W.shape)], W.dtype).impl.name
    assert chosen == "cpu"  # every built-in scheme has a native CPU quantizer
    calls = []
    q = reg.quantizers[(k, chosen)]
    import dataclasses

    reg.quantizers[(k, chosen)] = dataclasses.replace(q, quantize=lambda w, o: (calls.append(w.shape), q.quantize(w, o))[1])
    oqcore.quantize_tensor(W, key)
    assert calls == [W.shape]


@pytest.mark.parametrize("key", WEIGHT_KEYS)
def test_meta_tensor_is_a_shape_dry_run(key):
    real = oqcore.quantize_tensor(torch.randn(2, 64, 96), key)
    dry = oqcore.quantize_tensor(torch.empty(2, 64, 96, device="meta"), key)
    assert dry.qdata.is_meta and dry.scale.is_meta
    assert (dry.qdata.shape, dry.qdata.dtype, dry.scale.shape, dry.scale.dtype) == (
        real.qdata.shape,
        real.qdata.dtype,
        real.scale.shape,
        real.scale.dtype,
    )


def test_check_finite_skips_meta():
    from oqcore.tensor import check_finite, require_finite

    check_finite(torch.empty(3, 4, device="meta"), "m")
    require_finite(torch.empty(3, 4, device="meta"))
    with pytest.raises(UnsupportedLayerError, match="'m'"):
        check_finite(torch.tensor([[float("inf")]]), "m")


@pytest.mark.parametrize("backend", [None, REFERENCE_BACKEND])
def test_a_parameter_gives_plain_tensors(backend):
    p = torch.nn.Parameter(torch.randn(32, 64))
    qt = oqcore.quantize_tensor(p, "fp8_per_block_static", backend=backend)
    assert not qt.qdata.requires_grad and not qt.scale.requires_grad
    assert torch.equal(qt.qdata.view(torch.uint8), oqcore.quantize_tensor(p.detach(), "fp8_per_block_static").qdata.view(torch.uint8))
