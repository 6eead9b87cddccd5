"""FP8 linear layers: planning through the public API, the Triton GEMMs against the torch
reference forward, and output accuracy against the high-precision layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import oqcore
from oqcore.metrics import sqnr

from fp8_testutil import build_linear, gaussian, same_bytes

LINEAR_COMBOS = [
    ("fp8_per_tensor_static", "fp8_per_tensor_dynamic"),
    ("fp8_per_tensor_static", "fp8_per_token"),
    ("fp8_per_tensor_static", None),
    ("fp8_per_channel_static", "fp8_per_token"),
    ("fp8_per_channel_static", "fp8_per_tensor_dynamic"),
    ("fp8_per_channel_static", None),
    ("fp8_per_block_static", "fp8_per_block_dynamic"),
    ("fp8_per_block_static", None),
]


def _data(n=150, k=200, m=19, dtype=torch.float32):
    w = gaussian(n, k, seed=1).to(dtype) * 0.05
    b = gaussian(n, seed=2).to(dtype)
    x = gaussian(m, k, seed=3).to(dtype)
    x[0] *= 50  # outlier token: per-token and per-group scales differ from per-tensor ones
    return w, b, x


@pytest.mark.parametrize("weight,act", LINEAR_COMBOS)
def test_triton_gemm_matches_reference(weight, act):
    """Triton kernels (interpreter) vs the torch backend's float32 reference forward, fp32 in/out.

    Both see identical fp8 bytes (quantizers are bit-exact); only float32 summation order and where
    the scales are multiplied differ, so the bound is SQNR > 100 dB (float32 has ~24 bits, ~144 dB)
    and max abs error <= 1e-4 * max |ref|.
    """
    w, b, x = _data()
    spec = {"weight": weight, "activation": act}
    ref_layer, ref_plan = build_linear(w, b, spec, backend="torch")
    tri_layer, tri_plan = build_linear(w, b, spec)
    assert ref_plan.backend.name == "torch" and tri_plan.backend.name == "triton"
    assert same_bytes(ref_layer.weight, tri_layer.weight) and torch.equal(ref_layer.weight_scale, tri_layer.weight_scale)
    ref = ref_layer(x)
    got = tri_layer(x)
    assert got.shape == ref.shape == (19, 150) and got.dtype == torch.float32
    assert sqnr(ref, got) > 100, sqnr(ref, got)
    assert (ref - got).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("weight,act", [("fp8_per_block_static", "fp8_per_block_dynamic"), ("fp8_per_channel_static", None)])
def test_triton_gemm_bf16_and_3d_input(weight, act):
    """bf16 activations and a [B, S, K] input: output [B, S, N] in bf16; against the reference,
    only bf16 output rounding differs (SQNR > 45 dB)."""
    w, b, _ = _data(dtype=torch.bfloat16)
    x = gaussian(2, 5, 200, seed=9).to(torch.bfloat16)
    spec = {"weight": weight, "activation": act}
    ref = build_linear(w, b, spec, backend="torch")[0](x)
    got = build_linear(w, b, spec)[0](x)
    assert got.shape == (2, 5, 150) and got.dtype == torch.bfloat16
    assert sqnr(ref, got) > 45, sqnr(ref, got)


@pytest.mark.parametrize("weight,act", LINEAR_COMBOS)
def test_output_accuracy_vs_bf16(weight, act):
    """Layer output SQNR against bf16 ``F.linear``: >= 25 dB for W8A8, >= weight SQNR - 2 dB for
    weight-only (bf16 activations are not quantized)."""
    w, b, x = _data(n=256, k=384, m=32)
    x[0] /= 50
    wb, bb, xb = w.bfloat16(), b.bfloat16(), x.bfloat16()
    ref = F.linear(xb.float(), wb.float(), bb.float())
    layer, _ = build_linear(wb, bb, {"weight": weight, "activation": act}, backend="torch")
    out = sqnr(ref, layer(xb))
    w_sqnr = sqnr(wb.float(), layer.method.dequantize_weight(layer.weight, layer.weight_scale, torch.float32))
    print(f"{weight}/{act}: weight SQNR {w_sqnr:.2f} dB, output SQNR {out:.2f} dB")
    assert w_sqnr >= 29
    if act is None:
        assert out >= w_sqnr - 2, (out, w_sqnr)
    else:
        assert out >= 25, out


def test_plan_chooses_triton_under_interpreter_and_torch_when_pinned():
    model = torch.nn.Sequential(torch.nn.Linear(200, 150), torch.nn.ReLU(), torch.nn.Linear(150, 64))
    p = oqcore.plan(model, {"linear": "fp8_per_block"}, device="cpu")
    assert [lp.backend.name for lp in p.quantized] == ["triton", "triton"]
    reg = oqcore.get_registry()
    assert reg.name_of(p["0"].bound.activation_key, "activation") == "fp8_per_block_dynamic"
    assert p["0"].backend.plugin == "fp8"
    pinned = oqcore.plan(model, {"linear": "fp8_per_block", "backend": {"linear": "torch"}}, device="cpu")
    assert [lp.backend.name for lp in pinned.quantized] == ["torch", "torch"]
    rejected = {c.backend.name: c.reason for c in pinned["0"].candidates if c.reason}
    assert rejected["triton"] == "not the pinned backend 'torch'"


def test_triton_is_rejected_without_interpreter(monkeypatch):
    """On a CPU without TRITON_INTERPRET the C kernel backend is chosen, and the plan says why not triton."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    p = oqcore.plan(model, {"linear": "fp8_per_channel"}, device="cpu")
    assert p["0"].backend.name == "cpu"
    reasons = [c.reason for c in p["0"].candidates if c.backend.name == "triton" and c.reason]
    assert any("TRITON_INTERPRET" in r for r in reasons)


def test_default_and_rejected_activations():
    reg = oqcore.get_registry()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    for shorthand, act in (("fp8_per_tensor", "fp8_per_tensor_dynamic"), ("fp8_per_channel", "fp8_per_token"),
                           ("fp8_per_block", "fp8_per_block_dynamic")):
        lp = oqcore.plan(model, {"linear": shorthand}, device="cpu")["0"]
        assert reg.name_of(lp.bound.activation_key, "activation") == act
    with pytest.raises(oqcore.ConfigError) as e:
        oqcore.QuantizationConfig(moe={"weight": "fp8_per_block", "activation": "fp8_per_token"})
    assert e.value.field == "moe.activation"
    assert "fp8_per_block_dynamic" in str(e.value)
    with pytest.raises(oqcore.ConfigError) as e:
        oqcore.QuantizationConfig(linear={"weight": "fp8_per_tensor_static", "activation": "fp8_per_block_dynamic"})
    assert e.value.field == "linear.activation"


def test_process_is_idempotent_and_frees_high_precision():
    w, b, x = _data()
    layer, _ = build_linear(w, b, {"weight": "fp8_per_block_static"}, backend="torch")
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (2, 2)
    q, s, y = layer.weight.clone(), layer.weight_scale.clone(), layer(x)
    layer.method.process_weights_after_loading(layer)
    assert same_bytes(layer.weight, q) and torch.equal(layer.weight_scale, s) and torch.equal(layer(x), y)


@pytest.mark.parametrize("weight,act", [c for c in LINEAR_COMBOS if c[1] in ("fp8_per_token", "fp8_per_tensor_dynamic")])
def test_scaled_mm_backend(weight, act):
    """The ``scaled-mm`` backend is a candidate but refused on the CPU (with its reason); its forward,
    run here directly (torch._scaled_mm also works on CPU, slowly), equals the reference within
    float32 summation order: SQNR > 100 dB."""
    w, b, x = _data(n=160, k=208)
    layer, lp = build_linear(w, b, {"weight": weight, "activation": act}, backend="torch")
    model = torch.nn.Sequential(torch.nn.Linear(208, 160))
    unpinned = oqcore.plan(model, {"linear": {"weight": weight, "activation": act}}, device="cpu")["0"]
    (mine,) = [c for c in unpinned.candidates
               if c.backend.name == "scaled-mm" and c.backend.activation_key == lp.bound.activation_key]
    assert "CUDA only" in mine.reason and unpinned.backend.name == "triton"
    from oq_plugin_fp8.backends import scaled_mm_forward

    got = scaled_mm_forward(layer.method, layer, x)
    assert sqnr(layer(x), got) > 100
