"""Every CPU forward the planner chooses, against the reference forward, on odd shapes.

For each scheme in the registry and each dynamic activation key it supports (``None`` = weight-only),
the planner's choice on the CPU (no pin, Triton off) runs a linear layer and a routed-experts block
(Mixtral and the transposed, biased GPT-OSS layout); the ``torch`` reference backend of the same
quantized weights gives the reference. Shapes: K = 224 (not a multiple of 128; a multiple of 32 for
MX blocks and of 16 for int8pack), N = 257 and 72, M = 1, 3, 17, 257.

Bound per output element, ``S = |x_q| @ |W|^T`` (``x_q`` the reference's fake-quantized input,
``W`` the dequantized weight, both float32), plus one bf16 ulp (``2^-7 |ref|``) for bf16 outputs:

- every CPU forward: ``2 * K * eps32 * S``, float32 summation order. W8A8 activations are quantized
  by the scheme's C quantizer (the reference's bytes); fp8/int8 codes, bf16 activations and e8m0
  scales are exact in bf16 and float32, so the fused GEMM's products are exact and only the order
  and the place of the scale multiplications differ.
- except ``torch._weight_int8pack_mm`` (int8 weight-only: float32 activations, and bf16 batches
  of up to 4 rows), which takes activations and scales in bf16: ``2^-7 * S``.

MoE: the same bounds relative to ``max |ref|`` (the gate between the two projections is computed
from float32 values that already differ by rounding); weight-only ``2^-6``: the gate output is
rounded to the model dtype before the down projection, as the original bf16 experts compute it.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import oqcore
from oqcore.modules import QuantizedLinear, QuantizedMoE

EPS32 = torch.finfo(torch.float32).eps
K = 224


def _pairs(kind: str) -> list[tuple[str, str | None]]:
    """(weight key name, activation key name or None) for every dynamic pairing of ``kind``."""
    reg = oqcore.get_registry()
    out = []
    for (k, key), cls in sorted(reg.methods.items(), key=lambda kv: (kv[0][0], reg.key_name(kv[0][1]))):
        if k != kind:
            continue
        for act in cls.cls.supported_activation_keys:
            if act is not None and act.scale.static:
                continue
            out.append((reg.key_name(key), None if act is None else reg.name_of(act, "activation")))
    return out


@pytest.fixture(autouse=True)
def _no_triton(monkeypatch):
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")


ROUNDS_TO_BF16 = {"cpu-int8"}
"""Weight-only backends that may round activations, scales and outputs to bf16 (``torch._weight_int8pack_mm``:
float32 activations, and bf16 batches of up to 4 rows, where it is faster)."""


def _bound(x_q: torch.Tensor, w: torch.Tensor, ref: torch.Tensor, act, dtype, backend: str) -> torch.Tensor:
    s = x_q.float().abs() @ w.abs().t()
    loose = act is None and backend in ROUNDS_TO_BF16
    tol = 2.0**-7 if loose else 2 * x_q.shape[-1] * EPS32
    ulp = 0.0 if dtype == torch.float32 else 2.0**-7
    return tol * s + ulp * ref.float().abs() + 1e-30


@pytest.mark.parametrize("weight,act", _pairs("linear"))
def test_linear_cpu_backend_matches_reference(weight, act):
    torch.manual_seed(0)
    for n in (257, 72):
        for dtype in (torch.bfloat16, torch.float32):
            model = nn.Sequential(nn.Linear(K, n)).to(dtype)
            ref_model = nn.Sequential(nn.Linear(K, n)).to(dtype)
            ref_model.load_state_dict(model.state_dict())
            spec = {"weight": weight, "activation": act}
            oqcore.quantize_(model, {"linear": spec})
            oqcore.quantize_(ref_model, {"linear": spec, "backend": {"linear": "torch"}})
            layer: QuantizedLinear = model[0]
            assert layer.method.backend.name != "torch", f"{weight}/{act}: no CPU backend chosen"
            w = layer.method.dequantize_layer_weight(layer, "weight", torch.float32)
            for m in (1, 3, 17, 257):
                x = torch.randn(m, K).to(dtype)
                y, ref = model(x), ref_model(x)
                assert y.dtype == dtype and y.shape == (m, n)
                x_q = layer.method.fake_quantize_activation(x, layer).float()
                err = (y.float() - ref.float()).abs()
                bound = _bound(x_q, w, ref, act, dtype, layer.method.backend.name) + 2 * EPS32 * layer.bias.float().abs()
                worst = float((err / bound).max())
                assert worst <= 1.0, f"{weight}/{act} {layer.method.backend.name} {dtype} M={m} N={n}: err/bound {worst:.3g}"


E, H, I = 4, 64, 96


@functools.lru_cache(maxsize=None)
def _experts_once(arch: str) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"head_dim": 16} if arch == "gpt_oss" else {}
    cfg = AutoConfig.for_model(
        arch, hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=E, vocab_size=128, **extra,
    )
    torch.manual_seed(0)
    experts = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in sorted(experts.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 2 else 0.08))
    return experts


def _experts(arch: str) -> nn.Module:
    """A fresh copy of the seeded experts module of ``arch`` (built once per session)."""
    return copy.deepcopy(_experts_once(arch))


def _quantized_experts(arch: str, spec: dict, backend: str | None) -> QuantizedMoE:
    model = nn.ModuleDict({"experts": _experts(arch)})
    cfg = {"moe": spec} | ({"backend": {"moe": backend}} if backend else {})
    oqcore.quantize_(model, cfg)
    return model["experts"]


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("weight,act", _pairs("moe"))
def test_moe_cpu_backend_matches_reference(arch, weight, act):
    spec = {"weight": weight, "activation": act}
    layer = _quantized_experts(arch, spec, None)
    ref_layer = _quantized_experts(arch, spec, "torch")
    assert layer.method.backend.name != "torch", f"{weight}/{act}: no CPU backend chosen"
    g = torch.Generator().manual_seed(5)
    for t in (1, 3, 17):
        x = torch.randn(t, H, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(t)])
        rw = torch.softmax(torch.randn(t, 2, generator=g), dim=-1)
        for dtype in (torch.float32, torch.bfloat16):
            y = layer(x.to(dtype), ids, rw)
            ref = ref_layer(x.to(dtype), ids, rw)
            assert y.dtype == dtype and y.shape == (t, H)
            scale = float(ref.float().abs().max())
            tol = 2 * max(H, I) * EPS32 * 8 if act is not None else 2.0**-6
            ulp = 0.0 if dtype == torch.float32 else 2.0**-7
            err = float((y.float() - ref.float()).abs().max())
            assert err <= (tol + ulp) * scale + 1e-6, f"{arch} {weight}/{act} {dtype} T={t}: err {err:.3g} vs {tol * scale:.3g}"
