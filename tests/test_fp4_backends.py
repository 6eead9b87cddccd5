"""The forward backends of the 4-bit schemes, chosen through the plan (a ``backend`` pin), against
the core's ``torch`` reference on the same bytes, for every activation each scheme offers:
W4A16, W4A8 (mxfp8 activations), W4A4. ``triton`` runs under ``TRITON_INTERPRET=1`` (tests/conftest.py),
``cpu`` is the fused GEMM. float32 models: the backends compute the reference's products (e2m1 x
scale is exact in bf16 and float32) and differ only in float32 summation order and, for NVFP4, in
where the global scale's division rounds: ``max|y - y_ref| <= 2^-16 max|y_ref|``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import oqcore

PAIRS = [("mxfp4", None), ("mxfp4", "mxfp8"), ("mxfp4", "mxfp4"), ("nvfp4", None), ("nvfp4", "nvfp4")]
IDS = [f"{w}-{a or 'none'}" for w, a in PAIRS]
BOUND = 2.0**-16


def _close(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.shape == ref.shape and torch.isfinite(y).all()
    assert float((y - ref).abs().max()) <= BOUND * float(ref.abs().max())


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("weight, act", PAIRS, ids=IDS)
def test_linear_backend_matches_the_reference(weight, act, backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 45))
    x = torch.randn(3, 7, 96) * 2
    spec = {"weight": weight, "activation": act}
    ours, ref = copy.deepcopy(model), copy.deepcopy(model)
    oqcore.quantize_(ours, {"linear": spec, "backend": {"linear": backend}})
    oqcore.quantize_(ref, {"linear": spec, "backend": {"linear": "torch"}})
    assert ours[0].method.backend.name == backend
    with torch.no_grad():
        _close(ours(x), ref(x))


@pytest.mark.parametrize("backend", ["triton", "cpu"])
@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("weight, act", PAIRS, ids=IDS)
def test_experts_backend_matches_the_reference(tiny_moe, arch, weight, act, backend):
    """Experts of a tiny model (GPT-OSS: transposed, interleaved, biased), float32, a few tokens."""
    path = tiny_moe(arch, hidden_size=64, intermediate_size=32)
    spec = {"weight": weight, "activation": act}
    ours = oqcore.load(path, {"moe": spec, "backend": {"moe": backend}}, dtype=torch.float32)
    ref = oqcore.load(path, {"moe": spec, "backend": {"moe": "torch"}}, dtype=torch.float32)
    experts = [m for m in ours.modules() if type(m).__name__ == "QuantizedMoE"]
    assert experts and all(m.method.backend.name == backend for m in experts)
    ids = torch.randint(0, ours.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _close(ours(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_every_packed_e2m1_byte_reencodes_to_the_same_e4m3_values():
    """W4A4's CPU path hands mxfp4 activation codes to the GEMM as e4m3 bytes: exact for all 256 bytes
    (both nibbles, signed zeros included)."""
    from oq_plugin_mxfp4.fp4 import dequantize_codes, packed_to_e4m3

    packed = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    e4 = packed_to_e4m3(packed)
    assert e4.dtype == torch.float8_e4m3fn and e4.shape == (4, 128)
    want = dequantize_codes(packed)
    assert torch.equal(e4.float(), want) and torch.equal(torch.signbit(e4.float()), torch.signbit(want))
