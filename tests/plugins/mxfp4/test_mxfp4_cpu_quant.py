"""The mxfp4 ``cpu`` quantizer (C kernel of :mod:`oq_plugin_mxfp4.cpu`) and the e2m1 C encoder
``csrc/fp4_e2m1.h``: the same bytes as the torch references (:func:`oq_plugin_mxfp4.fp4.e2m1_encode`,
:func:`oq_plugin_mxfp4.quant.quantize_mxfp4`), both scale modes, bf16/fp16/float32, AVX-512 and
generic builds; NaN/Inf -> NonFiniteError from the registered quantizer."""

from __future__ import annotations

import ctypes

import pytest
import torch

import oqcore
from oq_plugin_mxfp4 import cpu
from oq_plugin_mxfp4.fp4 import e2m1_encode, pack_fp4
from oq_plugin_mxfp4.quant import Mxfp4Options, quantize_mxfp4

lib = cpu.load_library()
pytestmark = pytest.mark.skipif(lib is None, reason=f"C kernel unavailable: {cpu.kernel_status()[1]}")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
MODES = ["rceil", "floor"]


@pytest.fixture(scope="module")
def generic_lib(tmp_path_factory):
    """The portable C build (-DOQ_GENERIC: no AVX-512 paths)."""
    path = str(tmp_path_factory.mktemp("mxfp4_generic") / "k.so")
    try:
        cpu.LIBRARY.build(path, "cc", ("-DOQ_GENERIC",))
    except Exception as err:  # pragma: no cover
        pytest.skip(f"cannot build the generic kernel: {err}")
    g = ctypes.CDLL(path)
    cpu._bind(g)
    return g


def _encode_c(x: torch.Tensor, vec: int, the_lib=lib) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, packed bytes) of float32 ``x`` (numel % 32 == 0) through the library's header test entry."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.uint8)
    packed = torch.empty(x.numel() // 2, dtype=torch.uint8)
    the_lib.oq_e2m1_encode(x.data_ptr(), x.numel(), out.data_ptr(), packed.data_ptr(), vec)
    return out, packed


def _header_inputs() -> torch.Tensor:
    """float32 samples of [-8, 8]: every 127th bit pattern of [0, 8] (a prime stride, so every
    low-bit pattern occurs; 8.6 M values) with both signs, every bit pattern within 2**16
    codes of each decision point 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5 and of 6, the decision points
    themselves, +-0, every float32 subnormal sign/size class (tiny negatives), Inf and NaNs."""
    top = int(torch.tensor(8.0).view(torch.int32))
    stride = torch.arange(0, top + 1, 127, dtype=torch.int32)
    pts = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]).view(torch.int32)
    near = (pts[:, None] + torch.arange(-(1 << 16), 1 << 16, dtype=torch.int32)[None, :]).flatten()
    sub = torch.arange(0, 1 << 23, 4099, dtype=torch.int32)
    special = torch.tensor([0x7F800000, 0x7FC00000, 0x7F800001, 0x7FFFFFFF], dtype=torch.int32)
    pos = torch.cat([stride, near, sub, special, torch.tensor([top], dtype=torch.int32)])
    bits = torch.cat([pos, pos | torch.tensor(-(2**31), dtype=torch.int32)])
    bits = torch.cat([bits, torch.zeros((-bits.numel()) % 32, dtype=torch.int32)])
    return bits.view(torch.float32)


def test_e2m1_header_equals_the_torch_encoder_everywhere(generic_lib):
    """fp4_e2m1.h (scalar, AVX-512 16 lanes, and its packers) == fp4.e2m1_encode / pack_fp4 on
    ~18 M float32 values of [-8, 8] incl. every tie and -0.0 -> 8 (and NaN -> its sign bit only, Inf
    -> 7, as the torch encoder)."""
    x = _header_inputs()
    want = e2m1_encode(x)
    want_packed = pack_fp4(want.reshape(-1, 32)).flatten()
    assert int((x == 0.25).sum()) == 1 and int((want == 8).sum()) > 1000
    for the_lib, vecs in ((lib, (0, 1)), (generic_lib, (1,))):
        for vec in vecs:
            got, packed = _encode_c(x, vec, the_lib)
            bad = (got != want).nonzero().flatten()
            assert bad.numel() == 0, (vec, x[bad[:5]].tolist(), got[bad[:5]].tolist(), want[bad[:5]].tolist())
            assert torch.equal(packed, want_packed), vec
    # the arithmetic AVX-512 encoder (the quantizer's): the same codes except NaN -> +-6 (7 / 15)
    nan = torch.isnan(x)
    got = _encode_c(x, 2)[0]
    assert torch.equal(got[~nan], want[~nan])
    assert torch.equal(got[nan] & 7, torch.full_like(got[nan], 7)) and int(nan.sum()) >= 6
    # ties to even, saturation and the sign of zero, spelled out
    t = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.0, -1e-40, -0.26, 1e38] + [0.0] * 20)
    assert _encode_c(t, 1)[0][:12].tolist() == [0, 2, 2, 4, 4, 6, 6, 7, 8, 8, 9, 7]
    assert _encode_c(t, 0)[0][:12].tolist() == [0, 2, 2, 4, 4, 6, 6, 7, 8, 8, 9, 7]


def _edge_amax() -> torch.Tensor:
    """32-blocks whose amax is ``6 * 2**k * (1 + j * 2**-23)`` (the rceil power-of-two edges, subnormal
    descales), floor's saturating maxima, and amax with random float32 bits over the finite range."""
    g = torch.Generator().manual_seed(1)
    ks = torch.arange(-140, 120, dtype=torch.float32)
    j = torch.arange(0, 24, dtype=torch.float32)
    amax = (torch.ldexp(torch.ones(()), ks)[:, None] * (1 + j[None, :] * 2**-23) * 6).flatten()
    sat = (torch.ldexp(torch.ones(()), torch.arange(-126, 120).float())[:, None] * torch.tensor([1.6, 1.9])).flatten()
    rnd = torch.randint(0, 0x7F7FFFFF, (4096,), dtype=torch.int32, generator=g).view(torch.float32)
    amax = torch.cat([amax, sat, rnd])
    x = (torch.rand(amax.numel(), 32, generator=g) * 2 - 1) * amax[:, None]
    x[:, 7] = amax
    x[::2, 7] *= -1
    return x


def _cases(dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mixed = torch.randn(64, 256, generator=g) * torch.logspace(-35, 35, 64)[:, None]
    mixed[::3, :32] = 0.0
    neg_zero = torch.randn(40, 96, generator=g)
    neg_zero[torch.rand(40, 96, generator=g) < 0.3] = -0.0
    neg_zero[5] = -0.0
    big = torch.finfo(dtype).max
    huge = torch.randn(32, 128, generator=g).clamp(-1, 1) * big
    huge[0, 0] = big
    # every block holds the e2m1 decision points times its scale (ties after scaling)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 6.0, -0.0] * 2)
    ties = ties[None] * torch.ldexp(torch.ones(()), torch.arange(-20, 20).float())[:, None]
    out = {
        "random": torch.randn(130, 224, generator=g),  # 910 blocks: groups of 16 and a scalar tail
        "zeros": torch.zeros(32, 128),
        "neg_zero": neg_zero,
        "subnormal": torch.randn(32, 128, generator=g) * 1e-40,
        "dtype_subnormal": torch.randn(32, 128, generator=g) * torch.finfo(dtype).smallest_normal,
        "tiny": torch.randn(32, 128, generator=g) * 1e-37,
        "huge": huge,
        "mixed": mixed,
        "ties": ties,
        "edge_amax": _edge_amax(),
        "one_row": torch.randn(1, 32, generator=g),
        "stack": torch.randn(3, 24, 160, generator=g) * torch.tensor([1e-3, 1.0, 0.0])[:, None, None],
        "threads": torch.randn(68, 1024, generator=g),  # >= 64 Ki elements: OpenMP with 2 threads
    }
    return {k: v.to(dtype) for k, v in out.items()}


def _assert_same(w, mode, the_lib=lib):
    o = Mxfp4Options(scale_mode=mode)
    q, e = cpu.quantize_mxfp4(w, o, lib=the_lib)
    rq, re = quantize_mxfp4(w, o)
    assert q.dtype == torch.uint8 and e.dtype == torch.float8_e8m0fnu and q.shape == rq.shape and e.shape == re.shape
    assert torch.equal(e.view(torch.uint8), re.view(torch.uint8)), (e.view(torch.uint8) != re.view(torch.uint8)).nonzero()[:5].tolist()
    assert torch.equal(q, rq), (q != rq).nonzero()[:5].tolist()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bytes_equal_reference(dtype, mode):
    for name, w in _cases(dtype).items():
        try:
            _assert_same(w, mode)
        except AssertionError as err:
            raise AssertionError(f"{name} {dtype} {mode}") from err


def test_generic_build_matches_reference(generic_lib):
    for dtype in (torch.bfloat16, torch.float32):
        for mode in MODES:
            for name, w in _cases(dtype).items():
                try:
                    _assert_same(w, mode, the_lib=generic_lib)
                except AssertionError as err:
                    raise AssertionError(f"generic {name} {dtype} {mode}") from err


@pytest.mark.parametrize("mode", MODES)
def test_inf_nan_fall_back_and_defaults(mode):
    w = torch.randn(8, 64, 96).bfloat16()
    q, e = cpu.quantize_mxfp4(w[0])  # options=None -> rceil
    rq, re = quantize_mxfp4(w[0])
    assert torch.equal(q, rq) and torch.equal(e.view(torch.uint8), re.view(torch.uint8))
    for bad in (float("inf"), float("nan"), -float("inf")):
        x = torch.randn(40, 64)  # 80 blocks: the bad one inside an AVX-512 group of 16
        x[2, 40] = bad
        _assert_same(x, mode)  # falls back to the reference (its NaN/Inf bytes)
        y = torch.randn(3, 64)  # 6 blocks: the scalar path
        y[1, 0] = bad
        _assert_same(y, mode)
    with pytest.raises(ValueError, match="divisible by 32"):
        cpu.quantize_mxfp4(torch.randn(4, 48))
    # empty and other-dtype inputs take the reference
    assert cpu.quantize_mxfp4(torch.zeros(0, 64))[0].shape == (0, 32)
    _assert_same(torch.randn(4, 64, dtype=torch.float64), mode)


def test_registered_as_cpu_quantizer():
    w = torch.randn(64, 128).bfloat16()
    for mode in MODES:
        opts = {"scale_mode": mode}
        a = oqcore.quantize_tensor(w, "mxfp4", quantizer="cpu", options=opts)
        b = oqcore.quantize_tensor(w, "mxfp4", quantizer="torch", options=opts)
        assert torch.equal(a.qdata, b.qdata)
        assert torch.equal(a.scale.view(torch.uint8), b.scale.view(torch.uint8))


def test_activation_shapes_w4a4():
    """Activations [M, K] (any M, incl. 1) through the same entry point."""
    g = torch.Generator().manual_seed(7)
    for m in (1, 3, 17):
        x = (torch.randn(m, 2048, generator=g) * 3).bfloat16()
        _assert_same(x, "rceil")


def test_eager_fallback_without_compile(monkeypatch):
    monkeypatch.setenv("OQ_COMPILE", "0")
    assert cpu.load_library() is None
    w = torch.randn(16, 64).bfloat16()
    a = oqcore.quantize_tensor(w, "mxfp4", quantizer="cpu")
    b = oqcore.quantize_tensor(w, "mxfp4", quantizer="torch")
    assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale.view(torch.uint8), b.scale.view(torch.uint8))


@pytest.mark.parametrize("compiled", [True, False], ids=["kernel", "OQ_COMPILE=0"])
def test_check_finite_raises_on_every_path(monkeypatch, compiled):
    """``quantize_mxfp4_checked`` (the registered quantizer): NonFiniteError from the kernel's own
    amax, and from the reference path too; finite input gives the reference's bytes."""
    if not compiled:
        monkeypatch.setenv("OQ_COMPILE", "0")
    x = torch.randn(64, 96)
    q, e = cpu.quantize_mxfp4_checked(x)
    rq, re = quantize_mxfp4(x)
    assert torch.equal(q, rq) and torch.equal(e.view(torch.uint8), re.view(torch.uint8))
    x[0, 0] = float("inf")
    with pytest.raises(oqcore.NonFiniteError, match=r"tensor of shape \[64, 96\] holds NaN/Inf"):
        cpu.quantize_mxfp4_checked(x)
    with pytest.raises(oqcore.UnsupportedLayerError, match=r"^layer 'a.b': weight holds 1 NaN/Inf value\(s\) of 6144;"):
        oqcore.quantize_tensor(x, "mxfp4", quantizer="cpu", name="a.b")


def test_own_library_and_shared_header():
    """The quantizer includes the toolkit's helpers and the e2m1 header instead of copying them;
    the header ships as package data next to it (oq-plugin-nvfp4 includes it from CSRC_DIR)."""
    assert cpu.LIBRARY.name == "oq_mxfp4_cpu" and hasattr(lib, "oq_mxfp4_quantize")
    src = cpu.LIBRARY.c_source
    assert '#include "fp4_e2m1.h"' in src and '#include "oq_kernels.h"' in src
    assert "load16(const void" not in src and "oq_f32_to_e2m1(float" not in src
    header = (cpu.CSRC_DIR / "fp4_e2m1.h").read_text()
    assert "OQ_INLINE uint8_t oq_f32_to_e2m1(float x)" in header and "OQ_E2M1_VALUES[16]" in header
