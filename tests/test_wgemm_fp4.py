"""oq_toolkit.wgemm with 4-bit e2m1 weights (``q_fmt=E2M1``), held to the module's error bound.

Bound (module docstring of oq_toolkit.wgemm): ``|y - y_ref| <= 2 * K * eps32 * (|A| @ |W|^T)``
elementwise, ``y_ref`` the float64 product of the dequantized operands, computed here
independently of the module: nibbles unpacked with the element order of
``oq_plugin_mxfp4.fp4.pack_fp4`` (element ``2j`` in the low nibble), e2m1 values from their own
table, e8m0 scales by ``ldexp``, e4m3 scales by torch's float8 cast, ``w_scale_mul`` applied to the
float64 weights. Every kernel path this machine runs is forced in turn (the AVX512-BF16 path has
two kernels: the in-register decode for M <= 4 and the decoded-row kernel above), plus a
``-DOQ_GENERIC`` build, the torch fallback and the custom op under ``torch.compile``.
"""

from __future__ import annotations

import ctypes
import itertools

import pytest
import torch

import oq_toolkit.wgemm as W

EPS32 = torch.finfo(torch.float32).eps
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float64)
PATHS = [p for p in (W.PATH_AMX, W.PATH_BF16, W.PATH_SCALAR) if p in W.available_paths()]
PATH_IDS = {W.PATH_AMX: "amx", W.PATH_BF16: "avx512bf16", W.PATH_SCALAR: "portable"}
MUL = 0.0123  # an nvfp4-like 1 / global_scale (not a power of two: the multiply rounds)


# ---------------------------------------------------------------------------------------------
# inputs and the independent reference


def _codes(n, k, gen):
    """Packed e2m1 bytes ``[n, k/2]``, every code present (row 0: codes 0..15 in order)."""
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    q[0, :8] = torch.tensor([0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE], dtype=torch.uint8)[: min(8, k // 2)]
    return q


def _wgrid(kind, n, k, gen):
    """(scale tensor, grid, w_scale_mul) of a weight scale layout."""
    if kind == "none":
        return None, None, 1.0
    if kind == "e8m0":  # mxfp4: 1 x 32
        return torch.randint(118, 136, (n, k // 32), dtype=torch.uint8, generator=gen).view(torch.float8_e8m0fnu), (1, 32, k // 32), 1.0
    if kind == "e4m3":  # nvfp4: 1 x 16, with subnormal and extreme scales, and the global multiplier
        s = (torch.rand(n, k // 16, generator=gen) * 300 + 2**-9).to(torch.float8_e4m3fn)
        flat = s.view(torch.uint8).view(-1)
        flat[:4] = torch.tensor([0x01, 0x07, 0x7E, 0x00], dtype=torch.uint8)[: flat.numel()]  # 2^-9, 7 * 2^-9, 448, 0
        return s, (1, 16, k // 16), MUL
    if kind == "f32":  # float32 1 x 32 groups (chunks, not folded)
        return torch.rand(n, k // 32, generator=gen) + 0.25, (1, 32, k // 32), 1.0
    if kind == "f32row":
        return torch.rand(n, generator=gen) + 0.25, (1, k, 1), 1.0
    if kind == "e4m3row":  # one e4m3 scale per row: the whole K one group
        return (torch.rand(n, 1, generator=gen) * 8 + 0.5).to(torch.float8_e4m3fn), (1, k, 1), 0.5
    raise AssertionError(kind)


def _act(kind, m, k, gen):
    """(a, a_fmt, scale, grid): bf16 activations or mxfp8 codes (e4m3, e8m0 1 x 32)."""
    if kind == "bf16":
        return (torch.randn(m, k, generator=gen) * 3).bfloat16(), W.BF16, None, None
    codes = (torch.randn(m, k, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    return codes, W.E4M3, torch.randint(118, 136, (m, k // 32), dtype=torch.uint8, generator=gen), (1, 32, k // 32)


def _scales64(s, grid, r, k):
    if s is None:
        return torch.ones(r, k, dtype=torch.float64)
    if s.dtype == torch.float8_e8m0fnu or s.dtype == torch.uint8:
        e = s.view(torch.uint8).reshape(-1).to(torch.int64).clamp(min=1)
        sf = torch.ldexp(torch.ones(e.shape, dtype=torch.float64), e - 127)
    else:
        sf = s.reshape(-1).to(torch.float64)
    gr, gc, ld = grid
    idx = (torch.arange(r) // gr)[:, None] * ld + (torch.arange(k) // gc)[None, :]
    return sf[idx]


def _w64(q, s, grid, mul):
    n, k = q.shape[0], q.shape[1] * 2
    codes = torch.empty(n, k, dtype=torch.long)
    codes[:, 0::2] = (q & 0x0F).long()
    codes[:, 1::2] = (q >> 4).long()
    return E2M1[codes] * _scales64(s, grid, n, k) * mul


def _a64(a, af, sa, ga):
    x = a.double() if af == W.BF16 else a.view(torch.float8_e4m3fn).double()
    return x * _scales64(sa, ga, *a.shape)


def _violations(y, a, af, sa, ga, q, sw, gw, mul, what=""):
    """Entries of ``y`` over the bound ``2 K eps32 (|A| @ |W|^T)`` around the float64 reference
    (``""`` when there are none, else a message naming the case and the worst ratio); a wrong
    dtype or shape is one too."""
    A, Wd = _a64(a, af, sa, ga), _w64(q, sw, gw, mul)
    ref = A @ Wd.T
    if y.dtype != torch.float32 or y.shape != ref.shape:
        return f"{what}: got {y.dtype} {list(y.shape)}, expected float32 {list(ref.shape)}"
    bound = 2 * A.shape[1] * EPS32 * (A.abs() @ Wd.abs().T)
    err = (y.double() - ref).abs()
    bad = err > bound
    if not bad.any():
        return ""
    return f"{what}: {int(bad.sum())} entries over the bound, worst err/bound {float((err / bound.clamp(min=1e-300)).max()):.3g}"


def _case(m, n, k, wkind, akind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = _codes(n, k, gen)
    sw, gw, mul = _wgrid(wkind, n, k, gen)
    a, af, sa, ga = _act(akind, m, k, gen)
    return (a, af, sa, ga, q, W.E2M1, sw, gw), mul


def _run(args, mul, **kw):
    return W.wgemm_eager(*args, w_scale_mul=mul, **kw)


def _over(y, args, mul, what=""):
    """:func:`_violations` for a :func:`_case`'s arguments."""
    a, af, sa, ga, q, _, sw, gw = args
    return _violations(y, a, af, sa, ga, q, sw, gw, mul, what)


# ---------------------------------------------------------------------------------------------
# the bound on every path, grid and activation format


GRIDS = ["e8m0", "e4m3"]
ACTS = ["bf16", "e4m3"]
SHAPES = [(1, 37, 64), (3, 41, 96), (4, 9, 224), (17, 33, 224), (257, 21, 96)]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: PATH_IDS[p])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_bound_every_grid_and_activation(path, m, n, k):
    for wk, ak in itertools.product(GRIDS, ACTS):
        args, mul = _case(m, n, k, wk, ak, seed=m + n)
        assert not _over(_run(args, mul, path=path), args, mul, f"path {path} M={m} N={n} K={k} w={wk} a={ak}")


@pytest.mark.parametrize("path", PATHS, ids=lambda p: PATH_IDS[p])
def test_bound_other_weight_grids(path):
    """No scale, float32 1 x 32 groups (chunked sums), float32 and e4m3 per-row scales, K = 2 mod 32
    (a partial last byte block)."""
    for (m, n, k), wk in itertools.product([(1, 19, 96), (1, 23, 130), (5, 19, 130), (20, 19, 64)], ["none", "f32", "f32row", "e4m3row"]):
        if wk == "f32" and k % 32:
            continue
        args, mul = _case(m, n, k, wk, "bf16", seed=k + m)
        assert not _over(_run(args, mul, path=path), args, mul, f"path {path} M={m} K={k} w={wk}")


@pytest.mark.parametrize("path", PATHS, ids=lambda p: PATH_IDS[p])
def test_bound_nvfp4_k_not_a_multiple_of_32(path):
    """nvfp4 needs K % 16 == 0 only: K = 80 and 208 end in half a 32-code step, whose second 16
    codes do not exist (their scale byte is never read)."""
    for (m, n, k), ak in itertools.product([(1, 21, 80), (3, 21, 208), (17, 21, 80)], ["bf16"]):
        args, mul = _case(m, n, k, "e4m3", ak, seed=k + m)
        assert not _over(_run(args, mul, path=path), args, mul, f"path {path} M={m} K={k}")


@pytest.mark.skipif(W.PATH_AMX not in PATHS, reason="no AMX on this CPU")
def test_bound_amx_large_m_tiled_panels():
    """Packed activations over 1 MB take the AMX 128-row tile-major panels, partial last panel."""
    for wk, ak in [("e8m0", "e4m3"), ("e4m3", "bf16")]:
        args, mul = _case(260, 136, 2048, wk, ak, seed=5)
        assert not _over(_run(args, mul, path=W.PATH_AMX), args, mul, f"M=260 K=2048 w={wk} a={ak}")


def test_default_path_and_wgemm_agree():
    for m in (1, 3, 4, 16):
        args, mul = _case(m, 70, 256, "e4m3", "bf16", seed=m)
        y = W.wgemm(*args, w_scale_mul=mul)
        assert not _over(y, args, mul, f"M={m}")
        assert torch.equal(y, _run(args, mul))


def test_nibble_order_is_the_plugins_packing():
    """Weights quantized and packed by oq_plugin_mxfp4.fp4 (element 2j in the low nibble) give the
    product of their decoded values: the kernel reads the plugin's byte order."""
    fp4 = pytest.importorskip("oq_plugin_mxfp4.fp4")
    gen = torch.Generator().manual_seed(20)
    w = torch.randn(24, 64, generator=gen) * 2
    q = fp4.pack_fp4(fp4.e2m1_encode(w))
    wd = fp4.dequantize_codes(q).double()
    a = torch.randn(2, 64, generator=gen).bfloat16()
    ref = a.double() @ wd.T
    for path in PATHS:
        y = W.wgemm_eager(a, W.BF16, None, None, q, W.E2M1, None, None, path=path)
        bound = 2 * 64 * EPS32 * (a.double().abs() @ wd.abs().T)
        assert ((y.double() - ref).abs() <= bound).all(), f"path {path}"
    y = W.wgemm_eager(a, W.BF16, None, None, q, W.E2M1, None, None)
    swapped = W.wgemm_eager(a, W.BF16, None, None, (q >> 4) | (q << 4), W.E2M1, None, None)
    assert not torch.allclose(y, swapped)  # the order matters, so the check above can fail


def test_e8m0_bytes_outside_the_foldable_range():
    """Bytes whose power of two would take a nonzero e2m1 value below bf16's normal range (0, 1:
    0.5 * 2^-126) redo the product with float32 scales: within the bound, next to the extreme
    foldable bytes 2 and 252 (bytes 253-254 overflow float32 for code 6: no float32 reference);
    byte 255 (NaN) gives NaN."""
    gen = torch.Generator().manual_seed(21)
    m, n, k = 3, 40, 128
    q = _codes(n, k, gen)
    a = torch.randn(m, k, generator=gen).bfloat16()
    sw = torch.randint(118, 136, (n, k // 32), dtype=torch.uint8, generator=gen)
    sw[1, 0], sw[2, 3], sw[5, 1], sw[6, 2] = 1, 252, 0, 2  # 2^-126 (bytes 0 and 1), 2^125 and 2^-125 (in range)
    grid = (1, 32, k // 32)
    for path, mm in itertools.product(PATHS, (1, 3, 20)):
        aa = torch.randn(mm, k, generator=gen)
        aa[:, 96:] *= 2**-20  # the group of byte 252: its sums stay in float32's range
        aa = aa.bfloat16()
        y = W.wgemm_eager(aa, W.BF16, None, None, q, W.E2M1, sw, grid, path=path)
        assert not _violations(y, aa, W.BF16, None, None, q, sw, grid, 1.0, f"path {path} M={mm}")
    sw[7, 2] = 255
    y = W.wgemm_eager(a, W.BF16, None, None, q, W.E2M1, sw, grid)
    assert torch.isnan(y[:, 7]).all() and not torch.isnan(y[:, 6]).any()


def test_w_scale_mul_is_one_multiply_of_the_float32_sum():
    """``w_scale_mul`` multiplies the float32 sum once: exactly ``y(mul=1) * float32(mul)``."""
    args, _ = _case(3, 50, 256, "e4m3", "bf16", seed=22)
    for path in PATHS:
        y1 = _run(args, 1.0, path=path)
        ym = _run(args, MUL, path=path)
        assert torch.equal(ym, y1 * torch.tensor(MUL, dtype=torch.float32)), f"path {path}"


# ---------------------------------------------------------------------------------------------
# epilogue, fallbacks, compile


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: PATH_IDS[p])
def test_epilogue_is_bit_identical_to_torch(path):
    """``bias=`` / ``out_dtype=`` give exactly ``(y + bias.float()).to(out_dtype)`` of the plain
    float32 call (``w_scale_mul`` included in ``y``), on every path and sub-kernel."""
    gen = torch.Generator().manual_seed(23)
    for (m, n, k), (wk, ak) in itertools.product([(1, 37, 96), (3, 70, 256), (12, 40, 256), (40, 72, 224), (257, 72, 64)],
                                                 [("e8m0", "e4m3"), ("e4m3", "bf16"), ("f32", "bf16")]):
        args, mul = _case(m, n, k, wk, ak, seed=24)
        y = _run(args, mul, path=path)
        b32 = torch.randn(n, generator=gen) * 40
        for bias, dt in [(b32, torch.float32), (None, torch.bfloat16), (b32, torch.bfloat16), (b32.bfloat16(), torch.bfloat16)]:
            got = _run(args, mul, path=path, bias=bias, out_dtype=dt)
            ref = (y + bias.float() if bias is not None else y).to(dt)
            assert got.dtype == dt and torch.equal(_bits(got), _bits(ref)), f"path {path} M={m} K={k} w={wk} a={ak} bias={bias is not None} {dt}"


@pytest.fixture(scope="module")
def generic_lib(tmp_path_factory):
    """csrc/wgemm.c built with -DOQ_GENERIC (the portable loops only)."""
    path = str(tmp_path_factory.mktemp("wgemm_fp4_generic") / "wgemm.so")
    try:
        W.LIBRARY.build(path, extra_flags=("-DOQ_GENERIC",))
    except Exception as e:  # pragma: no cover - no compiler
        pytest.skip(f"cannot build the generic kernel: {e}")
    lib = ctypes.CDLL(path)
    W._bind(lib)
    return lib


def test_generic_build_and_torch_fallback(generic_lib, monkeypatch):
    cases = [_case(3, 37, 224, wk, ak, seed=25) for wk, ak in itertools.product(GRIDS, ACTS)]
    for args, mul in cases:
        assert not _over(W.wgemm_eager(*args, w_scale_mul=mul, lib=generic_lib, path=W.PATH_AMX), args, mul, "generic")
    monkeypatch.setenv("OQ_COMPILE", "0")
    for args, mul in cases:
        y = W.wgemm(*args, w_scale_mul=mul)
        assert not _over(y, args, mul, "torch fallback")
        assert torch.equal(y, W.wgemm_reference(*args, w_scale_mul=mul))
        b = torch.randn(37)
        assert torch.equal(_bits(W.wgemm(*args, w_scale_mul=mul, bias=b, out_dtype=torch.bfloat16)), _bits((y + b).bfloat16()))


def test_custom_op_under_torch_compile():
    (a, af, sa, ga, q, qf, sw, gw), mul = _case(3, 40, 256, "e4m3", "bf16", seed=26)
    b = torch.randn(40)

    def f(a, q, sw, b):
        return W.wgemm(a, af, None, None, q, qf, sw, gw, bias=b, out_dtype=torch.bfloat16, w_scale_mul=mul)

    eager = f(a, q, sw, b)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="inductor", fullgraph=True)(a, q, sw, b)
    assert compiled.dtype == torch.bfloat16 and torch.equal(_bits(compiled), _bits(eager))
    torch._dynamo.reset()
    assert torch._dynamo.explain(f)(a, q, sw, b).graph_break_count == 0
    fake = W._wgemm_fake(a, af, None, 1, 1, 1, q, qf, sw, *gw, b, torch.bfloat16, mul)
    assert fake.shape == (3, 40) and fake.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "change,culprit",
    [
        (dict(a=torch.zeros(2, 63, dtype=torch.bfloat16), q=torch.zeros(8, 31, dtype=torch.uint8)), "K must be even"),
        (dict(q=torch.zeros(8, 64, dtype=torch.uint8)), r"\[N, K/2\] = \[N, 32\]"),
        (dict(q=torch.zeros(8, 32, dtype=torch.int8)), "packed uint8"),
        (dict(q=torch.zeros(8, 32, dtype=torch.float16)), "packed uint8"),
        (dict(a_fmt=W.E2M1, a=torch.zeros(2, 64, dtype=torch.uint8)), "a: format 3"),
        (dict(w_scale=torch.ones(8, 1, dtype=torch.float64), w_grid=(1, 64, 1)), "float8_e4m3fn"),
        (dict(w_scale=torch.ones(8, 2).to(torch.float8_e4m3fn), w_grid=(1, 16, 4)), "w_scale"),
        (dict(w_scale_mul="2"), "w_scale_mul"),
        (dict(w_scale_mul=torch.ones(2)), "w_scale_mul"),
    ],
)
def test_bad_arguments_raise_value_error(change, culprit):
    args = dict(a=torch.zeros(2, 64, dtype=torch.bfloat16), a_fmt=W.BF16, a_scale=None, a_grid=None,
                q=torch.zeros(8, 32, dtype=torch.uint8), q_fmt=W.E2M1, w_scale=None, w_grid=None)
    args.update(change)
    with pytest.raises(ValueError, match=culprit):
        W.wgemm(**args)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: PATH_IDS[p])
def test_thread_partitions_give_identical_results(path):
    """Every output is computed the same way whatever the split of N (and, for AMX at large M, of
    M) between threads: 1 and 2 threads agree bit for bit."""
    old = torch.get_num_threads()
    try:
        for (m, n, k), wk in [((1, 600, 512), "e4m3"), ((3, 400, 256), "e8m0"), ((260, 96, 384), "e8m0")]:  # M*N*K >= 2^18: two threads run
            args, mul = _case(m, n, k, wk, "bf16", seed=27)
            torch.set_num_threads(1)
            y1 = _run(args, mul, path=path)
            torch.set_num_threads(2)
            y2 = _run(args, mul, path=path)
            assert torch.equal(_bits(y1), _bits(y2)), f"path {path} M={m} N={n} K={k}"
    finally:
        torch.set_num_threads(old)
