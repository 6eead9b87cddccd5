"""The mxfp8 ``cpu`` quantizer (C kernel of :mod:`oq_plugin_mxfp8.cpu`): the same bytes as the torch
reference :func:`oq_plugin_mxfp8.quant.quantize_mxfp8` (qdata and e8m0 scales), both scale modes,
bf16/fp16/float32, including the exponent edges where torchao's float32 log2 rounds."""

from __future__ import annotations

import ctypes

import pytest
import torch

import oqcore
from oq_plugin_mxfp8 import cpu
from oq_plugin_mxfp8.quant import quantize_mxfp8

lib = cpu.load_library()
pytestmark = pytest.mark.skipif(lib is None, reason=f"C kernel unavailable: {cpu.kernel_status()[1]}")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
MODES = ["rceil", "floor"]


def _opts(mode):
    from oq_plugin_mxfp8.quant import Mxfp8Options

    return Mxfp8Options(scale_mode=mode)


def _edge_amax() -> torch.Tensor:
    """32-blocks whose amax is ``448 * 2**k * (1 + j * 2**-23)`` (the rceil power-of-two edges, subnormal
    descales), and blocks whose amax has random float32 bits over the whole finite range."""
    g = torch.Generator().manual_seed(1)
    ks = torch.arange(-140, 120, dtype=torch.float32)
    j = torch.arange(0, 24, dtype=torch.float32)
    amax = (torch.ldexp(torch.ones(()), ks)[:, None] * (1 + j[None, :] * 2**-23) * 448).flatten()
    rnd = torch.randint(0, 0x7F7FFFFF, (4096,), dtype=torch.int32, generator=g).view(torch.float32)
    amax = torch.cat([amax, rnd])
    x = (torch.rand(amax.numel(), 32, generator=g) * 2 - 1) * amax[:, None]
    x[:, 7] = amax
    x[::2, 7] *= -1
    return x


def _cases(dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mixed = torch.randn(64, 256, generator=g) * torch.logspace(-35, 35, 64)[:, None]
    mixed[::3, :32] = 0.0
    sat = torch.randn(16, 64, generator=g)
    sat[:, 0] = torch.tensor([1.75, 1.8, 1.9, 1.99] * 4) * 2.0 ** torch.arange(-8, 8).float()
    neg_zero = torch.randn(40, 96, generator=g)
    neg_zero[torch.rand(40, 96, generator=g) < 0.3] = -0.0
    neg_zero[5] = -0.0
    big = torch.finfo(dtype).max
    huge = torch.randn(32, 128, generator=g).clamp(-1, 1) * big
    huge[0, 0] = big
    out = {
        "random": torch.randn(130, 224, generator=g),
        "zeros": torch.zeros(32, 128),
        "neg_zero": neg_zero,
        "subnormal": torch.randn(32, 128, generator=g) * 1e-40,
        "dtype_subnormal": torch.randn(32, 128, generator=g) * torch.finfo(dtype).smallest_normal,
        "tiny": torch.randn(32, 128, generator=g) * 1e-37,
        "huge": huge,
        "mixed": mixed,
        "floor_saturates": sat,
        "edge_amax": _edge_amax(),
        "one_row": torch.randn(1, 32, generator=g),
    }
    return {k: v.to(dtype) for k, v in out.items()}


def _assert_same(w, mode, lib=lib):
    q, e = cpu.quantize_mxfp8(w, _opts(mode), lib=lib)
    rq, re = quantize_mxfp8(w, _opts(mode))
    assert q.dtype == rq.dtype and e.dtype == re.dtype and q.shape == rq.shape and e.shape == re.shape
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    assert torch.equal(e.view(torch.uint8), re.view(torch.uint8))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bytes_equal_reference(dtype, mode):
    for name, w in _cases(dtype).items():
        try:
            _assert_same(w, mode)
        except AssertionError as err:
            raise AssertionError(f"{name} {dtype} {mode}") from err


@pytest.mark.parametrize("mode", MODES)
def test_3d_stack_inf_nan_and_default_options(mode):
    w = torch.randn(3, 64, 96).bfloat16()
    w[1] = 0
    _assert_same(w, mode)
    q, e = cpu.quantize_mxfp8(w[0])  # options=None -> rceil
    rq, re = quantize_mxfp8(w[0])
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(e.view(torch.uint8), re.view(torch.uint8))
    for bad in (float("inf"), float("nan")):
        x = torch.randn(8, 64)
        x[2, 40] = bad
        _assert_same(x, mode)  # falls back to the reference (NaN/Inf scale bytes)
    with pytest.raises(ValueError, match="divisible by 32"):
        cpu.quantize_mxfp8(torch.randn(4, 48))


def test_registered_as_cpu_backend():
    w = torch.randn(64, 128).bfloat16()
    for mode in MODES:
        opts = {"scale_mode": mode}
        a = oqcore.quantize_tensor(w, "mxfp8", quantizer="cpu", options=opts)
        b = oqcore.quantize_tensor(w, "mxfp8", quantizer="torch", options=opts)
        assert torch.equal(a.qdata.view(torch.uint8), b.qdata.view(torch.uint8))
        assert torch.equal(a.scale.view(torch.uint8), b.scale.view(torch.uint8))


def test_eager_fallback_without_compile(monkeypatch):
    monkeypatch.setenv("OQ_COMPILE", "0")
    assert cpu.load_library() is None
    w = torch.randn(16, 64).bfloat16()
    a = oqcore.quantize_tensor(w, "mxfp8", quantizer="cpu")
    b = oqcore.quantize_tensor(w, "mxfp8", quantizer="torch")
    assert torch.equal(a.qdata.view(torch.uint8), b.qdata.view(torch.uint8))


def test_generic_build_matches_reference(tmp_path):
    path = str(tmp_path / "k.so")
    try:
        cpu.LIBRARY.build(path, "cc", ("-DOQ_GENERIC",))
    except Exception as err:  # pragma: no cover
        pytest.skip(f"cannot build the generic kernel: {err}")
    g = ctypes.CDLL(path)
    cpu._bind(g)
    for dtype in (torch.bfloat16, torch.float32):
        for mode in MODES:
            for name, w in _cases(dtype).items():
                try:
                    _assert_same(w, mode, lib=g)
                except AssertionError as err:
                    raise AssertionError(f"generic {name} {dtype} {mode}") from err


@pytest.mark.parametrize("compiled", [True, False], ids=["kernel", "OQ_COMPILE=0"])
def test_check_finite_raises_on_every_path(monkeypatch, compiled):
    """``check_finite=True`` (the registered quantizer): NonFiniteError from the kernel's own amax,
    and from the reference path too; finite input still gives the reference's bytes."""
    if not compiled:
        monkeypatch.setenv("OQ_COMPILE", "0")
    x = torch.randn(64, 96)
    q, e = cpu.quantize_mxfp8_checked(x)
    rq, re = quantize_mxfp8(x)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(e.view(torch.uint8), re.view(torch.uint8))
    x[0, 0] = float("inf")
    with pytest.raises(oqcore.NonFiniteError, match=r"tensor of shape \[64, 96\] holds NaN/Inf"):
        cpu.quantize_mxfp8(x, check_finite=True)
    with pytest.raises(oqcore.UnsupportedLayerError, match=r"^layer 'a.b': weight holds 1 NaN/Inf value\(s\) of 6144;"):
        oqcore.quantize_tensor(x, "mxfp8", quantizer="cpu", name="a.b")


def test_own_library_and_sources():
    """mxfp8 owns its quantizer: its own library and C file, which includes fp8's e4m3 encoder and
    the toolkit's helpers instead of copying them; fp8's library no longer exports it."""
    import oq_plugin_fp8.cpu as fp8_cpu

    assert cpu.LIBRARY.name == "oq_mxfp8_cpu" and hasattr(lib, "oq_mxfp8_quantize")
    assert not hasattr(fp8_cpu.load_library(), "oq_mxfp8_quantize")
    src = cpu.LIBRARY.c_source
    assert '#include "fp8_e4m3.h"' in src and '#include "oq_kernels.h"' in src
    assert "f32_to_e4m3(float" not in src and "load16(const void" not in src
    assert str(fp8_cpu.CSRC_DIR) in cpu.LIBRARY.include_dirs
