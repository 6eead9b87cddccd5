"""The mxfp8 ``cpu`` backend (weight-only): fused dequantize-and-GEMV C kernel reading fp8 bytes and
e8m0 scale bytes / tiled dequantize + ``torch.mm``, against the ``torch`` backend's reference
forward on the same quantized layer.

Error bound (per output element), with ``S = |x| @ |W_deq|^T`` (float32, reference dequantization):
``|y - ref| <= tol * S + u * |ref|`` with ``tol = 1e-5`` (fused GEMV, or float32 activations: the
same float32 ``q * 2^e`` values, float32 accumulation, another summation order) or ``2^-8``
(bf16 batches above ``GEMV_MAX_M``: weights rounded once to bf16 in the scratch tile), and
``u = 2^-7`` (one bf16 output rounding) or 0 (float32 output).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import oqcore
from oqcore.modules import QuantizedLinear, QuantizedMoE
from oq_plugin_fp8 import cpu
from oq_plugin_mxfp8.backends import _cpu_supported
from oq_plugin_mxfp8.keys import kMxfp8Static

NAME = "model.layers.0.q_proj"
NON_NAN_CODES = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)


def candidates(kind):
    """Every forward backend offered for mxfp8 weights (the scheme's and the core's ``torch`` reference)."""
    return oqcore.get_plugin_manager().backend_candidates(kind, kMxfp8Static)


def _backend(kind):
    return next(b for b in candidates(kind) if b.name == "cpu")


def _linear(n, k, seed=0, bias=True):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    bound = oqcore.plan(nn.Sequential(lin), {"linear": {"weight": "mxfp8", "activation": None}})["0"].bound
    m = bound.make_method(_backend("linear"), activation_key=None)
    ql = QuantizedLinear.from_linear(NAME, lin, m)
    ql.load_state_dict(lin.state_dict(), assign=True)
    m.process_weights_after_loading(ql)
    return ql


def test_e8m0_scales_and_all_codes_exact():
    """Every non-NaN fp8 byte times e8m0 scales 0 (2^-126), 1, 120, 127 and 134 dequantizes to the
    mxfp8 reference dequantizer's float32 values bit for bit."""
    from oq_plugin_mxfp8.quant import dequantize_mxfp8

    q = torch.cat([NON_NAN_CODES, NON_NAN_CODES[:2]]).reshape(8, 32).repeat(5, 1).contiguous()
    e = torch.tensor([0, 1, 120, 127, 134], dtype=torch.uint8).repeat_interleave(8).reshape(40, 1)
    ref = dequantize_mxfp8(q.view(torch.float8_e4m3fn), e.view(torch.float8_e8m0fnu), torch.float32)
    out = cpu.dequantize_rows(q, e, cpu.SCALE_E8M0, 1, 32, 1, torch.float32)
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("n,k", [(96, 256), (300, 288), (384, 512)])
def test_linear_matches_reference(n, k):
    layer = _linear(n, k, seed=n)
    g = torch.Generator().manual_seed(k)
    # every code (subnormals, zeros, +-448, negatives) reaches the kernel: both backends read these bytes
    idx = torch.randint(0, NON_NAN_CODES.numel(), (n, k), generator=g)
    layer.weight.data.view(torch.uint8).copy_(NON_NAN_CODES[idx])
    method = layer.method
    w_deq = method.dequantize_weight(layer.weight, layer.weight_scale, torch.float32)
    for dtype in (torch.bfloat16, torch.float32):
        for m in (1, 2, 7, 33):
            x = torch.randn(m, k, generator=g).to(dtype)
            y = layer(x)
            ref = method.reference_forward(layer, x)
            assert y.dtype == dtype and y.shape == (m, n)
            tol = 1e-5 if (m <= cpu.GEMV_MAX_M or dtype == torch.float32) else 2.0 ** -8
            u = 0.0 if dtype == torch.float32 else 2.0 ** -7
            bound = tol * (x.float().abs() @ w_deq.abs().t()) + u * ref.float().abs() + 1e-30
            err = (y.float() - ref.float()).abs()
            assert (err <= bound).all(), f"{dtype} m={m}: max err/bound {(err / bound).max():.3g}"


def test_oracle_picks_cpu_without_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = nn.ModuleDict({"lin": nn.Linear(256, 128)})
    lp = oqcore.plan(model, {"linear": {"weight": "mxfp8", "activation": None}}, device="cpu")["lin"]
    assert lp.backend.name == "cpu"
    ok, why = _cpu_supported(model["lin"], torch.device("meta"))
    assert not ok and "CPU" in why


E, H, I = 4, 64, 96


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_moe_matches_reference(arch):
    """Routed experts through the kernel vs the reference loop: 1e-4 (float32) / 2^-7 (bf16)
    relative to max |ref|, for 1 and 24 tokens."""
    import transformers

    kw = dict(hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=E, vocab_size=128)
    if arch == "gpt_oss":
        kw["head_dim"] = 16
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(arch, **kw)).float()
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        for pn, p in experts.named_parameters():
            p.normal_(0, 0.02 if "bias" in pn else 0.1)
    bound = oqcore.plan(model, {"moe": {"weight": "mxfp8", "activation": None}})["model.layers.0.mlp.experts"].bound
    method = bound.make_method(_backend("moe"), activation_key=None)
    layer = QuantizedMoE("model.layers.0.mlp.experts", experts, method)
    layer.load_state_dict(experts.state_dict(), assign=True, strict=False)
    method.process_weights_after_loading(layer)
    g = torch.Generator().manual_seed(5)
    for t in (1, 24):
        x = torch.randn(t, H, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(t)])
        rw = torch.softmax(torch.randn(t, 2, generator=g), dim=-1)
        for dtype in (torch.float32, torch.bfloat16):
            y = method.apply(layer, x.to(dtype), ids, rw)
            ref = method.reference_forward(layer, x.to(dtype), ids, rw)
            tol = 1e-4 if dtype == torch.float32 else 2.0 ** -7
            assert y.dtype == dtype
            assert (y.float() - ref.float()).abs().max() <= tol * ref.float().abs().max() + 1e-6


def test_eager_fallback_without_compile(monkeypatch):
    """``OQ_COMPILE=0``: eager torch tiles (e8m0 decode included) give the reference numbers."""
    layer = _linear(96, 256, seed=3)
    layer.weight_scale.data.view(torch.uint8)[0, 0] = 0  # the byte-0 rule (2^-126) on the eager path too
    x = torch.randn(3, 256)
    monkeypatch.setenv("OQ_COMPILE", "0")
    assert not cpu.kernel_status()[0]
    torch.testing.assert_close(layer(x), layer.method.reference_forward(layer, x), rtol=1e-5, atol=1e-5)
