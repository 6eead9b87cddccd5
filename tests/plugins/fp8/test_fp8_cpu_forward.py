"""The fp8 ``cpu`` backend (weight-only): fused dequantize-and-GEMV C kernel / tiled dequantize +
``torch.mm``, against the ``torch`` backend's reference forward on the same quantized layer.

Error bound (per output element), with ``S = |x| @ |W_deq|^T`` (float32, reference dequantization):

- batch <= ``GEMV_MAX_M`` or float32 activations: ``|y - ref| <= 1e-5 * S`` plus one rounding of the
  output to ``x.dtype`` (``2^-7 |ref|`` for bf16; the kernel dequantizes exactly as the reference, float32 ``q * s``, and
  accumulates in float32; only the summation order differs);
- larger bf16 batches (bf16 scratch tile, weights rounded once to bf16): ``<= 2^-8 * S`` plus one
  output rounding.
"""

from __future__ import annotations

import pytest
import torch

from fp8_testutil import build_linear, gaussian
from oq_plugin_fp8 import cpu

WEIGHTS = ["fp8_per_tensor_static", "fp8_per_channel_static", "fp8_per_block_static"]
NON_NAN_CODES = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)


def _bound(x, w_deq, ref, out_dtype, tol):
    s = x.float().abs() @ w_deq.abs().t()
    ulp = 0.0 if out_dtype == torch.float32 else 2.0 ** -7  # one bf16 ulp of the output
    return tol * s + ulp * ref.float().abs() + 1e-30


def test_all_fp8_codes_convert_exactly():
    """Every non-NaN float8_e4m3fn byte (zero, -0, subnormals, 448, negatives) dequantizes to
    exactly torch's conversion, to float32 and to bf16 (e4m3 values are exact in bf16)."""
    q = NON_NAN_CODES.reshape(2, 127).contiguous()
    one = torch.ones(1)
    ref = q.view(torch.float8_e4m3fn).float()
    f32 = cpu.dequantize_rows(q, one, cpu.SCALE_FLOAT32, 2, 127, 1, torch.float32)
    assert torch.equal(f32.view(torch.int32), ref.view(torch.int32))
    bf = cpu.dequantize_rows(q, one, cpu.SCALE_FLOAT32, 2, 127, 1, torch.bfloat16)
    assert torch.equal(bf.view(torch.int16), ref.bfloat16().view(torch.int16))
    # the fused GEMV sees the same values: x = one-hot picks each code
    x = torch.eye(127)[:4]
    y = cpu.fp8_linear(x, q, one, cpu.SCALE_FLOAT32, 2, 127, 1)
    assert torch.equal(y, ref[:, :4].t())


def _with_all_codes(layer, seed):
    # Overwrite the bytes with every code (both backends read the same bytes): subnormals, zero,
    # +-448 and negatives all reach the kernel regardless of what the quantizer produced.
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, NON_NAN_CODES.numel(), tuple(layer.weight.shape), generator=g)
    layer.weight.data.view(torch.uint8).copy_(NON_NAN_CODES[idx])


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("n,k", [(96, 256), (300, 260), (384, 512)])
def test_linear_matches_reference(weight, n, k):
    w = gaussian(n, k, seed=1) * 0.05
    bias = gaussian(n, seed=2)
    layer, lp = build_linear(w, bias, {"weight": weight, "activation": None}, backend="cpu")
    assert lp.backend.name == "cpu"
    _with_all_codes(layer, seed=n + k)
    method = layer.method
    w_deq = method.dequantize_weight(layer.weight, layer.weight_scale, torch.float32)
    for dtype in (torch.bfloat16, torch.float32):
        for m in (1, 3, 7, 33):
            x = gaussian(m, k, seed=m, dtype=dtype)
            y = layer(x)
            ref = method.reference_forward(layer, x)
            assert y.dtype == dtype and y.shape == (m, n)
            tol = 1e-5 if (m <= cpu.GEMV_MAX_M or dtype == torch.float32) else 2.0 ** -8
            err = (y.float() - ref.float()).abs()
            bound = _bound(x, w_deq, ref, dtype, tol)
            assert (err <= bound).all(), f"{weight} {dtype} m={m}: max err/bound {(err / bound).max():.3g}"


def test_3d_input_and_no_bias():
    w = gaussian(128, 256, seed=3) * 0.05
    layer, _ = build_linear(w, None, {"weight": "fp8_per_channel_static", "activation": None}, backend="cpu")
    x = gaussian(2, 3, 256, seed=4)
    ref = layer.method.reference_forward(layer, x)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_eager_fallback_without_compile(monkeypatch):
    """``OQ_COMPILE=0``: eager torch tiles, same numbers within the bound."""
    w = gaussian(200, 256, seed=5) * 0.05
    layer, _ = build_linear(w, None, {"weight": "fp8_per_block_static", "activation": None}, backend="cpu")
    x = gaussian(2, 256, seed=6)
    monkeypatch.setenv("OQ_COMPILE", "0")
    assert not cpu.kernel_status()[0]
    torch.testing.assert_close(layer(x), layer.method.reference_forward(layer, x), rtol=1e-5, atol=1e-5)


def test_oracle_picks_cpu_without_triton_interpreter(monkeypatch):
    import oqcore

    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    model = torch.nn.ModuleDict({"lin": torch.nn.Linear(256, 128)})
    for weight in WEIGHTS:
        lp = oqcore.plan(model, {"linear": {"weight": weight, "activation": None}}, device="cpu")["lin"]
        assert lp.backend.name == "cpu", weight
    from oq_plugin_fp8.backends import _cpu_supported

    ok, why = _cpu_supported(model["lin"], torch.device("meta"))
    assert not ok and "CPU" in why


# ---- MoE ------------------------------------------------------------------------------------------

E, H, I = 4, 64, 96


def _experts(arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"head_dim": 16} if arch == "gpt_oss" else {}
    cfg = AutoConfig.for_model(
        arch, hidden_size=H, intermediate_size=I, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=E, vocab_size=128, **extra,
    )
    torch.manual_seed(0)
    experts = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).model.layers[0].mlp.experts
    with torch.no_grad():
        for i, (_, p) in enumerate(sorted(experts.named_parameters())):
            p.copy_(gaussian(*p.shape, seed=100 + i) * (0.1 if p.dim() == 2 else 0.08))
    return experts


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("weight", ["fp8_per_tensor_static", "fp8_per_block_static"])
def test_moe_matches_reference(arch, weight):
    """Routed experts: the per-expert loop through the kernel equals the reference loop within
    float32 summation order (1e-4 relative to max |ref|), for 1 and 24 tokens, bf16 and float32."""
    import oqcore
    from oqcore.modules import QuantizedMoE

    experts = _experts(arch)
    model = torch.nn.ModuleDict({"experts": experts})
    lp = oqcore.plan(model, {"moe": {"weight": weight, "activation": None}, "backend": {"moe": "cpu"}}, device="cpu")["experts"]
    assert lp.backend.name == "cpu"
    method = lp.bound.make_method(lp.backend, activation_key=None)
    layer = QuantizedMoE("model.layers.0.mlp.experts", experts, method)
    for pname, p in experts.named_parameters():
        setattr(layer, pname, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
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
