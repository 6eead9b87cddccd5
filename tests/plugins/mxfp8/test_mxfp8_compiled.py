"""The compiled (torch.compile) CPU MXFP8 quantizer against the torch reference (itself bit-exact
with torchao ``to_mx``): identical element and e8m0 scale bytes in both scale modes, on blocks
whose amax sits just above 448 * 2**k (rceil's float32-log2 edge), fp8 rounding carries and ties,
zero, subnormal, huge and mixed-magnitude blocks, bf16 and float32, and a 3D expert stack.
All cases are packed into one ``[N, 160]`` matrix per dtype so only a few shapes compile."""

import pytest
import torch

import oqcore
from oq_plugin_mxfp8.quant import Mxfp8Options, quantize_mxfp8


@pytest.fixture(autouse=True)
def _compile_on(monkeypatch):
    monkeypatch.setenv("OQ_COMPILE", "1")


def adversarial(dtype: torch.dtype) -> torch.Tensor:
    """``[96, 160]``: every row is five 32-blocks."""
    g = torch.Generator().manual_seed(5)
    ks = torch.tensor([-140, -130, -127, -126, -120, -64, -5, 0, 4, 8, 64, 118], dtype=torch.float32)
    j = torch.arange(0, 20, dtype=torch.float32)
    amax = (torch.ldexp(torch.ones(()), ks)[:, None] * (1 + j[None, :] * 2**-23) * 448).flatten()  # 240 blocks
    edge = (torch.rand(amax.numel(), 32, generator=g) * 2 - 1) * amax[:, None]
    edge[:, 3] = -amax
    carry = torch.tensor(
        [448.0, 125.2, -125.2, 124.0, 123.9, 15.9, -15.99, 7.99, 0.0019531, 0.00195, -1e-3, 1e-12, -0.0, 0.0, 1.0625,
         1.1875, 0.017578125, 0.0185546875, 247.9, 248.0, 249.0, 447.9, 240.5, 3.0e-3, -2.9e-3, 0.01562, 0.015625,
         0.0146484375, 0.013671875, 0.0009765625, 0.00146484375, 0.5]
    )
    special = torch.stack([carry, carry * 2.0**-20, carry * 2.0**30, carry * 3.0, -carry * 0.7,
                           torch.zeros(32), torch.full((32,), -0.0), torch.randn(32, generator=g) * 1e-40,
                           torch.randn(32, generator=g) * 1e37, torch.randn(32, generator=g) * 1e-30 + torch.eye(32)[0] * 1e30])
    mixed = torch.randn(70, 32, generator=g) * torch.logspace(-30, 30, 70)[:, None]
    blocks = torch.cat([edge, special, mixed])  # 320 blocks
    blocks = torch.cat([blocks, torch.randn(480 - blocks.shape[0], 32, generator=g)])
    return blocks.reshape(96, 160).to(dtype)


def check(x: torch.Tensor, mode: str) -> None:
    opts = Mxfp8Options(scale_mode=mode)
    q_ref, s_ref = quantize_mxfp8(x, opts)
    qt = oqcore.quantize_tensor(x, "mxfp8", quantizer="compiled", options=opts)
    assert qt.qdata.dtype == torch.float8_e4m3fn and qt.scale.dtype == torch.float8_e8m0fnu
    assert qt.qdata.shape == x.shape and qt.scale.shape == s_ref.shape
    assert torch.equal(qt.scale.view(torch.uint8), s_ref.view(torch.uint8)), "scale bytes differ"
    qb, rb = qt.qdata.view(torch.uint8), q_ref.view(torch.uint8)
    assert torch.equal(qb, rb), f"{int((qb != rb).sum())} element bytes differ, e.g. x={x[qb != rb][:4].tolist()}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", ["rceil", "floor"])
def test_compiled_bit_exact(mode, dtype):
    check(adversarial(dtype), mode)


def test_compiled_3d_expert_stack_and_activation_key():
    w = adversarial(torch.bfloat16).reshape(3, 32, 160)
    w[1] = 0.0
    check(w, "rceil")
    q = oqcore.quantize_tensor(w[0], "mxfp8", quantizer="compiled", role="activation")
    r = quantize_mxfp8(w[0])
    assert torch.equal(q.qdata.view(torch.uint8), r[0].view(torch.uint8))


def test_compiled_k_not_multiple_of_32_and_eager_fallback(monkeypatch):
    from oq_plugin_mxfp8.compiled import _state, quantize_mxfp8_compiled

    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_mxfp8_compiled(torch.randn(4, 48))
    check(adversarial(torch.bfloat16), "rceil")  # compiled already if the tests above ran
    assert _state["fn"].failed is None and _state["fn"].first_call_seconds
    monkeypatch.setenv("OQ_COMPILE", "0")  # same graph function run eagerly: same bytes
    check(adversarial(torch.float32)[:, :64], "floor")
