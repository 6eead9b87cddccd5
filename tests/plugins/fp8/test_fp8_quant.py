"""The torch reference quantizers: bytes and scales equal compressed-tensors', per-expert 3D stacks,
zeros, NaN/Inf, and weight accuracy."""

from __future__ import annotations

import pytest
import torch

import oqcore
from oqcore.metrics import sqnr
from oqcore.modules import QuantizedLinear

from fp8_testutil import FP8, cases, ct_quantize, gaussian, same_bytes
from oq_plugin_fp8 import quant as Q

WEIGHT_STRATEGIES = {
    "tensor": ("fp8_per_tensor_static", Q.quantize_per_tensor),
    "channel": ("fp8_per_channel_static", Q.quantize_per_channel),
    "block": ("fp8_per_block_static", Q.quantize_per_block),
}


@pytest.mark.parametrize("case", sorted(cases()))
@pytest.mark.parametrize("strategy", sorted(WEIGHT_STRATEGIES))
def test_bit_exact_vs_compressed_tensors(strategy, case):
    w = cases()[case]
    name, fn = WEIGHT_STRATEGIES[strategy]
    q_ct, s_ct = ct_quantize(w, strategy)
    q, s = fn(w, None)
    assert q.dtype == FP8 and s.dtype == torch.float32
    assert same_bytes(q, q_ct.to(FP8)), f"{strategy}/{case}: {(q.view(torch.uint8) != q_ct.view(torch.uint8)).sum()} bytes differ"
    assert torch.equal(s, s_ct.reshape(s.shape))
    # and through the public tensor API, which dispatches to the same reference
    qt = oqcore.tensor.quantize_tensor(w, name)
    assert same_bytes(qt.qdata, q) and torch.equal(qt.scale, s)


def test_scale_layouts():
    w = gaussian(300, 257)
    assert Q.quantize_per_tensor(w)[1].shape == (1,)
    assert Q.quantize_per_channel(w)[1].shape == (300, 1)
    assert Q.quantize_per_block(w)[1].shape == (3, 3)
    assert Q.quantize_per_token(w)[1].shape == (300, 1)
    assert Q.quantize_per_group(w)[1].shape == (300, 3)
    w3 = gaussian(4, 300, 257)
    assert Q.quantize_per_tensor(w3)[1].shape == (4, 1)
    assert Q.quantize_per_channel(w3)[1].shape == (4, 300, 1)
    assert Q.quantize_per_block(w3)[1].shape == (4, 3, 3)


@pytest.mark.parametrize("strategy", sorted(WEIGHT_STRATEGIES))
def test_expert_stack_is_per_expert(strategy):
    """3D [E, N, K]: every expert's bytes and scales equal quantizing it alone (and compressed-tensors')."""
    _, fn = WEIGHT_STRATEGIES[strategy]
    w = gaussian(3, 150, 140) * torch.tensor([1e-3, 1.0, 1e3])[:, None, None]
    w[1] = 0.0  # a zero expert
    q, s = fn(w)
    for e in range(3):
        qe, se = fn(w[e])
        assert same_bytes(q[e], qe) and torch.equal(s[e], se)
        q_ct, s_ct = ct_quantize(w[e], strategy)
        assert same_bytes(q[e], q_ct.to(FP8)) and torch.equal(s[e], s_ct.reshape(se.shape))
    assert torch.all(s[1] == torch.finfo(torch.float32).eps)
    assert bool((s[2] > 100 * s[0]).all())  # expert scales are independent: 1e3 vs 1e-3 magnitudes


def test_bf16_input_is_upcast_first():
    w = gaussian(130, 200, dtype=torch.bfloat16)
    q_ct, s_ct = ct_quantize(w.float(), "block")
    q, s = Q.quantize_per_block(w)
    assert same_bytes(q, q_ct.to(FP8)) and torch.equal(s, s_ct)


@pytest.mark.parametrize("strategy,fn", [("token", Q.quantize_per_token), ("group", Q.quantize_per_group), ("tensor", Q.quantize_per_tensor)])
def test_activation_quantizers_match_compressed_tensors(strategy, fn):
    """Dynamic activation quantizers: per token [M, 1], 1x128 groups [M, K/128], per tensor [1]."""
    x = gaussian(37, 256) * torch.logspace(-3, 3, 37)[:, None]
    x[3] = 0
    q_ct, s_ct = ct_quantize(x, strategy)
    q, s = fn(x)
    assert same_bytes(q, q_ct.to(FP8)) and torch.equal(s, s_ct.reshape(s.shape))


def test_group_quantizer_partial_last_group():
    """K = 200: the second 1x128 group holds 72 columns; it is scaled by its own amax."""
    x = gaussian(5, 200)
    x[:, 128:] *= 1e-3
    q, s = Q.quantize_per_group(x)
    assert s.shape == (5, 2)
    assert torch.equal(s[:, 1], x[:, 128:].abs().amax(dim=1) / 448.0)
    for part, col in ((slice(0, 128), 0), (slice(128, 200), 1)):
        q_alone, s_alone = Q.quantize_per_token(x[:, part])
        assert same_bytes(q[:, part], q_alone) and torch.equal(s[:, col : col + 1], s_alone)


@pytest.mark.parametrize(
    "quantize,dequantize",
    [
        (Q.quantize_per_tensor, Q.dequantize_per_tensor),
        (Q.quantize_per_channel, Q.dequantize_per_channel),
        (Q.quantize_per_block, Q.dequantize_per_block),
    ],
)
def test_zeros_give_finite_scales_and_exact_zeros(quantize, dequantize):
    w = gaussian(2, 200, 300)
    w[0, 7] = 0.0  # a zero row
    w[0, 128:, 128:256] = 0.0  # a zero block
    w[1] = 0.0  # a zero expert
    q, s = quantize(w)
    assert torch.isfinite(s).all() and (s > 0).all()
    d = dequantize(q, s, torch.float32)
    assert torch.isfinite(d).all()
    for region in ((0, 7), (0, slice(128, 200), slice(128, 256)), (1,)):
        assert torch.equal(d[region], torch.zeros_like(d[region]))
    assert sqnr(w[0], d[0]) > 29


@pytest.mark.parametrize("name", ["fp8_per_tensor_static", "fp8_per_channel_static", "fp8_per_block_static"])
def test_weight_sqnr_gaussian(name):
    """Weight SQNR on N(0, 1) weights >= 29 dB (float8_e4m3fn's 3 mantissa bits give ~31 dB)."""
    w = gaussian(512, 384, seed=7)
    qt = oqcore.tensor.quantize_tensor(w, name)
    got = sqnr(w, qt.dequantize(torch.float32))
    assert got >= 29.0, got
    print(f"{name}: weight SQNR {got:.2f} dB")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("weight", ["fp8_per_tensor", "fp8_per_channel", "fp8_per_block"])
def test_non_finite_weight_names_the_layer(weight, bad):
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    bound = oqcore.plan(model, {"linear": weight}, device="cpu")["0"].bound
    backend = oqcore.Backend(name="torch", activation_key=bound.activation_key)
    method = bound.make_method(backend)
    layer = QuantizedLinear("model.layers.0.q_proj", 64, 32, False, method, torch.float32)
    w = gaussian(32, 64)
    w[3, 5] = bad
    layer.weight = torch.nn.Parameter(w, requires_grad=False)
    with pytest.raises(oqcore.UnsupportedLayerError, match=r"model\.layers\.0\.q_proj") as e:
        method.process_weights_after_loading(layer)
    assert e.value.layer == "model.layers.0.q_proj" and "NaN/Inf" in str(e.value)
    assert not layer.quantized
