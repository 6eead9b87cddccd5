"""The nvfp4 ``cpu`` quantizer (C kernel of :mod:`oq_plugin_nvfp4.cpu`): the same bytes as the torch
reference :func:`oq_plugin_nvfp4.quant.quantize_nvfp4` (packed e2m1, e4m3 block scales, float32
global scales), bf16/fp16/float32, [N, K] / [E, N, K] / [K], both the AVX-512 and the generic
build, NaN/Inf handling."""

from __future__ import annotations

import ctypes

import pytest
import torch

import oqcore
from oq_plugin_nvfp4 import cpu
from oq_plugin_nvfp4.quant import quantize_nvfp4

lib = cpu.load_library()
pytestmark = pytest.mark.skipif(lib is None, reason=f"C kernel unavailable: {cpu.kernel_status()[1]}")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _cases(dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mixed = torch.randn(64, 256, generator=g) * torch.logspace(-30, 30, 64)[:, None]
    mixed[::3, :32] = 0.0
    neg_zero = torch.randn(40, 96, generator=g)
    neg_zero[torch.rand(40, 96, generator=g) < 0.3] = -0.0
    neg_zero[5] = -0.0
    big = torch.finfo(dtype).max
    huge = torch.randn(32, 128, generator=g).clamp(-1, 1) * big
    huge[0, 0] = big
    ties = torch.cat([torch.full((7, 1), 6.0), (torch.arange(-52, 53, dtype=torch.float32) / 8).reshape(7, 15)], 1)
    out = {
        "random": torch.randn(130, 224, generator=g),
        "zeros": torch.zeros(32, 128),
        "zero_blocks": torch.cat([torch.zeros(16, 32), torch.randn(16, 32, generator=g)], 1),
        "neg_zero": neg_zero,
        "subnormal": torch.randn(32, 128, generator=g) * 1e-40,
        "dtype_subnormal": torch.randn(32, 128, generator=g) * torch.finfo(dtype).smallest_normal,
        "tiny": torch.randn(32, 128, generator=g) * 1e-30,
        "huge": huge,
        "mixed": mixed,
        "wide": torch.randn(64, 256, generator=g) * torch.logspace(-8, 3, 256),
        "ties": ties,
        "one_block": torch.randn(1, 16, generator=g),
        "vector": torch.randn(48, generator=g),
        # expert stacks: 5 experts whose 24*5 = 120 blocks leave groups of 16 straddling two experts
        "experts": torch.randn(5, 24, 80, generator=g) * torch.tensor([1.0, 1e-3, 0.0, 50.0, 1e-20]).reshape(5, 1, 1),
        "experts_big": torch.randn(3, 64, 512, generator=g),
    }
    return {k: v.to(dtype) for k, v in out.items()}


def _assert_same(w, lib=lib, global_scale=None):
    q, s, g = cpu.quantize_nvfp4(w, lib=lib, global_scale=global_scale)
    rq, rs, rg = quantize_nvfp4(w, global_scale=global_scale)
    assert (q.dtype, s.dtype, g.dtype) == (rq.dtype, rs.dtype, rg.dtype)
    assert q.shape == rq.shape and s.shape == rs.shape and g.shape == rg.shape
    assert torch.equal(g, rg)
    assert torch.equal(s.view(torch.uint8), rs.view(torch.uint8))
    assert torch.equal(q, rq)


def _check_all(dtype, lib=lib, label=""):
    for name, w in _cases(dtype).items():
        try:
            _assert_same(w, lib=lib)
            gs = torch.full((w.shape[0], 1) if w.dim() == 3 else (1,), 448.0)
            _assert_same(w, lib=lib, global_scale=gs)  # override (fused layers); the ties land exactly
        except AssertionError as err:
            raise AssertionError(f"{label}{name} {dtype}") from err


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bytes_equal_reference(dtype):
    _check_all(dtype)


def test_many_global_scales_and_block_edges():
    """Random float32 bit patterns as block maxima (every binade of the global and block scales, e4m3
    subnormal and zero scales) and random global-scale overrides, including negative ones."""
    g = torch.Generator().manual_seed(1)
    amax = torch.randint(0x00000001, 0x7F7FFFFF, (2048,), dtype=torch.int32, generator=g).view(torch.float32)
    x = (torch.rand(2048, 16, generator=g) * 2 - 1) * amax[:, None]
    x[:, 3] = amax
    w = x.reshape(64, 512)
    _assert_same(w)
    for gs in (torch.tensor([1e-30]), torch.tensor([3.5e38]), torch.tensor([-2.0]), torch.tensor([7.25])):
        _assert_same(w, global_scale=gs)
    w3 = x.reshape(16, 16, 128)
    _assert_same(w3, global_scale=torch.logspace(-20, 20, 16).reshape(16, 1))


def _all_bf16_up_to(max_bits: list[int]) -> torch.Tensor:
    """bf16 [N, 256]: for each m in max_bits, blocks whose element 0 is the bf16 with bits m (the
    block maximum, so every such block has the same divisor t) and whose other 15 elements run
    through EVERY bf16 bit pattern of magnitude <= m, both signs (+-0 included); zero-padded to
    whole 256-element groups."""
    rows = []
    for m in max_bits:
        mags = torch.arange(0, m + 1, dtype=torch.int32)
        bits = torch.cat([mags, mags | 0x8000]).to(torch.int16)
        vals = bits.view(torch.bfloat16)
        pad = (-vals.numel()) % 15
        vals = torch.cat([vals, torch.zeros(pad, dtype=torch.bfloat16)]).reshape(-1, 15)
        head = torch.tensor([m], dtype=torch.int16).view(torch.bfloat16).expand(vals.shape[0], 1)
        rows.append(torch.cat([head, vals], 1))
    blocks = torch.cat(rows)
    pad = (-blocks.shape[0]) % 16
    blocks = torch.cat([blocks, torch.zeros(pad, 16, dtype=torch.bfloat16)])
    return blocks.reshape(-1, 256)


def test_bf16_boundary_path_every_element_for_many_divisors():
    """bf16 codes by per-block bounds instead of divisions (nv_codes_bf16_bounds): for block maxima
    across the whole bf16 range (so divisors from e4m3-subnormal block scales to ~2**125, and
    quotients that underflow to zero) and several global scales, every bf16 element of magnitude
    up to the block maximum gets the reference's code: all decision-point ties, their float32
    neighbours and the +-0 / underflow cases."""
    g = torch.Generator().manual_seed(3)
    maxima = [0x3F80, 0x3FC0, 0x4040, 0x0001, 0x0080, 0x7F7F, 0x3C00, 0x4D00]
    maxima += torch.randint(0x0002, 0x7F7F, (12,), generator=g).tolist()
    w = _all_bf16_up_to(maxima)
    _assert_same(w)
    for gs in (1.0, 448.0 / 3, 2.0**-100, 6.1e-5, 3.0e37, 0.7291):
        _assert_same(w, global_scale=torch.tensor([gs], dtype=torch.float32))


# the exact real x / t bounds of the e2m1 decisions (fl(x / t) != 0, > 0.25, >= 0.75, ...: see
# nvfp4_quant.c NV_BOUNDS)
_BOUNDS = [
    2.0**-150,
    0.25 + 2.0**-26,
    0.75 - 2.0**-25,
    1.25 + 2.0**-24,
    1.75 - 2.0**-24,
    2.5 + 2.0**-23,
    3.5 - 2.0**-23,
    5.0 + 2.0**-22,
]


def test_bf16_boundary_path_quotients_within_ulps_of_every_bound():
    """Divisors chosen so that x / t lands within a few float32 ulps of each decision's bound
    (the cases where rounding the quotient, or the bound's rounding to bf16, decides the code):
    for a bf16 x and a bound b, the global scale g ~ S b / x (S an e4m3 block scale; the block
    maximum ~ 6 x / b keeps the block scale near S) swept over +-6 float32 ulps moves t = fl(S / g)
    across x / b. One expert per (x, bound, step), so each has its own global scale."""
    g = torch.Generator().manual_seed(5)
    blocks, scales = [], []
    for k, b in enumerate(_BOUNDS):
        n = 120
        if k == 0:  # x / t ~ 2**-150: tiny x, huge t
            xb = torch.randint(0x0001, 0x1A00, (n,), generator=g)
        else:
            xb = torch.randint(0x0800, 0x7E00, (n,), generator=g)
        x = xb.to(torch.int16).view(torch.bfloat16).double()
        s8 = torch.randint(0x08, 0x7E, (n,), generator=g).to(torch.uint8).view(torch.float8_e4m3fn).double()
        gstar = (s8 * b / x).float()
        amax = (6.0 * x / b).to(torch.bfloat16)
        ok = torch.isfinite(gstar) & (gstar > 0) & torch.isfinite(amax.float()) & (amax.float() >= x)
        for i in torch.nonzero(ok).flatten().tolist():
            xv = x[i].to(torch.bfloat16)
            nb = torch.tensor([-1, 1, 2, -2], dtype=torch.int16)
            near = (xv.view(torch.int16) + nb).view(torch.bfloat16)  # bf16 neighbours of x
            row = torch.cat(
                [amax[i : i + 1], xv.reshape(1), -xv.reshape(1), near, -near, torch.zeros(5, dtype=torch.bfloat16)]
            )
            gbits = gstar[i : i + 1].view(torch.int32)
            for step in range(-6, 7):
                blocks.append(row)
                scales.append((gbits + step).view(torch.float32))
    w = torch.stack(blocks).reshape(-1, 1, 16)
    gs = torch.cat(scales).reshape(-1, 1)
    assert w.shape[0] > 8000
    _assert_same(w, global_scale=gs)
    # the same with a divisor >= 2**100 in every group of 16 blocks (block max 2**120 and global
    # scale 2**-100: scale 448, t = 448 * 2**100), which moves every group to the bounds' double
    # precision form (the float32 form needs every t in [2**-100, 2**100))
    big = torch.zeros(1, 1, 16, dtype=torch.bfloat16)
    big[0, 0, 0] = 2.0**120
    parts_w, parts_g = [], []
    for i in range(0, w.shape[0], 15):
        parts_w += [big, w[i : i + 15]]
        parts_g += [torch.tensor([[2.0**-100]]), gs[i : i + 15]]
    _assert_same(torch.cat(parts_w), global_scale=torch.cat(parts_g))


def test_bf16_odd_global_scales_take_the_division_path():
    """bf16 with global scales that make a divisor zero, negative, infinite or subnormal (the bounds
    need 0 < t < inf): the same bytes as the reference."""
    g = torch.Generator().manual_seed(4)
    amax = torch.randint(0x0001, 0x7F7F, (1024,), dtype=torch.int16, generator=g).view(torch.bfloat16).float()
    x = (torch.rand(1024, 16, generator=g) * 2 - 1) * amax[:, None]
    x[:, 5] = amax
    w = x.reshape(32, 512).to(torch.bfloat16)
    # (not 3.5e38: a divisor that underflows to 0 makes 0 / 0 = NaN, whose code differs between the
    # kernel's encoder and the reference's before and after the bounds path: a separate, older case)
    for gs in (1e-30, 1e30, -2.0, -1e-3, 0.0, 1e-45):
        _assert_same(w, global_scale=torch.tensor([gs], dtype=torch.float32))
    _assert_same(w.reshape(8, 4, 512), global_scale=torch.logspace(-30, 30, 8).reshape(8, 1))


def test_generic_build_matches_reference(tmp_path):
    path = str(tmp_path / "k.so")
    try:
        cpu.LIBRARY.build(path, "cc", ("-DOQ_GENERIC", *cpu.LIBRARY.extra_flags))
    except Exception as err:  # pragma: no cover
        pytest.skip(f"cannot build the generic kernel: {err}")
    g = ctypes.CDLL(path)
    cpu._bind(g)
    for dtype in (torch.bfloat16, torch.float32):
        _check_all(dtype, lib=g, label="generic ")


def test_nan_inf_fall_back_or_raise():
    for bad in (float("inf"), float("nan"), float("-inf")):
        x = torch.randn(8, 64)
        x[2, 40] = bad
        _assert_same(x)  # falls back to the reference
        with pytest.raises(oqcore.NonFiniteError, match=r"tensor of shape \[8, 64\] holds NaN/Inf"):
            cpu.quantize_nvfp4_checked(x)
        e = torch.randn(3, 8, 64).bfloat16()
        e[2, 0, 0] = bad
        with pytest.raises(oqcore.NonFiniteError, match=r"tensor of shape \[3, 8, 64\] holds NaN/Inf"):
            cpu.quantize_nvfp4(e, check_finite=True)


@pytest.mark.parametrize("compiled", [True, False], ids=["kernel", "OQ_COMPILE=0"])
def test_checked_entry_on_every_path(monkeypatch, compiled):
    if not compiled:
        monkeypatch.setenv("OQ_COMPILE", "0")
        assert cpu.load_library() is None
    x = torch.randn(64, 96).bfloat16()
    q, s, g = cpu.quantize_nvfp4_checked(x)
    rq, rs, rg = quantize_nvfp4(x)
    assert torch.equal(q, rq) and torch.equal(s.view(torch.uint8), rs.view(torch.uint8)) and torch.equal(g, rg)
    x[0, 0] = float("nan")
    with pytest.raises(oqcore.NonFiniteError, match=r"tensor of shape \[64, 96\] holds NaN/Inf"):
        cpu.quantize_nvfp4_checked(x)


def test_errors_and_other_inputs_go_to_the_reference():
    with pytest.raises(ValueError, match=r"divisible by 16.*\(4, 40\)"):
        cpu.quantize_nvfp4_checked(torch.randn(4, 40))
    with pytest.raises(ValueError, match=r"global_scale.*\[2, 1\]"):
        cpu.quantize_nvfp4(torch.randn(2, 4, 16), global_scale=torch.ones(1))
    q, s, g = cpu.quantize_nvfp4_checked(torch.empty(64, 32, device="meta"))
    assert q.is_meta and q.shape == (64, 16) and s.shape == (64, 2) and g.shape == (1,)
    w = torch.randn(16, 32, dtype=torch.float64)
    _assert_same(w)
    q, s, g = cpu.quantize_nvfp4(torch.empty(0, 32))
    assert q.shape == (0, 16) and s.shape == (0, 2)
    _assert_same(torch.randn(64, 256)[:, ::2])  # non-contiguous


def test_own_library_and_sources():
    """The kernel includes the shared encoders (fp8's e4m3, mxfp4's e2m1) instead of copying them."""
    assert cpu.LIBRARY.name == "oq_nvfp4_cpu" and hasattr(lib, "oq_nvfp4_quantize")
    src = cpu.LIBRARY.c_source
    for inc in ('#include "fp8_e4m3.h"', '#include "fp4_e2m1.h"', '#include "oq_kernels.h"'):
        assert inc in src
    assert "f32_to_e4m3(float" not in src and "oq_f32_to_e2m1(float" not in src and "load16(const void" not in src
    assert "-ffp-contract=off" in cpu.LIBRARY.extra_flags


def test_registered_as_cpu_quantizer():
    """Through the public API: ``quantizer="cpu"`` gives the ``torch`` quantizer's bytes; NaN/Inf in a
    named weight is the core's UnsupportedLayerError naming the layer."""
    w = torch.randn(3, 64, 128).bfloat16()
    for x in (w[0], w):
        a = oqcore.quantize_tensor(x, "nvfp4", quantizer="cpu")
        b = oqcore.quantize_tensor(x, "nvfp4", quantizer="torch")
        for key in ("qdata", "scale", "global_scale"):
            assert torch.equal(a.tensors[key].view(torch.uint8), b.tensors[key].view(torch.uint8)), key
    bad = torch.randn(64, 96)
    bad[3, 5] = float("inf")
    with pytest.raises(oqcore.UnsupportedLayerError, match=r"^layer 'a.b': weight holds 1 NaN/Inf value"):
        oqcore.quantize_tensor(bad, "nvfp4", quantizer="cpu", name="a.b")


def test_vector_e2m1_encoder_equals_the_shared_one():
    """The kernel's arithmetic e2m1 encoder (nv_e2m1x16) against fp4_e2m1.h's oq_f32x16_to_e2m1 on
    every float32 bit pattern of these ranges (both signs): subnormals, [2**-5, 16) (every decision
    point), the largest finite values and Inf. (All 2**32 patterns agree too: 4 s, not run here.)"""
    if lib.oq_nvfp4_check_e2m1(0, 16) < 0:
        pytest.skip("no AVX-512 path in this build")
    for lo, hi in ((0x00000000, 0x00100000), (0x3D000000, 0x41800000), (0x7F700000, 0x7F800010)):
        for sign in (0, 0x80000000):
            assert lib.oq_nvfp4_check_e2m1(lo | sign, hi | sign) == 0, hex(lo | sign)
