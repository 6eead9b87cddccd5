"""The one-pass Triton MXFP4 quantizer (under TRITON_INTERPRET=1) against the torch reference
:func:`oq_plugin_mxfp4.quant.quantize_mxfp4` (itself torchao ``to_mx``'s bytes): same packed element
bytes and scale bytes in both scale modes, on random, bf16 / fp16, signed-zero, subnormal, huge and
mixed-range tensors, blocks whose amax sits where the rceil exponent's float32 log2 rounds, every
e2m1 tie point and its float32 neighbours, expert stacks, and NaN / Inf (the activation path)."""

import pytest
import torch

kq = pytest.importorskip("oq_plugin_mxfp4.kernels.quant")

# NaN / Inf inputs: numpy, under Triton's interpreter, warns about the invalid products it computes
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

from oq_plugin_mxfp4.quant import Mxfp4Options, quantize_mxfp4


def edge_amax() -> torch.Tensor:
    """One 32-block per row with amax ``6 * 2**k * (1 + j * 2**-23)`` (k a spread of normal,
    subnormal-descale and huge exponents, j in [0, 24): where float32 log2 rounds), plus amax
    ``2**k * m`` in floor's saturating window (m in 1.5 .. 1.99)."""
    g = torch.Generator().manual_seed(1)
    ks = torch.tensor(
        [-140, -130, -127, -126, -125, -120, -66, -64, -10, -5, -4, -2, 0, 4, 5, 7, 8, 63, 64, 100, 118, 119.0]
    )
    j = torch.arange(0, 24, dtype=torch.float32)
    amax = (torch.ldexp(torch.ones(()), ks)[:, None] * (1 + j[None, :] * 2**-23) * 6).flatten()
    m = torch.tensor([1.5, 1.75, 1.99])
    amax = torch.cat([amax, (torch.ldexp(torch.ones(()), torch.arange(-126, 120, 19).float())[:, None] * m).flatten()])
    x = (torch.rand(amax.numel(), 32, generator=g) * 2 - 1) * amax[:, None]
    x[:, 7] = amax
    x[::2, 7] *= -1
    return x


def ties() -> torch.Tensor:
    """Blocks of amax 6 * 2**k holding every e2m1 decision point (0.25, 0.75, ..., 5) and grid value
    times 2**k with their float32 neighbours, signed zeros, tiny values."""
    pts = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
    near = torch.cat([(pts.view(torch.int32) + d).view(torch.float32) for d in (-1, 0, 1)])
    vals = torch.cat([near, -near, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 6.0, -6.0])])
    vals = torch.cat([vals, torch.zeros(96 - vals.numel())]).reshape(3, 32)
    vals[:, 31] = 6.0
    k = torch.tensor([-100.0, -3.0, 0.0, 5.0, 100.0])
    return (vals[None] * torch.ldexp(torch.ones(()), k)[:, None, None]).reshape(-1, 32)


def non_finite() -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 64, generator=g)
    x[0, 3] = float("nan")
    x[1, 40] = float("inf")
    x[2, 0] = -float("inf")
    x[3, 5] = -float("nan")
    payloads = torch.tensor([0x7F800001, 0x7FA00000, 0x7FE00000, 0x7FFFFFFF, 0xFFC00001 - 2**32], dtype=torch.int32)
    x[4:8, 8:13] = payloads.view(torch.float32)
    return x


def cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mixed = torch.randn(48, 128, generator=g) * torch.logspace(-35, 35, 48)[:, None]
    mixed[::3, :32] = 0.0
    neg_zero = torch.randn(16, 64, generator=g)
    neg_zero[torch.rand(16, 64, generator=g) < 0.3] = -0.0
    neg_zero[3] = -0.0
    return {
        "random": torch.randn(40, 160, generator=g),
        "random_bf16": torch.randn(3, 17, 64, generator=g).bfloat16(),
        "random_fp16": (torch.randn(33, 96, generator=g) * 1000).half(),
        "zeros": torch.zeros(17, 64),
        "neg_zero": neg_zero,
        "subnormal": torch.randn(16, 64, generator=g) * 1e-40,
        "huge": torch.randn(16, 64, generator=g) * 1e37,
        "mixed": mixed,
        "edge_amax": edge_amax(),
        "ties": ties(),
        "stack": torch.randn(4, 24, 96, generator=g) * torch.tensor([1e-3, 1.0, 1e3, 0.0])[:, None, None],
        "non_finite": non_finite(),
    }


@pytest.mark.parametrize("mode", ["rceil", "floor"])
@pytest.mark.parametrize("case", list(cases()))
def test_triton_quantizer_bit_exact(case, mode):
    x = cases()[case]
    opts = Mxfp4Options(scale_mode=mode)
    q_ref, s_ref = quantize_mxfp4(x, opts)
    q, s = kq.quantize_mxfp4_triton(x, opts)
    assert q.dtype == torch.uint8 and s.dtype == torch.float8_e8m0fnu
    assert q.shape == q_ref.shape and s.shape == s_ref.shape
    s8, r8 = s.view(torch.uint8), s_ref.view(torch.uint8)
    assert torch.equal(s8, r8), f"{case}: scale bytes differ at {(s8 != r8).nonzero()[:5].tolist()}"
    assert torch.equal(q, q_ref), f"{case}: element bytes differ at {(q != q_ref).nonzero()[:5].tolist()}"


def test_default_options_and_errors():
    x = torch.randn(5, 64)
    q, s = kq.quantize_mxfp4_triton(x)
    q_ref, s_ref = quantize_mxfp4(x)
    assert torch.equal(q, q_ref) and torch.equal(s.view(torch.uint8), s_ref.view(torch.uint8))
    with pytest.raises(ValueError, match="divisible by 32"):
        kq.quantize_mxfp4_triton(torch.randn(2, 48))
    q, s = kq.quantize_mxfp4_triton(torch.zeros(0, 64))
    assert q.shape == (0, 32) and s.shape == (0, 2)
