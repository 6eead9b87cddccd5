"""The fp8 ``cpu`` quantizers (C kernel of :mod:`oq_plugin_fp8.cpu`): the same bytes as the torch
reference (:mod:`oq_plugin_fp8.quant`), qdata and scales, for every key, dtype and awkward input.

The float32 -> float8_e4m3fn conversion (integer round-to-nearest-even, AVX-512 and scalar) is
checked against torch's cast on every fp8 value, every midpoint and their float32 neighbours, a
dense sweep of the subnormal range and random bit patterns; the whole quantizer additionally on a
portable (``-DOQ_GENERIC``, no intrinsics) build of the same source.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

import oqcore
from fp8_testutil import same_bytes
from oq_plugin_fp8 import cpu
from oq_plugin_fp8.quant import GROUPINGS, quantize_grouped

KEYS = list(GROUPINGS)
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [(1, 1), (3, 5), (128, 128), (130, 200), (300, 260), (257, 1000), (16, 4096)]

lib = cpu.load_library()
pytestmark = pytest.mark.skipif(lib is None, reason=f"C kernel unavailable: {cpu.kernel_status()[1]}")


def _f32_bits(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).view(torch.float32).contiguous()


def _convert(y: torch.Tensor, zero_fix: int, vector: int, lib=lib) -> torch.Tensor:
    y = y.contiguous()
    out = torch.empty(y.numel(), dtype=torch.uint8)
    lib.oq_f32_to_e4m3(y.data_ptr(), y.numel(), zero_fix, vector, out.data_ptr())
    return out


def _conversion_inputs() -> torch.Tensor:
    """float32 values in [-448, 448] where an e4m3 rounding bug would show."""
    codes = torch.arange(0, 0x7F, dtype=torch.uint8)  # every non-negative, non-NaN code
    vals = codes.view(torch.float8_e4m3fn).float()
    mids = (vals[:-1] + vals[1:]) / 2  # exact in float32: every midpoint (ties to even)
    centers = torch.cat([vals, mids]).view(torch.int32).long()
    near = (centers[:, None] + torch.arange(-4, 5)[None, :]).reshape(-1)  # +-4 float32 ulps
    # dense sweep of the e4m3 subnormal range and below (float32 exponents 0..121, 2^13 mantissas each)
    e = torch.arange(0, 122)[:, None] << 23
    m = torch.cat([torch.arange(0, 4096), (1 << 23) - 1 - torch.arange(0, 4096)])[None, :]
    sub = (e | m).reshape(-1)
    rand = torch.randint(0, 0x43E00001, (1 << 20,), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([near, sub, rand, torch.tensor([0, 0x43E00000])])
    pos = pos[(pos >= 0) & (pos <= 0x43E00000)]
    allbits = torch.cat([pos, pos | (1 << 31)])
    return _f32_bits(torch.where(allbits >= 1 << 31, allbits - (1 << 32), allbits))


@pytest.mark.parametrize("vector", [1, 0])
def test_e4m3_conversion_matches_torch_cast(vector):
    y = _conversion_inputs()
    ref = y.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(_convert(y, 0, vector), ref)
    # zero_fix (compressed-tensors' "+ 0.0"): only an exact -0.0 changes, to +0 (0x00)
    fixed = torch.where(y == 0, torch.zeros_like(ref), ref)
    assert torch.equal(_convert(y, 1, vector), fixed)
    # tiny negatives that round to zero keep their sign (0x80), as in the reference
    tiny = torch.tensor([-1e-30, -(2.0**-10), -(2.0**-149)])
    assert _convert(tiny, 1, vector).tolist() == [0x80, 0x80, 0x80]


def _inputs(n: int, k: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    big = torch.finfo(dtype).max
    tiny = torch.finfo(dtype).smallest_normal
    w = torch.randn(n, k, generator=g)
    mixed = w * torch.exp2(torch.randint(-40, 40, (n, k), generator=g).float())
    if dtype == torch.float16:
        mixed = w * torch.exp2(torch.randint(-20, 15, (n, k), generator=g).float())
    zero_blocks = w.clone()
    zero_blocks[: min(n, 128), : min(k, 128)] = 0
    zero_blocks[n // 2] = 0
    neg_zero = w.clone()
    neg_zero[torch.rand(n, k, generator=g) < 0.3] = -0.0
    neg_zero[-1] = -0.0
    sub = torch.randn(n, k, generator=g) * tiny * 4  # around the input dtype's subnormal range
    sub[0, : min(k, 3)] = torch.tensor([tiny / 8, -tiny / 1024, 0.0])[: min(k, 3)]
    f32sub = torch.randn(n, k, generator=g) * 1e-42  # float32 subnormals (zero in bf16/fp16)
    huge = torch.randn(n, k, generator=g).clamp(-1, 1) * big
    huge.view(-1)[0] = big
    huge.view(-1)[-1] = -big
    # values whose scaled magnitude lands on e4m3 midpoints (group amax pinned to 448 * 2^-3)
    codes = torch.randint(0, 0x7F, (n, k), generator=g, dtype=torch.int32).to(torch.uint8)
    v = codes.view(torch.float8_e4m3fn).float()
    nxt = (codes.to(torch.int32) + 1).clamp(max=0x7E).to(torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (v + nxt) / 2 * torch.where(torch.rand(n, k, generator=g) < 0.5, -1.0, 1.0) * 0.125
    mids.view(-1)[0] = 56.0
    out = {
        "gaussian": w * 0.02,
        "mixed": mixed,
        "zero_blocks": zero_blocks,
        "all_zero": torch.zeros(n, k),
        "neg_zero": neg_zero,
        "subnormal": sub,
        "f32_subnormal": f32sub,
        "huge": huge,
        "midpoints": mids,
    }
    return {name: t.to(dtype) for name, t in out.items()}


def _assert_same(w: torch.Tensor, g, lib=lib) -> None:
    q, s = cpu.quantize_fp8_grouped(w, g, lib=lib)
    rq, rs = quantize_grouped(w, g)
    assert same_bytes(q, rq)
    assert s.dtype == rs.dtype == torch.float32 and s.shape == rs.shape
    assert torch.equal(s.view(torch.int32), rs.view(torch.int32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("key", KEYS)
def test_quantizer_bytes_equal_reference(key, dtype):
    g = GROUPINGS[key]
    for i, (n, k) in enumerate(SHAPES):
        for name, w in _inputs(n, k, dtype, seed=i).items():
            try:
                _assert_same(w, g)
            except AssertionError as e:
                raise AssertionError(f"{key} {dtype} {n}x{k} {name}") from e


@pytest.mark.parametrize("key", KEYS)
def test_3d_stack_and_non_contiguous(key):
    g = GROUPINGS[key]
    w = torch.randn(3, 200, 130).bfloat16()
    w[1] = 0
    _assert_same(w, g)
    _assert_same(torch.randn(260, 300).t(), g)  # non-contiguous float32


@pytest.mark.parametrize("key", ["fp8_per_tensor_static", "fp8_per_channel_static", "fp8_per_block_static"])
def test_inf_nan_fall_back_to_reference(key):
    g = GROUPINGS[key]
    for bad in (float("inf"), float("-inf"), float("nan")):
        for dtype in DTYPES:
            w = torch.randn(140, 150).to(dtype)
            w[3, 7] = bad
            q, s = cpu.quantize_fp8_grouped(w, g)
            rq, rs = quantize_grouped(w, g)
            assert same_bytes(q, rq) and torch.equal(s.isnan(), rs.isnan())
            assert torch.equal(s.nan_to_num(), rs.nan_to_num())


def test_registered_as_cpu_backend_for_every_key():
    w = torch.randn(130, 260).bfloat16()
    for key in KEYS:
        role = "weight" if key.endswith("static") else "activation"
        a = oqcore.quantize_tensor(w, key, quantizer="cpu", role=role)
        b = oqcore.quantize_tensor(w, key, quantizer="torch", role=role)
        assert same_bytes(a.qdata, b.qdata) and torch.equal(a.scale, b.scale)


def test_eager_fallback_without_compile(monkeypatch):
    """``OQ_COMPILE=0``: the registered cpu quantizer is the torch reference (no kernel loaded)."""
    monkeypatch.setenv("OQ_COMPILE", "0")
    called = []
    import oq_plugin_fp8.quant as quant

    real = quant.quantize_grouped
    monkeypatch.setattr(quant, "quantize_grouped", lambda w, g: called.append(1) or real(w, g))
    w = torch.randn(64, 96).bfloat16()
    a = oqcore.quantize_tensor(w, "fp8_per_block_static", quantizer="cpu")
    b = oqcore.quantize_tensor(w, "fp8_per_block_static", quantizer="torch")
    assert called and same_bytes(a.qdata, b.qdata) and torch.equal(a.scale, b.scale)


@pytest.fixture(scope="module")
def generic_lib(tmp_path_factory):
    """The same source built without AVX-512 intrinsics (the portable C loops)."""
    path = str(tmp_path_factory.mktemp("generic") / "k.so")
    try:
        cpu.LIBRARY.build(path, "cc", ("-DOQ_GENERIC",))
    except Exception as e:  # pragma: no cover - compiler vanished between builds
        pytest.skip(f"cannot build the generic kernel: {e}")
    g = ctypes.CDLL(path)
    cpu._bind(g)
    return g


def test_generic_build_matches_reference(generic_lib):
    y = _conversion_inputs()
    ref = y.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(_convert(y, 0, 1, lib=generic_lib), ref)
    for key in ("fp8_per_tensor_static", "fp8_per_channel_static", "fp8_per_block_static"):
        for dtype in DTYPES:
            for name, w in _inputs(257, 300, dtype, seed=7).items():
                try:
                    _assert_same(w, GROUPINGS[key], lib=generic_lib)
                except AssertionError as e:
                    raise AssertionError(f"{key} {dtype} {name}") from e


@pytest.mark.parametrize("compiled", [True, False], ids=["kernel", "OQ_COMPILE=0"])
def test_check_finite_raises_on_every_path(monkeypatch, compiled):
    """``check_finite=True`` (the registered quantizer): NonFiniteError from the kernel's own amax,
    and from the reference path too; finite input still gives the reference's bytes."""
    if not compiled:
        monkeypatch.setenv("OQ_COMPILE", "0")
    for key in ("fp8_per_tensor_static", "fp8_per_block_static"):
        w = torch.randn(2, 130, 150).bfloat16()
        q, s = cpu.quantize_fp8_grouped(w, GROUPINGS[key], check_finite=True)
        rq, rs = quantize_grouped(w, GROUPINGS[key])
        assert same_bytes(q, rq) and torch.equal(s, rs)
        w[1, 3, 7] = float("nan")
        with pytest.raises(oqcore.NonFiniteError, match=r"tensor of shape \[2, 130, 150\] holds NaN/Inf"):
            cpu.quantize_fp8_grouped(w, GROUPINGS[key], check_finite=True)

