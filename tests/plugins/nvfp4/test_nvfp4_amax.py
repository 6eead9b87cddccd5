"""nvfp4 quantizers with an externally reduced amax (``takes_amax``, tensor parallelism): the
outermost scale level is the per-tensor (per-expert) global scale; given the whole tensor's amax, a
slice of N, or of K on 16-element blocks, gets exactly the bytes it has in the quantized whole
tensor (global scale equal, block scales the slice's part), for every implementation that declares
``takes_amax``."""

from __future__ import annotations

import pytest
import torch
from amax_testutil import poisoned, DTYPES, SLICE_CASES, inputs, slices, u8
from oq_plugin_nvfp4 import cpu
from oq_plugin_nvfp4.keys import NV_BLOCK
from oq_plugin_nvfp4.quant import global_scale_from_amax, quantize_nvfp4
from oq_plugin_nvfp4.scheme import DYNAMIC, WEIGHT

import oqcore
from oqcore.groups import amax_grid, outer_level

SHAPES = ((130, 160), (3, 32), (2, 66, 80))
"""N not a multiple of 128 / 16, K a multiple of 16 (nvfp4's rule), a tiny matrix, an expert stack."""
GROUP = outer_level(WEIGHT.key).group_shape  # scale2: per tensor


def _impls(fmt=WEIGHT):
    return {impl.name: impl for impl in fmt.implementations if impl.takes_amax}


def _same(a, b, where):
    qa, sa, ga = a
    qb, sb, gb = b
    assert torch.equal(u8(qa), u8(qb)), f"{where}: {(u8(qa) != u8(qb)).sum().item()} bytes differ"
    assert sa.dtype == torch.float8_e4m3fn and torch.equal(u8(sa), u8(sb)), where
    assert ga.shape == gb.shape and torch.equal(u8(ga), u8(gb)), where


def test_reference_and_cpu_take_amax():
    assert set(_impls()) == {"torch", "cpu"}
    assert set(_impls(DYNAMIC)) == {"torch", "cpu"}
    assert GROUP.is_per_tensor


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_own_amax_gives_same_bytes(dtype):
    """(a) quantize(w, amax=amax_grid(w, per tensor)) == quantize(w), byte for byte."""
    for impl_name, impl in _impls().items():
        for shape in SHAPES:
            for case, w in inputs(dtype, shape).items():
                a = amax_grid(w, GROUP)
                assert a.shape == (*shape[:-2], 1, 1)
                _same(impl.quantize(w, None, amax=a), quantize_nvfp4(w), f"{impl_name} {dtype} {shape} {case}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_slices_concatenate_to_whole(dtype):
    """(b) 2 and 4 slices along N and along K (on 16-element blocks), each quantized with the whole
    tensor's amax: codes and block scales concatenate to the whole tensor's, every global scale
    equals the whole tensor's."""
    checked = 0
    for impl_name, impl in _impls().items():
        for shape in SHAPES:
            for case, w in inputs(dtype, shape, seed=1, names=SLICE_CASES).items():
                q0, s0, g0 = quantize_nvfp4(w)
                for dim in (-2, -1):
                    for pieces in (2, 4):
                        parts = slices(w, GROUP, dim, pieces, cut_group=NV_BLOCK if dim == -1 else None)
                        if parts is None:
                            continue
                        qs, ss = [], []
                        for ws, a, _ in parts:
                            q, s, g = impl.quantize(ws, None, amax=a)
                            where = f"{impl_name} {dtype} {shape} {case} dim={dim} pieces={pieces}"
                            assert torch.equal(u8(g), u8(g0)), where
                            qs.append(u8(q))
                            ss.append(u8(s))
                        q, s = torch.cat(qs, dim=dim), torch.cat(ss, dim=dim)
                        assert torch.equal(q, u8(q0)), f"{where}: {(q != u8(q0)).sum().item()} bytes differ"
                        assert torch.equal(s, u8(s0)), where
                        checked += 1
    assert checked >= 2 * 2 * 2 * len(SHAPES)


def test_slice_differs_without_amax():
    """The test has teeth: a slice quantized with its OWN amax gets another global scale."""
    w = torch.randn(64, 256)
    w[:32] *= 0.01
    g_whole = quantize_nvfp4(w)[2]
    assert not torch.equal(quantize_nvfp4(w[:32])[2], g_whole)
    assert torch.equal(quantize_nvfp4(w[:32], amax=amax_grid(w, GROUP))[2], g_whole)
    assert torch.equal(g_whole, global_scale_from_amax(w.abs().amax().reshape(1)))


def test_bad_amax():
    w = torch.randn(2, 26, 32)
    for impl in _impls().values():
        with pytest.raises(ValueError, match=r"nvfp4 amax for a tensor of shape \(2, 26, 32\) must have shape \[2, 1, 1\].*got \[2, 1\]"):
            impl.quantize(w, None, amax=torch.ones(2, 1))
    with pytest.raises(ValueError, match="global_scale or amax, not both"):
        quantize_nvfp4(w, amax=torch.ones(2, 1, 1), global_scale=torch.ones(2, 1))


def test_cpu_non_finite():
    """The registered cpu quantizer (checks_finite) still finds NaN/Inf in its slice when given an
    amax, and refuses a non-finite amax (another rank's NaN)."""
    impl = _impls()["cpu"]
    for w_bad, a_ok, w, a_bad in poisoned(GROUP, (3, 40, 48)):
        with pytest.raises(oqcore.NonFiniteError, match=r"tensor of shape \[3, 40, 48\] holds NaN/Inf"):
            impl.quantize(w_bad, None, amax=a_ok)
        with pytest.raises(oqcore.NonFiniteError, match=r"amax given for the tensor of shape \[3, 40, 48\]"):
            impl.quantize(w, None, amax=a_bad)


def test_reference_path_checks_finite(monkeypatch):
    """Without the kernel (no compiler, OQ_COMPILE=0) the cpu quantizer runs the reference with the
    given amax, and still raises NonFiniteError for NaN in its slice."""
    monkeypatch.setattr(cpu, "load_library", lambda: None)
    w = torch.randn(2, 8, 32)
    a = amax_grid(w, GROUP) * 2  # as if another slice held the larger values
    _same(cpu.quantize_nvfp4_checked(w, amax=a), quantize_nvfp4(w, amax=a), "reference path")
    w[1, 1, 1] = float("nan")
    with pytest.raises(oqcore.NonFiniteError):
        cpu.quantize_nvfp4_checked(w, amax=a)
