"""fp8 quantizers with an externally reduced amax (``takes_amax``, tensor parallelism): given the
whole tensor's amax grid, a slice cut on group boundaries gets exactly the bytes and scales it has
in the quantized whole tensor, for every implementation that declares ``takes_amax``."""

from __future__ import annotations

import ctypes

import pytest
import torch
from amax_testutil import poisoned, DTYPES, SLICE_CASES, inputs, slices, u8
from oq_plugin_fp8 import cpu
from oq_plugin_fp8.keys import KEYS
from oq_plugin_fp8.quant import GROUPINGS, quantize_grouped
from oq_plugin_fp8.scheme import FORMATS

import oqcore
from oqcore.groups import amax_grid, outer_level

WEIGHT_KEYS = ("fp8_per_tensor_static", "fp8_per_channel_static", "fp8_per_block_static")
SHAPES = ((130, 200), (3, 5), (2, 66, 70))
"""Awkward shapes: N, K not multiples of 128 (partial edge blocks), a tiny matrix, an expert stack."""
BLOCK_SHAPES = ((400, 390), (2, 140, 390))
"""For 128x128 blocks: 2 and 4 slices of whole blocks along N and K need more than 3 blocks."""


def _shapes(name):
    return SHAPES + BLOCK_SHAPES if "block" in name else SHAPES

# (dim, groups along it that the cut must respect) per weight key: the cases the core uses, plus
# the others that are valid cuts (a per-channel slice along N keeps whole rows)
SPLITS = {
    "fp8_per_tensor_static": ((-2, None), (-1, None)),
    "fp8_per_channel_static": ((-1, None), (-2, None)),
    "fp8_per_block_static": ((-2, None), (-1, None)),
}


def _impls(name):
    key = KEYS[name][0]
    return {impl.name: impl for impl in FORMATS[key].implementations if impl.takes_amax}


def _grid(scale, name):
    """The scale as its group grid (per-tensor scales are stored ``[..., 1]``)."""
    return scale.unsqueeze(-1) if GROUPINGS[name].tensor_scale else scale


def test_reference_and_cpu_take_amax():
    """The torch reference and the C kernel declare takes_amax for every fp8 key; Triton and
    compiled do not."""
    for name in KEYS:
        assert set(_impls(name)) == {"torch", "cpu"}, name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(KEYS))
def test_own_amax_gives_same_bytes(name, dtype):
    """(a) quantize(w, amax=amax_grid(w, outer level)) == quantize(w), byte for byte."""
    key = KEYS[name][0]
    group = outer_level(key).group_shape
    for impl_name, impl in _impls(name).items():
        for shape in _shapes(name):
            for case, w in inputs(dtype, shape).items():
                q0, s0 = quantize_grouped(w, GROUPINGS[name])
                q1, s1 = impl.quantize(w, None, amax=amax_grid(w, group))
                where = f"{impl_name} {name} {dtype} {shape} {case}"
                assert q1.dtype == torch.float8_e4m3fn and q1.shape == q0.shape, where
                assert torch.equal(u8(q1), u8(q0)), f"{where}: {(u8(q1) != u8(q0)).sum().item()} bytes differ"
                assert s1.shape == s0.shape and torch.equal(u8(s1), u8(s0)), where


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", WEIGHT_KEYS)
def test_slices_concatenate_to_whole(name, dtype):
    """(b) 2 and 4 slices along N and along K, each quantized with the whole tensor's amax grid
    (restricted to its groups): the slices' bytes concatenate to the whole tensor's, and each
    slice's scales are the whole tensor's scales of its groups (per tensor: equal)."""
    key = KEYS[name][0]
    group = outer_level(key).group_shape
    checked = 0
    for impl_name, impl in _impls(name).items():
        for shape in _shapes(name):
            for case, w in inputs(dtype, shape, seed=1, names=SLICE_CASES).items():
                q0, s0 = quantize_grouped(w, GROUPINGS[name])
                g0 = _grid(s0, name)
                for dim, _ in SPLITS[name]:
                    for pieces in (2, 4):
                        parts = slices(w, group, dim, pieces)
                        if parts is None:
                            continue
                        qs = []
                        for ws, a, gidx in parts:
                            q, s = impl.quantize(ws, None, amax=a)
                            where = f"{impl_name} {name} {dtype} {shape} {case} dim={dim} pieces={pieces}"
                            assert torch.equal(u8(_grid(s, name)), u8(g0[gidx])), where
                            qs.append(q)
                        q = torch.cat([u8(x) for x in qs], dim=dim)
                        assert torch.equal(q, u8(q0)), f"{where}: {(q != u8(q0)).sum().item()} bytes differ"
                        checked += 1
    assert checked >= 2 * 2 * 2 * len(SHAPES)  # both impls, both dims, 2 and 4 pieces on most shapes


def test_per_tensor_slice_differs_without_amax():
    """The test has teeth: a per-tensor slice quantized with its OWN amax gets other scales than
    the whole tensor's, so the equality above comes from the given amax."""
    w = torch.randn(256, 256)
    w[:128] *= 0.01
    g = GROUPINGS["fp8_per_tensor_static"]
    _, s_whole = quantize_grouped(w, g)
    _, s_own = quantize_grouped(w[:128], g)
    _, s_given = quantize_grouped(w[:128], g, amax_grid(w, oqcore.GroupShape.PER_TENSOR))
    assert not torch.equal(s_own, s_whole) and torch.equal(s_given, s_whole)


@pytest.mark.parametrize("name", WEIGHT_KEYS)
def test_wrong_amax_shape_names_both_shapes(name):
    w = torch.randn(2, 260, 390)
    for impl in _impls(name).values():
        with pytest.raises(ValueError, match=r"amax for a tensor of shape \[2, 260, 390\].*got \[7\]"):
            impl.quantize(w, None, amax=torch.ones(7))


@pytest.mark.parametrize("name", WEIGHT_KEYS)
def test_cpu_non_finite(name):
    """The registered cpu quantizer (checks_finite) still finds NaN/Inf in its slice when given an
    amax (its kernel then runs no amax pass), and refuses a non-finite amax (another rank's NaN)."""
    impl = _impls(name)["cpu"]
    group = outer_level(KEYS[name][0]).group_shape
    for w_bad, a_ok, w, a_bad in poisoned(group, (3, 140, 150)):
        with pytest.raises(oqcore.NonFiniteError, match=r"tensor of shape \[3, 140, 150\] holds NaN/Inf"):
            impl.quantize(w_bad, None, amax=a_ok)
        with pytest.raises(oqcore.NonFiniteError, match=r"amax given for the tensor of shape \[3, 140, 150\]"):
            impl.quantize(w, None, amax=a_bad)
        # unchecked: the reference's bytes for the same arguments
        q, s = cpu.quantize_fp8_grouped(w, GROUPINGS[name], amax=a_bad)
        rq, rs = quantize_grouped(w, GROUPINGS[name], a_bad)
        assert torch.equal(u8(q), u8(rq)) and torch.equal(u8(s), u8(rs))


@pytest.fixture(scope="module")
def generic_lib(tmp_path_factory):
    """The C source built without AVX-512 intrinsics (the portable loops); only requested by tests
    that skip without a compiler."""
    path = str(tmp_path_factory.mktemp("generic_amax") / "k.so")
    cpu.LIBRARY.build(path, "cc", ("-DOQ_GENERIC",))  # the tests using it skip without a compiler
    g = ctypes.CDLL(path)
    cpu._bind(g)
    return g


@pytest.mark.skipif(cpu.load_library() is None, reason="no C compiler")
def test_generic_build_scaled_matches_reference(generic_lib):
    for name in WEIGHT_KEYS:
        group = outer_level(KEYS[name][0]).group_shape
        for dtype in DTYPES:
            for case, w in inputs(dtype, (2, 260, 390), seed=3).items():
                for ws, a, _ in slices(w, group, -1, 2):
                    q, s = cpu.quantize_fp8_grouped(ws, GROUPINGS[name], lib=generic_lib, amax=a)
                    rq, rs = quantize_grouped(ws, GROUPINGS[name], a)
                    assert torch.equal(u8(q), u8(rq)) and torch.equal(u8(s), u8(rs)), f"{name} {dtype} {case}"
