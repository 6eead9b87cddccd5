"""The plugin's own tests: numbers against its reference, the plan, the whole model lifecycle."""

import pytest
import torch
from torch import nn

import oqcore
from oq_plugin_template.scheme import GROUP, dequantize, quantize


def test_reference_numbers(plugin):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    q, scale = quantize(w, None)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 7 and scale.shape == (8, 64 // GROUP)
    err = (dequantize(q, scale, torch.float32, None) - w).abs()
    assert float(err.max()) <= float(scale.max()) / 2 + 1e-6  # at most half a step


def test_quantize_tensor_goes_through_the_plugin(plugin):
    w = torch.randn(16, 64)
    qt = oqcore.quantize_tensor(w, "int4_g32")
    q, scale = quantize(w, None)
    assert torch.equal(qt.qdata, q) and torch.equal(qt.scale, scale)
    with pytest.raises(oqcore.UnsupportedLayerError, match="int4_g32 needs K divisible by 32"):
        oqcore.quantize_tensor(torch.randn(16, 40), "int4_g32")


def test_plan_and_shape_rule(plugin):
    p = oqcore.plan(nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 40)), {"linear": "int4_g32"})
    lp = p["0"]
    assert (lp.bound.method_cls.__name__, lp.quantizer.name, lp.backend.name) == ("Int4G32LinearMethod", "torch", "torch")
    with pytest.raises(oqcore.UnsupportedLayerError, match="int4_g32 needs in_features divisible by 32, got 48"):
        oqcore.plan(nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 8)), {"linear": "int4_g32"})


def test_quantize_model_in_place_and_forward(plugin):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    x = torch.randn(4, 64)
    ref_w = [m.weight.detach().clone() for m in (model[0], model[2])]
    oqcore.quantize_(model, {"linear": "int4_g32"})
    assert model[0].weight.dtype == torch.int8 and model[0].weight_scale.shape == (96, 2)
    # the forward is the reference's float32 dequantize-and-matmul
    expected = x
    for lin, w in zip((model[0], model[2]), ref_w):
        q, s = quantize(w, None)
        expected = torch.nn.functional.linear(expected.float(), dequantize(q, s, torch.float32, None), lin.bias.float())
        if lin is model[0]:
            expected = torch.relu(expected)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
