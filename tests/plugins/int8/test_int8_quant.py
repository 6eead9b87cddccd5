"""INT8 quantizers: bit-exact against vLLM's symmetric formula written out here independently, the
Triton quantizer (interpreter) bit-exact against the torch reference, zeros, NaN/Inf."""

import pytest
import torch

import oqcore
from oqcore.metrics import sqnr
from oq_plugin_int8.keys import kInt8DynamicTokenSym, kInt8StaticChannelSym
from oq_plugin_int8.quant import dequantize_int8, quantize_int8_rowwise

EPS = torch.finfo(torch.float32).eps


def vllm_int8_ref(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's int8 per-channel / per-token rule (DESIGN.md "Numbers"), independent of the plugin:
    float32 amax over the last dim, scale = amax / 127 (eps for zero rows),
    q = round_half_even(w / scale) clamped to +-127."""
    w = w.to(torch.float32)
    amax = w.abs().max(dim=-1, keepdim=True).values
    scale = amax / 127.0
    scale = torch.where(amax == 0, torch.tensor(EPS), scale)
    q = torch.clamp(torch.round(w / scale), min=-127, max=127).to(torch.int8)
    return q, scale


def _cases():
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    mixed = r(6, 48) * torch.logspace(-20, 20, 6).unsqueeze(1)
    mixed_in_row = r(4, 40) * torch.logspace(-12, 12, 40)
    with_zero_row = r(5, 33)
    with_zero_row[2] = 0
    return {
        "random": r(32, 64),
        "random_odd": r(7, 37),
        "zeros": torch.zeros(4, 16),
        "zero_row": with_zero_row,
        "tiny": r(8, 32) * 1e-30,
        "huge": r(8, 32) * 1e30,
        "near_fp32_max": r(3, 16).clamp(-1, 1) * 3.0e38,
        "mixed_rows": mixed,
        "mixed_in_row": mixed_in_row,
        "bf16": r(16, 48).to(torch.bfloat16),
        "bf16_huge": (r(4, 24) * 1e36).to(torch.bfloat16),
        "fp16": r(16, 48).to(torch.float16),
        "3d": r(3, 12, 40),
        "3d_bf16": r(4, 8, 24).to(torch.bfloat16),
        "activation_like": r(5, 64) * 10,
        "one_column": r(9, 1),
    }


CASES = _cases()


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_is_bit_exact_with_vllm_formula(case):
    w = CASES[case]
    q, s = quantize_int8_rowwise(w)
    q_ref, s_ref = vllm_int8_ref(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert s.shape == (*w.shape[:-1], 1)
    assert torch.equal(q, q_ref)
    assert torch.equal(s, s_ref)
    assert int(q.min()) >= -127  # symmetric grid: -128 never appears
    assert torch.isfinite(s).all() and (s > 0).all()


def test_rounding_is_half_to_even_and_clamped():
    # amax 127 -> scale exactly 1, so w / scale are exact ties.
    w = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -3.5]])
    q, s = quantize_int8_rowwise(w)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, 126, -4]]


def test_3d_is_per_expert():
    w = CASES["3d"].clone()
    w[1] *= 1000.0  # an expert with a much larger range must not change the others' scales
    q, s = quantize_int8_rowwise(w)
    assert s.shape == (3, 12, 1)
    for e in range(3):
        qe, se = quantize_int8_rowwise(w[e])
        assert torch.equal(q[e], qe) and torch.equal(s[e], se)


def test_zero_rows_give_eps_scale_and_exact_zeros():
    w = CASES["zero_row"]
    q, s = quantize_int8_rowwise(w)
    assert s[2].item() == EPS
    assert torch.equal(q[2], torch.zeros_like(q[2]))
    assert torch.equal(dequantize_int8(q, s, torch.float32)[2], torch.zeros(33))
    # a whole expert of zeros
    w3 = CASES["3d"].clone()
    w3[0] = 0
    q3, s3 = quantize_int8_rowwise(w3)
    assert (s3[0] == EPS).all() and (q3[0] == 0).all()
    assert torch.equal(dequantize_int8(q3, s3, torch.bfloat16)[0], torch.zeros(12, 40, dtype=torch.bfloat16))


def test_subnormal_row_stays_finite():
    # amax / 127 underflows to 0 for the smallest subnormals: the eps rule keeps it finite.
    w = torch.tensor([[1e-45, -1e-45, 0.0], [1e-40, 5e-41, -1e-40]])
    q, s = quantize_int8_rowwise(w)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert q[0].tolist() == [0, 0, 0]
    # subnormal but nonzero scale: the plain formula still applies (few mantissa bits left, so
    # 5e-41 lands on 63, not 64)
    assert torch.equal(q[1], vllm_int8_ref(w[1:])[0][0])
    assert q[1, 0] == 127 and q[1, 2] == -127 and 62 <= q[1, 1] <= 64


def test_dequantize_is_q_times_scale():
    w = CASES["random"]
    q, s = quantize_int8_rowwise(w)
    d = dequantize_int8(q, s, torch.float32)
    assert torch.equal(d, q.float() * s)
    assert dequantize_int8(q, s, torch.bfloat16).dtype == torch.bfloat16
    # error bound of round-to-nearest: half a step per element
    assert ((d - w).abs() <= s / 2 * (1 + 1e-6)).all()


def test_weight_sqnr_gaussian_at_least_38db():
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(3))
    qt = oqcore.quantize_tensor(w, "int8_per_channel_static")
    db = sqnr(w, qt.dequantize(torch.float32))
    assert db >= 38.0, db


def test_tensor_api_dispatches_to_plugin():
    w = CASES["3d"]
    qt = oqcore.quantize_tensor(w, "int8_per_channel_static")
    assert qt.key == kInt8StaticChannelSym
    q_ref, s_ref = vllm_int8_ref(w)
    assert torch.equal(qt.qdata, q_ref) and torch.equal(qt.scale, s_ref)
    x = CASES["activation_like"]
    qa = oqcore.quantize_tensor(x, "int8_per_token", role="activation")
    assert qa.key == kInt8DynamicTokenSym
    assert qa.scale.shape == (5, 1)
    assert torch.equal(qa.qdata, vllm_int8_ref(x)[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_in_weight_is_an_error_naming_the_tensor(bad):
    w = torch.randn(4, 8)
    w[1, 3] = bad
    with pytest.raises(oqcore.UnsupportedLayerError, match="my.weight"):
        oqcore.quantize_tensor(w, "int8_per_channel_static", name="my.weight")


# ---- Triton quantizer (TRITON_INTERPRET=1 from tests/conftest.py) ----------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_quantizer_bit_exact_with_reference(case):
    from oq_plugin_int8.kernels.quant import quantize_int8_rowwise_triton

    w = CASES[case]
    q, s = quantize_int8_rowwise_triton(w)
    q_ref, s_ref = quantize_int8_rowwise(w)
    assert torch.equal(q, q_ref)
    assert torch.equal(s, s_ref)


def test_triton_quantizer_ties_after_scaling():
    from oq_plugin_int8.kernels.quant import quantize_int8_rowwise_triton

    # scale 2 and scale 0.5: w / scale lands exactly on .5 ties (exact in fp32)
    ties = torch.tensor([0.5, 1.5, 2.5, 3.5, 63.5, 64.5, 125.5, 126.5])
    w = torch.stack([torch.cat([torch.tensor([254.0]), ties * 2, -ties * 2]), torch.cat([torch.tensor([63.5]), ties / 2, -ties / 2])])
    q, s = quantize_int8_rowwise_triton(w)
    q_ref, s_ref = quantize_int8_rowwise(w)
    assert s.flatten().tolist() == [2.0, 0.5]
    assert torch.equal(q, q_ref)
    assert q[0, 1:9].tolist() == [0, 2, 2, 4, 64, 64, 126, 126]  # half to even


def test_triton_quantizer_long_rows_and_random_ties():
    from oq_plugin_int8.kernels.quant import quantize_int8_rowwise_triton

    g = torch.Generator().manual_seed(5)
    # K > 8192 takes the two-loop path; values k/2 with amax 127 give ties everywhere
    w = torch.randint(-254, 255, (3, 8200), generator=g).float() / 2
    w[:, 0] = 127.0
    q, s = quantize_int8_rowwise_triton(w)
    q_ref, s_ref = quantize_int8_rowwise(w)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_triton_quantizer_registered_for_both_keys():
    reg = oqcore.get_registry()
    for key in (kInt8StaticChannelSym, kInt8DynamicTokenSym):
        assert (key, "torch") in reg.quantizers and (key, "triton") in reg.quantizers
    w = CASES["3d_bf16"]
    a = oqcore.quantize_tensor(w, "int8_per_channel_static", quantizer="triton")
    b = oqcore.quantize_tensor(w, "int8_per_channel_static", quantizer="torch")
    assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale)
