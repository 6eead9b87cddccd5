"""int8 row-wise quantizers with an externally reduced amax (``takes_amax``, tensor parallelism):
given the whole tensor's per-row amax, a column slice of a row-split weight (or a row slice) gets
exactly the bytes and scales it has in the quantized whole tensor, for every implementation that
declares ``takes_amax``."""

from __future__ import annotations

import ctypes

import pytest
import torch
from amax_testutil import poisoned, DTYPES, SLICE_CASES, inputs, slices, u8
from oq_plugin_int8 import cpu
from oq_plugin_int8.quant import quantize_int8_rowwise
from oq_plugin_int8.scheme import PER_TOKEN, WEIGHT

import oqcore
from oqcore.groups import amax_grid, outer_level

SHAPES = ((130, 200), (3, 5), (2, 66, 70))
GROUP = outer_level(WEIGHT.key).group_shape  # per channel: one amax per row of [N, K]


def _impls(fmt=WEIGHT):
    return {impl.name: impl for impl in fmt.implementations if impl.takes_amax}


def test_reference_and_cpu_take_amax():
    assert set(_impls()) == {"torch", "cpu"}
    assert set(_impls(PER_TOKEN)) == {"torch", "cpu"}  # the same implementations serve activations


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_own_amax_gives_same_bytes(dtype):
    """(a) quantize(w, amax=amax_grid(w, per channel)) == quantize(w), byte for byte."""
    for impl_name, impl in _impls().items():
        for shape in SHAPES:
            for case, w in inputs(dtype, shape).items():
                a = amax_grid(w, GROUP)
                assert a.shape == (*shape[:-1], 1)
                q0, s0 = quantize_int8_rowwise(w)
                q1, s1 = impl.quantize(w, None, amax=a)
                where = f"{impl_name} {dtype} {shape} {case}"
                assert q1.dtype == torch.int8 and torch.equal(q1, q0), where
                assert s1.shape == s0.shape and torch.equal(u8(s1), u8(s0)), where


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_slices_concatenate_to_whole(dtype):
    """(b) 2 and 4 slices along K (a row-split weight: the case the core uses) and along N, each
    quantized with the whole tensor's per-row amax (its rows): the bytes concatenate to the whole
    tensor's, every slice's scales are the whole tensor's scales of its rows."""
    checked = 0
    for impl_name, impl in _impls().items():
        for shape in SHAPES:
            for case, w in inputs(dtype, shape, seed=1, names=SLICE_CASES).items():
                q0, s0 = quantize_int8_rowwise(w)
                for dim in (-1, -2):
                    for pieces in (2, 4):
                        parts = slices(w, GROUP, dim, pieces)
                        if parts is None:
                            continue
                        qs = []
                        for ws, a, gidx in parts:
                            q, s = impl.quantize(ws, None, amax=a)
                            where = f"{impl_name} {dtype} {shape} {case} dim={dim} pieces={pieces}"
                            assert torch.equal(u8(s), u8(s0[gidx])), where
                            qs.append(q)
                        q = torch.cat(qs, dim=dim)
                        assert torch.equal(q, q0), f"{where}: {(q != q0).sum().item()} bytes differ"
                        checked += 1
    assert checked >= 2 * 2 * 2 * len(SHAPES)


def test_column_slice_differs_without_amax():
    """The test has teeth: a column slice quantized with its OWN row amax gets other scales."""
    w = torch.randn(64, 256)
    w[:, :128] *= 0.01
    _, s_whole = quantize_int8_rowwise(w)
    _, s_own = quantize_int8_rowwise(w[:, :128])
    _, s_given = quantize_int8_rowwise(w[:, :128], amax=amax_grid(w, GROUP))
    assert not torch.equal(s_own, s_whole) and torch.equal(s_given, s_whole)


def test_wrong_amax_shape_names_both_shapes():
    w = torch.randn(2, 26, 39)
    for impl in _impls().values():
        with pytest.raises(ValueError, match=r"int8 amax for a tensor of shape \[2, 26, 39\].*\[2, 26, 1\], got \[1, 1\]"):
            impl.quantize(w, None, amax=torch.ones(1, 1))


def test_cpu_non_finite():
    """The registered cpu quantizer (checks_finite) still finds NaN/Inf in its slice when given an
    amax (the kernel then runs no amax pass), and refuses a non-finite amax."""
    impl = _impls()["cpu"]
    for w_bad, a_ok, w, a_bad in poisoned(GROUP, (3, 140, 150)):
        with pytest.raises(oqcore.NonFiniteError, match=r"tensor of shape \[3, 140, 150\] holds NaN/Inf"):
            impl.quantize(w_bad, None, amax=a_ok)
        with pytest.raises(oqcore.NonFiniteError, match=r"amax given for the tensor of shape \[3, 140, 150\]"):
            impl.quantize(w, None, amax=a_bad)
        q, s = cpu.quantize_int8_rowwise_cpu(w, amax=a_bad)  # unchecked: the reference's bytes
        rq, rs = quantize_int8_rowwise(w, amax=a_bad)
        assert torch.equal(q, rq) and torch.equal(u8(s), u8(rs))


@pytest.fixture(scope="module")
def generic_lib(tmp_path_factory):
    """The C source built without AVX-512 intrinsics (the portable loops); only requested by tests
    that skip without a compiler."""
    path = str(tmp_path_factory.mktemp("generic_amax") / "k.so")
    cpu.LIBRARY.build(path, "cc", ("-DOQ_GENERIC", "-lm"))  # the tests using it skip without a compiler
    g = ctypes.CDLL(path)
    cpu._bind(g)
    return g


@pytest.mark.skipif(cpu.LIBRARY.load() is None, reason="no C compiler")
def test_generic_build_scaled_matches_reference(generic_lib):
    for dtype in DTYPES:
        for case, w in inputs(dtype, (2, 260, 390), seed=3).items():
            for ws, a, _ in slices(w, GROUP, -1, 2):
                q, s = cpu.quantize_int8_rowwise_cpu(ws, lib=generic_lib, amax=a)
                rq, rs = quantize_int8_rowwise(ws, amax=a)
                assert torch.equal(q, rq) and torch.equal(u8(s), u8(rs)), f"{dtype} {case}"
