"""Triton quantizer kernels (run by Triton's interpreter on the CPU) are byte-identical to the
torch reference, including roundings that carry into the next exponent."""

from __future__ import annotations

import pytest
import torch

import oqcore
from oq_toolkit.triton_support import interpreter_enabled

from fp8_testutil import cases, gaussian, same_bytes
from oq_plugin_fp8 import quant as Q

pytestmark = pytest.mark.skipif(not interpreter_enabled(), reason="needs TRITON_INTERPRET=1 (tests/conftest.py)")

GROUPINGS = {
    "tensor": Q.PER_TENSOR,
    "channel": Q.PER_CHANNEL,
    "block": Q.BLOCK_128x128,
    "group": Q.GROUP_1x128,
}
SMALL_CASES = ["random_200x300", "zeros_100x70", "tiny_1e-40", "tiny_1e-6", "underflow_1e-44", "huge_1e30",
               "mixed", "zero_row_and_block", "neg_zero", "single_1x1"]


def _kernel():
    from oq_plugin_fp8.kernels import quantize

    return quantize


@pytest.mark.parametrize("case", SMALL_CASES)
@pytest.mark.parametrize("grouping", sorted(GROUPINGS))
def test_triton_quantizer_bit_exact(grouping, case):
    w = cases()[case]
    g = GROUPINGS[grouping]
    q_ref, s_ref = Q.quantize_grouped(w, g)
    q, s = _kernel().quantize_grouped(w, g)
    assert same_bytes(q, q_ref), f"{(q.view(torch.uint8) != q_ref.view(torch.uint8)).sum()} bytes differ"
    assert torch.equal(s, s_ref)


@pytest.mark.parametrize("grouping", sorted(GROUPINGS))
def test_triton_quantizer_expert_stack_and_bf16(grouping):
    g = GROUPINGS[grouping]
    w = (gaussian(3, 130, 257) * torch.tensor([1e-4, 1.0, 1e4])[:, None, None]).to(torch.bfloat16)
    w[1, :, :100] = 0
    q_ref, s_ref = Q.quantize_grouped(w, g)
    q, s = _kernel().quantize_grouped(w, g)
    assert same_bytes(q, q_ref) and torch.equal(s, s_ref)


def _carry_values() -> torch.Tensor:
    """With amax 448 the scale is exactly 1, so these are the scaled values the cast sees: every
    float32 the grid spans (all ties, both sides of every fp8 value, every exponent boundary)
    plus the interpreter's known failure 125.2 -> 128 (it gives 64)."""
    fp8_vals = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mids = (fp8_vals[1:] + fp8_vals[:-1]) / 2  # exact ties
    near = torch.cat([mids, torch.nextafter(mids, torch.zeros_like(mids)), torch.nextafter(mids, torch.full_like(mids, 1e9))])
    extra = torch.tensor([125.2, 124.0, 120.0, 15.6, 7.9, 0.0019, 0.00097, 0.0029, 2.0**-10, 2.0**-10 * 1.0001, 1e-30])
    v = torch.cat([fp8_vals, near, extra, torch.linspace(0, 448, 4097)])
    v = torch.cat([v, -v])
    v[0] = 448.0  # pins amax, hence scale = 1
    return v


@pytest.mark.parametrize("grouping", ["tensor", "channel", "block", "group"])
def test_triton_quantizer_exponent_carry(grouping):
    v = _carry_values()
    n = v.numel() // 64 * 64
    w = v[:n].reshape(-1, 64)
    w[:, 0] = 448.0  # every row, block and group has amax 448: scale 1
    g = GROUPINGS[grouping]
    q_ref, s_ref = Q.quantize_grouped(w, g)
    assert torch.all(s_ref == 1.0)
    assert (q_ref.float() == 128).any(), "the reference must round some input up to 128 (the carry case)"
    q, s = _kernel().quantize_grouped(w, g)
    assert same_bytes(q, q_ref), f"{(q.view(torch.uint8) != q_ref.view(torch.uint8)).sum()} bytes differ"
    assert torch.equal(s, s_ref)
    # 125.2 is in the input and maps to 128 in both
    i = (w == torch.tensor(125.2)).nonzero()[0]
    assert q[i[0], i[1]].float() == 128.0 and q_ref[i[0], i[1]].float() == 128.0


@pytest.mark.parametrize("name", ["fp8_per_tensor_static", "fp8_per_channel_static", "fp8_per_block_static",
                                  "fp8_per_token", "fp8_per_block_dynamic", "fp8_per_tensor_dynamic"])
def test_registered_triton_quantizer(name):
    """The ``triton`` quantizers registered with the core give the reference's bytes."""
    role = "weight" if name.endswith("static") else "activation"
    w = gaussian(150, 260) * 3
    a = oqcore.tensor.quantize_tensor(w, name, role=role)
    b = oqcore.tensor.quantize_tensor(w, name, quantizer="triton", role=role)
    assert same_bytes(a.qdata, b.qdata) and torch.equal(a.scale, b.scale)
    assert torch.equal(a.dequantize(torch.float32), b.dequantize(torch.float32))
