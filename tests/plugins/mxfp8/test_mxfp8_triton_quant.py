"""The one-pass Triton MXFP8 quantizer (under TRITON_INTERPRET=1) against the torch reference:
same element and scale bytes in both scale modes, including values whose fp8 rounding carries
into the next exponent (the interpreter's own float->fp8 cast gets those wrong)."""

import pytest
import torch

import oqcore
from oq_plugin_mxfp8.quant import Mxfp8Options, quantize_mxfp8

kq = pytest.importorskip("oq_plugin_mxfp8.kernels.quant")


def edge_rows() -> torch.Tensor:
    """Blocks whose amax is ``448 * 2**k * (1 + j * 2**-23)`` for a spread of k (normal, subnormal
    descales, huge) and j in [0, 24): the rceil exponent's float32-log2 edge."""
    g = torch.Generator().manual_seed(1)
    ks = torch.tensor([-140, -130, -127, -126, -120, -66, -64, -10, -5, -4, 0, 4, 5, 7, 8, 63, 64, 100, 118], dtype=torch.float32)
    j = torch.arange(0, 24, dtype=torch.float32)
    amax = (torch.ldexp(torch.ones(()), ks)[:, None] * (1 + j[None, :] * 2**-23) * 448).flatten()
    x = (torch.rand(amax.numel(), 32, generator=g) * 2 - 1) * amax[:, None]
    x[:, 3] = -amax
    return x


def carry_rows() -> torch.Tensor:
    """Blocks with amax 448 (scale byte 127 under both rules) whose elements round across an fp8
    exponent boundary (125.2 -> 128, 15.9 -> 16, 247.9 -> 248 -> 256 ties, 0.00195 on the subnormal
    grid 2**-9), ties to even, negative zero; then the same scaled by 2**-20, 2**30, 3 and -0.7."""
    vals = [448.0, 125.2, -125.2, 124.0, 123.9, 15.9, -15.99, 7.99, 0.0019531, 0.00195, -1e-3, 1e-12, -0.0, 0.0,
            1.0625, 1.1875, 0.017578125, 0.0185546875, 247.9, 248.0, 249.0, 447.9, 240.5, 3.0e-3, -2.9e-3,
            0.01562, 0.015625, 0.0146484375, 0.013671875, 0.0009765625, 0.00146484375, 0.5]
    x = torch.tensor(vals, dtype=torch.float32).reshape(1, 32)
    return torch.cat([x, x * 2.0**-20, x * 2.0**30, x * 3.0, -x * 0.7])


def cases():
    g = torch.Generator().manual_seed(0)
    mixed = torch.randn(64, 128, generator=g) * torch.logspace(-38, 38, 64)[:, None]
    mixed[5] = 0.0
    return {
        "random": torch.randn(96, 160, generator=g),
        "random_bf16": torch.randn(3, 40, 64, generator=g).bfloat16(),
        "random_fp16": torch.randn(33, 64, generator=g).half(),
        "zeros": torch.zeros(17, 64),
        "subnormal": torch.randn(16, 64, generator=g) * 1e-40,
        "huge": torch.randn(16, 64, generator=g) * 1e37,
        "mixed": mixed,
        "edge": edge_rows(),
        "carry": carry_rows(),
        "nan_inf": torch.tensor([float("nan")] + [1.0] * 31 + [float("inf")] + [2.0] * 31 + [-float("inf")] + [0.0] * 31).reshape(1, 96),
    }


@pytest.mark.parametrize("mode", ["rceil", "floor"])
@pytest.mark.parametrize("case", list(cases()))
def test_triton_quantizer_bit_exact(case, mode):
    x = cases()[case]
    opts = Mxfp8Options(scale_mode=mode)
    q_ref, s_ref = quantize_mxfp8(x, opts)
    q, s = kq.quantize_mxfp8_triton(x, opts)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
    assert q.shape == x.shape and s.shape == s_ref.shape
    qb, qrb = q.view(torch.uint8), q_ref.view(torch.uint8)
    assert torch.equal(s.view(torch.uint8), s_ref.view(torch.uint8))
    assert torch.equal(qb, qrb), f"{int((qb != qrb).sum())} element bytes differ, e.g. x={x[qb != qrb][:4].tolist()}"


def test_carry_values_really_cross_an_exponent():
    q, _ = kq.quantize_mxfp8_triton(carry_rows()[:1], Mxfp8Options())
    got = q.float()[0, :3].tolist()
    assert got == [448.0, 128.0, -128.0]


def test_triton_quantizer_through_the_registry_3d():
    w = torch.randn(4, 32, 64)
    w[2] = 0.0
    a = oqcore.quantize_tensor(w, "mxfp8", quantizer="triton", options={"scale_mode": "floor"})
    b = oqcore.quantize_tensor(w, "mxfp8", quantizer="torch", options={"scale_mode": "floor"})
    assert torch.equal(a.qdata.view(torch.uint8), b.qdata.view(torch.uint8))
    assert torch.equal(a.scale.view(torch.uint8), b.scale.view(torch.uint8))
    assert torch.equal(a.dequantize(torch.float32)[2], torch.zeros(32, 64))
