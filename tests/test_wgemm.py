"""oq_toolkit.wgemm: the fused CPU GEMM for 8-bit weights, held to its stated error bound.

Bound (module docstring of oq_toolkit.wgemm): ``|y - y_ref| <= 2 * K * eps32 * (|A| @ |W|^T)``
elementwise, ``y_ref`` the float64 product of the float32-dequantized operands, computed here
independently of the module (torch casts, ``ldexp`` for e8m0). Every kernel path this machine can
run (AMX-BF16, AVX512-BF16, portable C) is forced in turn, plus a ``-DOQ_GENERIC`` build, the torch
fallback (``OQ_COMPILE=0``) and the custom op under ``torch.compile``.
"""

from __future__ import annotations

import ctypes
import itertools

import pytest
import torch

import oq_toolkit.wgemm as W

EPS32 = torch.finfo(torch.float32).eps


# ---------------------------------------------------------------------------------------------
# inputs and the independent reference


def _e4m3(r, c, gen, scale=60.0):
    x = (torch.randn(r, c, generator=gen) * scale).clamp(-448, 448)
    x[0, : min(c, 8)] = torch.tensor([0.0, -0.0, 2**-9, -3 * 2**-9, 7 * 2**-9, 448.0, -448.0, 0.0015])[: min(c, 8)]  # subnormals, extremes
    return x.to(torch.float8_e4m3fn).view(torch.uint8)


def _int8(r, c, gen):
    q = torch.randint(-128, 128, (r, c), dtype=torch.int8, generator=gen)
    q[0, :2] = torch.tensor([-128, 127], dtype=torch.int8)[: min(c, 2)]
    return q.view(torch.uint8)


def _grid(kind, r, k, gen):
    """(scale tensor, grid) of a scale layout over an [r, k] operand."""
    if kind == "none":
        return None, None
    f = lambda *s: torch.rand(*s, generator=gen) * 2 + 0.25  # noqa: E731
    if kind == "tensor":
        return f(1), (r, k, 1)
    if kind == "row":
        return f(r, 1), (1, k, 1)
    if kind == "g128":
        nk = -(-k // 128)
        return f(r, nk), (1, 128, nk)
    if kind == "b128":
        nk = -(-k // 128)
        return f(-(-r // 128), nk), (128, 128, nk)
    if kind == "mx":
        nk = -(-k // 32)
        return torch.randint(118, 136, (r, nk), dtype=torch.uint8, generator=gen), (1, 32, nk)
    raise AssertionError(kind)


def _dequant_f32(t, fmt, s, grid):
    """float32 dec(t) * s, as the reference forward computes it."""
    if fmt == W.BF16:
        x = t.float()
    elif fmt == W.E4M3:
        x = t.view(torch.float8_e4m3fn).float()
    else:
        x = t.view(torch.int8).float()
    if s is None:
        return x
    if s.dtype == torch.float32:
        sf = s.reshape(-1)
    else:  # e8m0: 2^(e-127), byte 0 -> 2^-126
        e = s.reshape(-1).to(torch.int32).clamp(min=1)
        sf = torch.ldexp(torch.ones(e.shape), e - 127).float()
    gr, gc, ld = grid
    r, k = x.shape
    idx = (torch.arange(r) // gr)[:, None] * ld + (torch.arange(k) // gc)[None, :]
    return x * sf[idx]


def _check_bound(y, a, af, sa, ga, q, qf, sw, gw, what=""):
    A = _dequant_f32(a, af, sa, ga).double()
    Wd = _dequant_f32(q, qf, sw, gw).double()
    ref = A @ Wd.T
    bound = 2 * A.shape[1] * EPS32 * (A.abs() @ Wd.abs().T)
    assert y.dtype == torch.float32 and y.shape == ref.shape, what
    err = (y.double() - ref).abs()
    bad = err > bound
    assert not bad.any(), f"{what}: {int(bad.sum())} entries over the bound, worst err/bound {float((err / bound.clamp(min=1e-300)).max()):.3g}"
    return ref, bound


# every (weight format, weight grid) x (activation format, activation grid) the plugins use
WEIGHTS = [("e4m3", "tensor"), ("e4m3", "row"), ("e4m3", "b128"), ("e4m3", "mx"), ("int8", "row")]
ACTS = [("bf16", "none"), ("e4m3", "tensor"), ("e4m3", "row"), ("e4m3", "g128"), ("e4m3", "mx")]
FMT = {"bf16": W.BF16, "e4m3": W.E4M3, "int8": W.INT8}
SHAPES = [(1, 72, 200), (3, 257, 224), (12, 129, 256), (17, 200, 200)]  # 12: the M <= 16 one-slot path


def _case(m, n, k, wfmt, wkind, afmt, akind, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = _e4m3(n, k, gen) if wfmt == "e4m3" else _int8(n, k, gen)
    sw, gw = _grid(wkind, n, k, gen)
    if afmt == "bf16":
        a = (torch.randn(m, k, generator=gen) * 3).bfloat16()
    else:
        a = _e4m3(m, k, gen, scale=100.0)
    sa, ga = _grid(akind, m, k, gen)
    return a, FMT[afmt], sa, ga, q, FMT[wfmt], sw, gw


def _combos(k):
    for (wf, wk), (af, ak) in itertools.product(WEIGHTS, ACTS):
        if "mx" in (wk, ak) and k % 32:
            continue  # MX needs K % 32 == 0
        yield wf, wk, af, ak


PATHS = [p for p in (W.PATH_AMX, W.PATH_BF16, W.PATH_SCALAR) if p in W.available_paths()]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: {1: "amx", 2: "avx512bf16", 3: "portable"}[p])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_bound_every_combination(path, m, n, k):
    for wf, wk, af, ak in _combos(k):
        args = _case(m, n, k, wf, wk, af, ak)
        y = W.wgemm_eager(*args, path=path)
        _check_bound(y, *args, what=f"path {path} M={m} N={n} K={k} w={wf}/{wk} a={af}/{ak}")


@pytest.mark.parametrize("path", PATHS, ids=lambda p: {1: "amx", 2: "avx512bf16", 3: "portable"}[p])
def test_bound_m257(path):
    for wf, wk, af, ak in [("e4m3", "b128", "e4m3", "g128"), ("e4m3", "mx", "e4m3", "mx"), ("int8", "row", "bf16", "none")]:
        args = _case(257, 72, 224, wf, wk, af, ak, seed=3)
        _check_bound(W.wgemm_eager(*args, path=path), *args, what=f"path {path} M=257 w={wf}/{wk} a={af}/{ak}")


@pytest.mark.skipif(W.PATH_AMX not in PATHS, reason="no AMX on this CPU")
def test_bound_large_m_tiled_panels():
    """Packed activations over 1 MB (M=300, K=2144) take the AMX 128-row tile-major panels, with
    a partial last panel (N=200) and partial K-groups."""
    for wf, wk, af, ak in [("e4m3", "b128", "e4m3", "g128"), ("e4m3", "tensor", "bf16", "none"), ("int8", "row", "e4m3", "row")]:
        args = _case(300, 200, 2144, wf, wk, af, ak, seed=10)
        _check_bound(W.wgemm_eager(*args, path=W.PATH_AMX), *args, what=f"M=300 K=2144 w={wf}/{wk} a={af}/{ak}")
    args = _case(260, 72, 4096, "e4m3", "mx", "e4m3", "mx", seed=11)
    _check_bound(W.wgemm_eager(*args, path=W.PATH_AMX), *args, what="M=260 K=4096 mx")


def test_wgemm_matches_eager_and_default_path():
    args = _case(5, 33, 256, "e4m3", "b128", "e4m3", "g128", seed=1)
    y = W.wgemm(*args)
    _check_bound(y, *args)
    assert torch.equal(y, W.wgemm_eager(*args))


def test_bound_is_tight_enough_to_catch_bf16_weights():
    """The bound rejects the large-M shortcut of rounding dec(q) * s_fp32 to bf16: it can fail."""
    a, af, sa, ga, q, qf, sw, gw = _case(4, 64, 256, "e4m3", "row", "bf16", "none", seed=2)
    A = _dequant_f32(a, af, sa, ga)
    Wb = _dequant_f32(q, qf, sw, gw).bfloat16().float()
    with pytest.raises(AssertionError, match="over the bound"):
        _check_bound(A @ Wb.T, a, af, sa, ga, q, qf, sw, gw)


def test_e8m0_bytes_outside_the_foldable_range():
    """Bytes whose power of two would leave bf16's normal range (and 255 = NaN) take the float32
    chunk path instead of being folded: still within the bound (NaN where the scale is NaN)."""
    gen = torch.Generator().manual_seed(4)
    m, n, k = 3, 40, 128
    q = _e4m3(n, k, gen)
    a = (torch.randn(m, k, generator=gen)).bfloat16()
    sw = torch.randint(118, 136, (n, k // 32), dtype=torch.uint8, generator=gen)
    sw[1, 0], sw[2, 3], sw[5, 1] = 3, 250, 0  # 2^-124, 2^123, 2^-126
    for path in PATHS:
        y = W.wgemm_eager(a, W.BF16, None, None, q, W.E4M3, sw, (1, 32, k // 32), path=path)
        _check_bound(y, a, W.BF16, None, None, q, W.E4M3, sw, (1, 32, k // 32), what=f"path {path}")
    sw[7, 2] = 255
    y = W.wgemm_eager(a, W.BF16, None, None, q, W.E4M3, sw, (1, 32, k // 32))
    assert torch.isnan(y[:, 7]).all() and not torch.isnan(y[:, 6]).any()


def test_grid_not_a_multiple_of_32_runs_the_portable_loops():
    a, af, sa, ga, q, qf, _, _ = _case(3, 20, 100, "int8", "row", "e4m3", "row", seed=5)
    sw = torch.rand(20, 7) + 0.5  # 1x16 float32 groups
    y = W.wgemm_eager(a, af, sa, ga, q, qf, sw, (1, 16, 7))
    _check_bound(y, a, af, sa, ga, q, qf, sw, (1, 16, 7))


def test_empty_and_int8_activations():
    gen = torch.Generator().manual_seed(6)
    q = _int8(8, 64, gen)
    y = W.wgemm(torch.empty(0, 64, dtype=torch.bfloat16), W.BF16, None, None, q, W.INT8, None, None)
    assert y.shape == (0, 8) and y.dtype == torch.float32
    a8 = _int8(3, 64, gen)
    sa = torch.rand(3) + 0.5
    y = W.wgemm(a8, W.INT8, sa, (1, 64, 1), q, W.INT8, None, None)
    _check_bound(y, a8, W.INT8, sa, (1, 64, 1), q, W.INT8, None, None)


@pytest.mark.parametrize(
    "change,culprit",
    [
        (dict(q=torch.zeros(8, 32, dtype=torch.uint8)), "q"),
        (dict(a=torch.zeros(2, 64)), "bfloat16"),
        (dict(q=torch.zeros(8, 64, dtype=torch.float16)), "1-byte"),
        (dict(q_fmt=W.BF16), "format"),
        (dict(w_scale=torch.ones(4), w_grid=(1, 64, 1)), "w_scale"),
        (dict(w_scale=torch.ones(8, dtype=torch.float64), w_grid=(1, 64, 1)), "float32 or e8m0"),
        (dict(w_scale=torch.ones(8), w_grid=(0, 64, 1)), "rows, cols >= 1"),
        (dict(w_scale=torch.ones(8), w_grid=(1, 64)), "grid"),
        (dict(a_fmt=W.E4M3, a=torch.zeros(2, 64, dtype=torch.int32)), "1-byte"),
    ],
)
def test_inconsistent_arguments_raise_value_error(change, culprit):
    args = dict(a=torch.zeros(2, 64, dtype=torch.bfloat16), a_fmt=W.BF16, a_scale=None, a_grid=None,
                q=torch.zeros(8, 64, dtype=torch.uint8), q_fmt=W.E4M3, w_scale=None, w_grid=None)
    args.update(change)
    with pytest.raises(ValueError, match=culprit):
        W.wgemm(**args)


@pytest.fixture(scope="module")
def generic_lib(tmp_path_factory):
    """csrc/wgemm.c built with -DOQ_GENERIC (no intrinsics: the portable loops only)."""
    path = str(tmp_path_factory.mktemp("wgemm_generic") / "wgemm.so")
    try:
        W.LIBRARY.build(path, extra_flags=("-DOQ_GENERIC",))
    except Exception as e:  # pragma: no cover - no compiler
        pytest.skip(f"cannot build the generic kernel: {e}")
    lib = ctypes.CDLL(path)
    W._bind(lib)
    return lib


def test_generic_build(generic_lib):
    assert W.available_paths(generic_lib) == [W.PATH_SCALAR]
    for wf, wk, af, ak in [("e4m3", "b128", "e4m3", "g128"), ("e4m3", "mx", "e4m3", "mx"), ("int8", "row", "bf16", "none"), ("e4m3", "tensor", "e4m3", "row")]:
        args = _case(3, 37, 224, wf, wk, af, ak, seed=7)
        y = W.wgemm_eager(*args, lib=generic_lib, path=W.PATH_AMX)  # not built: the portable loops run
        _check_bound(y, *args, what=f"generic w={wf}/{wk} a={af}/{ak}")


def test_torch_fallback_without_compiler(monkeypatch):
    monkeypatch.setenv("OQ_COMPILE", "0")
    assert W.kernel_status()[0] is False and "OQ_COMPILE=0" in W.kernel_status()[1]
    for wf, wk, af, ak in [("e4m3", "b128", "e4m3", "g128"), ("e4m3", "mx", "e4m3", "mx"), ("int8", "row", "bf16", "none")]:
        args = _case(3, 130, 224, wf, wk, af, ak, seed=8)
        y = W.wgemm(*args)
        _check_bound(y, *args, what=f"torch fallback w={wf}/{wk} a={af}/{ak}")
        assert torch.equal(y, W.wgemm_reference(*args))


def test_custom_op_under_torch_compile():
    a, af, sa, ga, q, qf, sw, gw = _case(3, 40, 256, "e4m3", "b128", "e4m3", "g128", seed=9)

    def f(a, sa, q, sw):
        return W.wgemm(a, af, sa, ga, q, qf, sw, gw) * 2

    eager = f(a, sa, q, sw)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="inductor", fullgraph=True)(a, sa, q, sw)
    ref, bound = _check_bound(eager / 2, a, af, sa, ga, q, qf, sw, gw)
    assert ((compiled.double() / 2 - ref).abs() <= bound).all()
    torch._dynamo.reset()
    assert torch._dynamo.explain(f)(a, sa, q, sw).graph_break_count == 0
    fake = W._wgemm_fake(a, af, sa, *ga, q, qf, sw, *gw)
    assert fake.shape == (3, 40) and fake.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# epilogue: bias and bf16 output


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def _epilogue_variants(n, gen):
    b32 = torch.randn(n, generator=gen) * 40
    b32[: min(n, 3)] = torch.tensor([0.0, -0.0, 3e-39])[: min(n, 3)]  # signed zero, subnormal
    return [(b32, torch.float32), (None, torch.bfloat16), (b32, torch.bfloat16), (b32.bfloat16(), torch.bfloat16)]


# every AMX sub-kernel (M <= 16 with and without chunk slots, 9..16 pipelined, row slabs, m-pairs,
# tile-major panels), partial tiles in M and N
EPI_SHAPES = [(3, 70, 256), (12, 40, 256), (16, 72, 224), (40, 72, 224), (257, 72, 224), (33, 50, 384)]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: {1: "amx", 2: "avx512bf16", 3: "portable"}[p])
def test_epilogue_is_bit_identical_to_torch(path):
    """``bias=`` / ``out_dtype=`` give exactly ``(y + bias.float()).to(out_dtype)`` of the plain
    float32 call, on every path and sub-kernel, for every scale layout family."""
    gen = torch.Generator().manual_seed(12)
    combos = [("e4m3", "b128", "e4m3", "g128"), ("e4m3", "mx", "e4m3", "mx"), ("int8", "row", "bf16", "none"), ("e4m3", "tensor", "e4m3", "row")]
    shapes = EPI_SHAPES + ([(300, 200, 2144)] if path == W.PATH_AMX else [])
    for (m, n, k), (wf, wk, af, ak) in itertools.product(shapes, combos):
        args = _case(m, n, k, wf, wk, af, ak, seed=13)
        y = W.wgemm_eager(*args, path=path)
        for bias, dt in _epilogue_variants(n, gen):
            got = W.wgemm_eager(*args, path=path, bias=bias, out_dtype=dt)
            ref = (y + bias.float() if bias is not None else y).to(dt)
            assert got.dtype == dt and got.shape == (m, n)
            assert torch.equal(_bits(got), _bits(ref)), f"path {path} M={m} N={n} K={k} w={wf}/{wk} a={af}/{ak} bias={bias is not None} {dt}"


def test_epilogue_rounding_special_values():
    """Zero activations: y = bias exactly, so the bf16 bits are known: ties to even, subnormals
    kept (not flushed), NaN -> 0xFFFF (torch's vectorized conversion), overflow to inf, on every path."""
    vals = [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20, 2.0**-130, -(2.0**-133), float("nan"), float("inf"),
            -float("inf"), 3.4e38, 0.0, -0.0, 65504.0, 1e-45]
    y32 = torch.zeros(len(vals)) + torch.tensor(vals, dtype=torch.float32)  # 0 + -0 = +0, as the kernel's sum
    want = y32.to(torch.bfloat16)
    assert [int(v) & 0xFFFF for v in want.view(torch.int16)[:7].tolist()] == [0x3F80, 0x3F82, 0xBF80, 0x3F81, 0x0008, 0x8001, 0xFFFF]
    n = len(vals)
    bias = torch.tensor(vals, dtype=torch.float32)
    q = torch.full((n, 64), 0x38, dtype=torch.uint8)  # e4m3 1.0
    for m in (1, 12, 40):
        a = torch.zeros(m, 64, dtype=torch.bfloat16)
        for path in PATHS:
            got = W.wgemm_eager(a, W.BF16, None, None, q, W.E4M3, None, None, bias=bias, out_dtype=torch.bfloat16, path=path)
            assert torch.equal(_bits(got), _bits(want.expand(m, n))), f"path {path} M={m}"
            g32 = W.wgemm_eager(a, W.BF16, None, None, q, W.E4M3, None, None, bias=bias, path=path)
            assert torch.equal(_bits(g32), _bits(y32.expand(m, n))), f"path {path} M={m} float32"


def test_epilogue_generic_build_fallback_and_empty(generic_lib, monkeypatch):
    gen = torch.Generator().manual_seed(14)
    args = _case(5, 37, 224, "e4m3", "b128", "e4m3", "g128", seed=15)
    y = W.wgemm_eager(*args)
    b = torch.randn(37, generator=gen)
    ref = (y + b).bfloat16()
    assert torch.equal(_bits(W.wgemm_eager(*args, lib=generic_lib, bias=b, out_dtype=torch.bfloat16)), _bits(ref))
    yr = W.wgemm_reference(*args)
    assert torch.equal(_bits(W.wgemm_reference(*args, bias=b, out_dtype=torch.bfloat16)), _bits((yr + b).bfloat16()))
    monkeypatch.setenv("OQ_COMPILE", "0")
    assert torch.equal(_bits(W.wgemm(*args, bias=b, out_dtype=torch.bfloat16)), _bits((yr + b).bfloat16()))
    monkeypatch.delenv("OQ_COMPILE")
    q = _int8(8, 64, gen)
    y0 = W.wgemm(torch.empty(0, 64, dtype=torch.bfloat16), W.BF16, None, None, q, W.INT8, None, None, out_dtype=torch.bfloat16)
    assert y0.shape == (0, 8) and y0.dtype == torch.bfloat16
    bk = torch.randn(8, generator=gen)
    yk = W.wgemm(torch.empty(3, 0, dtype=torch.bfloat16), W.BF16, None, None, q[:, :0], W.INT8, None, None, bias=bk, out_dtype=torch.bfloat16)
    assert torch.equal(yk, bk.bfloat16().expand(3, 8))  # K = 0: the bias alone


@pytest.mark.parametrize(
    "change,culprit",
    [
        (dict(bias=torch.zeros(7)), r"bias: expected shape \[8\]"),
        (dict(bias=torch.zeros(8, dtype=torch.float64)), "bias: expected float32, bfloat16 or float16"),
        (dict(bias=[0.0] * 8), "bias: expected a CPU tensor"),
        (dict(out_dtype=torch.float16), "out_dtype"),
    ],
)
def test_epilogue_bad_arguments_raise_value_error(change, culprit):
    with pytest.raises(ValueError, match=culprit):
        W.wgemm(torch.zeros(2, 64, dtype=torch.bfloat16), W.BF16, None, None, torch.zeros(8, 64, dtype=torch.uint8), W.E4M3, None, None, **change)


def test_epilogue_custom_op_under_torch_compile():
    a, af, sa, ga, q, qf, sw, gw = _case(3, 40, 256, "e4m3", "b128", "e4m3", "g128", seed=16)
    b = torch.randn(40)

    def f(a, sa, q, sw, b):
        return W.wgemm(a, af, sa, ga, q, qf, sw, gw, bias=b, out_dtype=torch.bfloat16)

    eager = f(a, sa, q, sw, b)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="inductor", fullgraph=True)(a, sa, q, sw, b)
    assert compiled.dtype == torch.bfloat16 and torch.equal(_bits(compiled), _bits(eager))
    assert torch.equal(_bits(eager), _bits((W.wgemm(a, af, sa, ga, q, qf, sw, gw) + b).bfloat16()))
    fake = W._wgemm_fake(a, af, sa, *ga, q, qf, sw, *gw, b, torch.bfloat16)
    assert fake.shape == (3, 40) and fake.dtype == torch.bfloat16


@pytest.mark.parametrize("path", PATHS, ids=lambda p: {1: "amx", 2: "avx512bf16", 3: "portable"}[p])
def test_thread_partitions_give_identical_results(path):
    """Large M with few weight rows splits M between the threads (AMX); every element is computed
    the same way whatever the partition: 1 and 2 threads agree bit for bit, within the bound."""
    old = torch.get_num_threads()
    try:
        for (m, n, k), (wf, wk, af, ak) in [((300, 200, 2144), ("e4m3", "b128", "e4m3", "g128")), ((260, 96, 384), ("e4m3", "row", "bf16", "none")),
                                             ((520, 384, 384), ("e4m3", "b128", "e4m3", "g128"))]:
            args = _case(m, n, k, wf, wk, af, ak, seed=17)
            b = torch.randn(n)
            torch.set_num_threads(1)
            y1 = W.wgemm_eager(*args, path=path, bias=b, out_dtype=torch.bfloat16)
            torch.set_num_threads(2)
            y2 = W.wgemm_eager(*args, path=path, bias=b, out_dtype=torch.bfloat16)
            assert torch.equal(_bits(y1), _bits(y2)), f"path {path} M={m} N={n} K={k}"
            _check_bound(W.wgemm_eager(*args, path=path), *args, what=f"path {path} M={m} N={n} K={k}")
    finally:
        torch.set_num_threads(old)
