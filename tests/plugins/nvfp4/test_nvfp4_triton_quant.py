"""The Triton NVFP4 quantizer (under TRITON_INTERPRET=1) against the torch reference
:func:`oq_plugin_nvfp4.quant.quantize_nvfp4` (compressed-tensors 0.20.1's bytes): same packed element
bytes, e4m3 block-scale bytes and global scales on random float32 / bf16 / fp16 tensors, expert
stacks (one global scale each, an all-zero expert), signed zeros, blocks whose scale underflows
e4m3 (-> 0.125), e4m3 rounding ties and subnormal scales, e2m1 decision points, and a given global
scale (fused layers)."""

import pytest
import torch

kq = pytest.importorskip("oq_plugin_nvfp4.kernels.quant")

from oq_plugin_nvfp4.quant import global_scale_from_amax, quantize_nvfp4


def mixed_ranges() -> torch.Tensor:
    """Rows whose 16-blocks span 2**-40 .. 2**10 of the row maximum: block scales from 448 down
    through e4m3 subnormals to values that round to 0 (-> 0.125), and the amax block itself."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 256, generator=g)
    x *= torch.exp2(torch.linspace(-40, 10, 16)).repeat_interleave(16)[None, :]
    return x


def scale_ties() -> torch.Tensor:
    """Blocks whose ``g * amax / 6`` lands on e4m3 rounding ties and their float32 neighbours:
    one block of amax 2688 fixes g = 1, the others have amax ``6 * v`` for v on e4m3 midpoints."""
    mids = torch.tensor(
        [1.0625, 1.1875, 3.25, 0.017578125, 0.0185546875, 2**-10, 3 * 2**-10, 240.0 + 8, 9.5, 0.0029296875]
    )
    bits = mids.view(torch.int32)
    v = torch.cat([(bits + d).view(torch.float32) for d in (-1, 0, 1)])
    rows = torch.zeros(v.numel() + 1, 16)
    rows[:-1, 0] = 6 * v
    rows[:-1, 1:] = (6 * v)[:, None] * torch.linspace(-0.9, 0.9, 15)[None, :]
    rows[-1, 0] = 2688.0
    return rows


def e2m1_points() -> torch.Tensor:
    """Blocks of amax 6 (block scale 1 when g * 1 is exact) holding every e2m1 decision point and
    grid value with float32 neighbours, and signed zeros; global scale from amax 2688 (g = 1)."""
    pts = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
    near = torch.cat([(pts.view(torch.int32) + d).view(torch.float32) for d in (-1, 0, 1)])
    vals = torch.cat([near, -near, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 6.0])])
    vals = torch.cat([vals, torch.zeros(96 - vals.numel())]).reshape(6, 16)
    vals[:, 15] = 6.0
    vals[0, 14] = 2688.0  # g = 1: block 0's scale is 448, every other block's exactly 1
    return vals


def e2m1_thresholds_any_g() -> torch.Tensor:
    """Elements on the e2m1 decision points of their own block *after* the global and block scale
    (``x = fl(th * t)`` and float32 neighbours, ``t = fl(s / g)`` computed as the reference does) for
    a global scale that is not a power of two: rounding ``t`` or ``x / t`` any other way (a
    reciprocal, an approximate division) moves some of them across a threshold."""
    g = torch.Generator().manual_seed(6)
    ths = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    gmax = torch.tensor(1000.0)
    gs = global_scale_from_amax(gmax.reshape(1))
    amax = torch.rand(256, generator=g) * 900 + 1
    s8 = (gs * (amax / 6)).clamp(max=448).to(torch.float8_e4m3fn).float()
    t = s8 / gs
    x = torch.zeros(256, 32)
    x[:, 0] = amax
    for i, d in enumerate((-1, 0, 1)):
        v = ((ths[None, :] * t[:, None]).view(torch.int32) + d).view(torch.float32)
        x[:, 1 + 7 * i : 8 + 7 * i] = v * torch.where(torch.rand(256, 7, generator=g) < 0.5, -1.0, 1.0)
    x[:, 16] = amax  # the second 16-block has the same amax, hence the same t
    x[:, 17:] = x[:, 1:16]
    x[0, 0] = gmax
    assert (x[:, 1:16].abs() <= x[:, :1]).all()
    return x


def cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    neg_zero = torch.randn(16, 64, generator=g)
    neg_zero[torch.rand(16, 64, generator=g) < 0.3] = -0.0
    neg_zero[3] = -0.0
    stack = torch.randn(4, 24, 96, generator=g) * torch.tensor([1e-3, 1.0, 1e3, 0.0])[:, None, None]
    stack[1, ::2] = -0.0
    return {
        "random": torch.randn(40, 160, generator=g),
        "vector": torch.randn(48, generator=g),
        "random_bf16": torch.randn(17, 64, generator=g).bfloat16(),
        "random_fp16": (torch.randn(33, 96, generator=g) * 100).half(),
        "zeros": torch.zeros(17, 64),
        "neg_zero": neg_zero,
        "subnormal": torch.randn(16, 64, generator=g) * 1e-40,
        "huge": torch.randn(16, 64, generator=g) * 1e37,
        "mixed_ranges": mixed_ranges(),
        "scale_ties": scale_ties(),
        "e2m1_points": e2m1_points(),
        "e2m1_thresholds_any_g": e2m1_thresholds_any_g(),
        "stack": stack,
        "stack_bf16": (torch.randn(3, 20, 48, generator=g) * 10).bfloat16(),
    }


def assert_same(got, ref, what):
    (q, s, g), (rq, rs, rg) = got, ref
    assert q.dtype == torch.uint8 and s.dtype == torch.float8_e4m3fn and g.dtype == torch.float32
    assert q.shape == rq.shape and s.shape == rs.shape and g.shape == rg.shape
    assert torch.equal(g, rg), f"{what}: global scales differ"
    s8, r8 = s.view(torch.uint8), rs.view(torch.uint8)
    assert torch.equal(s8, r8), f"{what}: scale bytes differ at {(s8 != r8).nonzero()[:5].tolist()}"
    assert torch.equal(q, rq), f"{what}: element bytes differ at {(q != rq).nonzero()[:5].tolist()}"


@pytest.mark.parametrize("case", list(cases()))
def test_triton_quantizer_bit_exact(case):
    x = cases()[case]
    assert_same(kq.quantize_nvfp4_triton(x), quantize_nvfp4(x), case)


def test_given_global_scale():
    """Fused layers share one global scale (the largest amax's): the bytes follow it, per tensor
    and per expert."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(24, 64, generator=g)
    gs = global_scale_from_amax(torch.tensor([w.abs().max() * 3]))
    assert_same(kq.quantize_nvfp4_triton(w, global_scale=gs), quantize_nvfp4(w, global_scale=gs), "given [1]")
    ws = torch.randn(3, 16, 32, generator=g)
    gs = global_scale_from_amax(torch.tensor([[1.0], [50.0], [1e-3]]))
    assert_same(kq.quantize_nvfp4_triton(ws, global_scale=gs), quantize_nvfp4(ws, global_scale=gs), "given [E, 1]")


def test_errors_and_empty():
    with pytest.raises(ValueError, match="divisible by 16"):
        kq.quantize_nvfp4_triton(torch.randn(2, 40))
    with pytest.raises(ValueError, match=r"must be float32 of shape \[1\]"):
        kq.quantize_nvfp4_triton(torch.randn(2, 32), global_scale=torch.ones(2))
    q, s, g = kq.quantize_nvfp4_triton(torch.zeros(0, 32))
    assert q.shape == (0, 16) and s.shape == (0, 2) and torch.equal(g, torch.ones(1))
