"""The Triton MXFP4 kernels (under TRITON_INTERPRET=1, set by tests/conftest.py) against float32
references built from ``oq_plugin_mxfp4.fp4`` decoding times the e8m0 scales: the linear GEMM
(W4A16 in float32 / bf16 / fp16, W4A8 on MXFP8 activations) and the fused MoE (4 experts, top-2,
with and without biases, stacked and GPT-OSS-interleaved gate / up), within the float32
rounding-order bound of tests/fp4_kernel_reference.py; every code times every finite scale byte
decoded exactly; NaN scales propagate as in the reference; shape errors name the operand."""

import zlib
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")
kg = pytest.importorskip("oq_plugin_mxfp4.kernels.gemm")

from fp4_kernel_reference import (
    Recorder,
    assert_within,
    check_moe,
    gemm_bound,
    gptoss_interleaved,
    random_codes,
    silu_concat,
)
from oq_plugin_mxfp4 import fp4
from oq_plugin_mxfp4.kernels.moe import fused_moe_mxfp4
from oq_plugin_mxfp4.kernels.quant import quantize_mxfp4_triton
from oq_plugin_mxfp4.quant import Mxfp4Options, quantize_mxfp4
from oq_plugin_mxfp4.kernels.support import triton_supported_w4a4, triton_supported_w4a8, triton_supported_w4a16
from oq_plugin_mxfp8.kernels.quant import quantize_mxfp8_triton
from oq_plugin_mxfp8.quant import Mxfp8Options, exponent_to_scale, quantize_mxfp8

from oqcore.layers import MoELayout

mxfp4_gemm = kg.mxfp4_gemm


def mx_weight(shape, g, lo=122, hi=130):
    """Random packed MXFP4 weight ``shape = (..., N, K)``: ``(packed uint8 [..., K/2], scale
    float8_e8m0fnu [..., K/32], dequantized float32 [..., K])``, scale exponents in [lo, hi)."""
    codes = random_codes(shape, g)
    e = torch.randint(lo, hi, (*shape[:-1], shape[-1] // 32), generator=g, dtype=torch.uint8)
    return fp4.pack_fp4(codes), e.view(torch.float8_e8m0fnu), mx_dequant(fp4.pack_fp4(codes), e)


def mx_dequant(packed, e):
    """float32 reference dequantization: ``e2m1 * 2**(e - 127)`` per 32 along the last dim."""
    return fp4.dequantize_codes(packed) * exponent_to_scale(e.view(torch.uint8)).repeat_interleave(32, -1)


def mxfp8_dequant(q, s):
    return q.float() * exponent_to_scale(s.view(torch.uint8)).repeat_interleave(32, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("N,K", [(33, 64), (45, 96)])
def test_gemm_w4a16(M, N, K, dtype):
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    w, ws, wd = mx_weight((N, K), g)
    a = torch.randn(M, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype) if M != 3 else None
    y = mxfp4_gemm(a, None, w, ws, bias)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    af = a.float()
    ref = af @ wd.T + (0 if bias is None else bias.float())
    assert_within(y, ref, gemm_bound(af, wd, bias), f"W4A16 {dtype} M={M} N={N} K={K}")


@pytest.mark.parametrize("mode", ["rceil", "floor"])
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("N,K", [(33, 64), (7, 96)])
def test_gemm_w4a8_on_the_same_quantized_activations(M, N, K, mode):
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K + 7)
    w, ws, wd = mx_weight((N, K), g)
    x = torch.randn(M, K, generator=g).bfloat16() * 3
    q, s = quantize_mxfp8_triton(x, Mxfp8Options(scale_mode=mode))
    bias = torch.randn(N, generator=g) if M != 1 else None
    y = mxfp4_gemm(q, s, w, ws, bias)
    ad = mxfp8_dequant(q, s)
    ref = ad @ wd.T + (0 if bias is None else bias)
    assert_within(y, ref, gemm_bound(ad, wd, bias), f"W4A8 {mode} M={M} N={N} K={K}")


@pytest.mark.parametrize("mode", ["rceil", "floor"])
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("N,K", [(33, 64), (7, 96)])
def test_gemm_w4a4_on_the_same_quantized_activations(M, N, K, mode):
    """Activations MXFP4-quantized by the Triton quantizer (the reference's bytes, see
    test_mxfp4_triton_quant.py), packed e2m1 [M, K/2] into the GEMM."""
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K + 11)
    w, ws, wd = mx_weight((N, K), g)
    x = torch.randn(M, K, generator=g).bfloat16() * 3
    q, s = quantize_mxfp4_triton(x, Mxfp4Options(scale_mode=mode))
    assert q.dtype == torch.uint8 and q.shape == (M, K // 2)
    bias = torch.randn(N, generator=g) if M != 3 else None
    y = mxfp4_gemm(q, s, w, ws, bias)
    ad = mx_dequant(q, s)
    ref = ad @ wd.T + (0 if bias is None else bias)
    assert_within(y, ref, gemm_bound(ad, wd, bias), f"W4A4 {mode} M={M} N={N} K={K}")


def onehot_weight():
    """``[N=48, K=64]`` packed weight where row n, element k holds code ``(n + 3k) % 16`` (every code
    in both nibble positions) and scale bytes spread over every finite-result exponent 0..252
    (byte 0 decodes as 2**-126, exponent_to_scale's rule; 6 * 2**(252-127) is the largest finite)."""
    n, k = torch.arange(48)[:, None], torch.arange(64)[None, :]
    codes = ((n + 3 * k) % 16).to(torch.uint8)
    e = torch.linspace(0, 252, 96).round().to(torch.uint8).reshape(48, 2)
    return fp4.pack_fp4(codes), e


@pytest.mark.parametrize("path", ["f32", "bf16", "fp16", "w4a8", "w4a4"])
def test_every_code_and_scale_decodes_exactly(path):
    """``eye(K) @ W.T`` is exactly ``W.T`` (one nonzero product per output): the decode of every
    nibble (both positions) and every finite scale exponent, bit for bit, on each dot path."""
    w, e = onehot_weight()
    wd = mx_dequant(w, e)
    eye = torch.eye(64)
    unit = torch.full((64, 2), 127, dtype=torch.uint8)  # activation scale 2**0
    if path == "w4a8":
        y = mxfp4_gemm(eye.to(torch.float8_e4m3fn), unit, w, e)
    elif path == "w4a4":
        y = mxfp4_gemm(fp4.pack_fp4(fp4.e2m1_encode(eye)), unit, w, e)  # code 2 is 1.0
    else:
        dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[path]
        y = mxfp4_gemm(eye.to(dtype), None, w, e.view(torch.float8_e8m0fnu))
    assert torch.equal(y, wd.T), f"{path}: {(y != wd.T).sum().item()} elements differ"
    assert (wd.T[wd.T != 0].abs().min() <= 2.0**-126) and (wd.abs().max() >= 2.0**125)


def test_nan_scale_poisons_its_column_only():
    """Scale byte 255 is NaN (as ``exponent_to_scale``): the column whose block has it is NaN in every
    row, as the reference's ``F.linear`` over a NaN weight; the other columns stay exact."""
    g = torch.Generator().manual_seed(3)
    w, ws, wd = mx_weight((5, 64), g)
    e = ws.view(torch.uint8).clone()
    e[2, 1] = 255
    a = torch.randn(3, 64, generator=g)
    y = mxfp4_gemm(a, None, w, e)
    assert torch.isnan(y[:, 2]).all() and not torch.isnan(y[:, [0, 1, 3, 4]]).any()
    keep = [0, 1, 3, 4]
    assert_within(y[:, keep], a @ wd[keep].T, gemm_bound(a, wd[keep]), "NaN scale")


@pytest.mark.parametrize(
    "act,mode,bias,gate,dtype",
    [
        (None, None, False, "concat", torch.float32),
        (None, None, True, "interleaved", torch.float32),
        (None, None, True, "concat", torch.bfloat16),
        (None, None, False, "interleaved", torch.float16),
        ("mxfp8", "rceil", False, "concat", torch.bfloat16),
        ("mxfp8", "rceil", True, "interleaved", torch.bfloat16),
        ("mxfp8", "floor", True, "concat", torch.float32),
        ("mxfp4", "rceil", True, "interleaved", torch.bfloat16),
        ("mxfp4", "floor", False, "concat", torch.float32),
    ],
)
def test_fused_moe(act, mode, bias, gate, dtype):
    """4 experts, top-2, 9 tokens (one slot masked with id E, as transformers marks dropped slots),
    H = 64, I = 96, W4A16 / W4A8 (mxfp8) / W4A4 (mxfp4): gate-up against an independent reference
    (on the reference quantizer's activations), then the down GEMM, weighting and top-k sum against
    a reference fed with the kernel's own intermediate (see ``Recorder``)."""
    E, H, I, T, k = 4, 64, 96, 9, 2
    g = torch.Generator().manual_seed(zlib.crc32(f"{act} {mode} {bias} {gate} {dtype}".encode()))
    w13, s13, w13d = mx_weight((E, 2 * I, H), g)
    w2, s2, w2d = mx_weight((E, H, I), g, 120, 126)
    b13 = torch.randn(E, 2 * I, generator=g).to(dtype) if bias else None
    b2 = torch.randn(E, H, generator=g).to(dtype) if bias else None
    x = (torch.randn(T, H, generator=g) * 0.5).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int64)
    ids[4, 1] = E
    wts = torch.softmax(torch.randn(T, k, generator=g), -1)
    rec = Recorder(silu_concat if gate == "concat" else gptoss_interleaved)
    opts = {"mxfp8": Mxfp8Options, "mxfp4": Mxfp4Options}[act](scale_mode=mode) if act else None
    y = fused_moe_mxfp4(x, ids, wts, w13, s13, w2, s2, rec, w13_bias=b13, w2_bias=b2, act_mx=act or False, options=opts)
    assert y.dtype == dtype and y.shape == (T, H)
    if act == "mxfp8":

        def h_in(h):
            return mxfp8_dequant(*quantize_mxfp8(h, opts))
    elif act == "mxfp4":

        def h_in(h):
            return mx_dequant(*quantize_mxfp4(h, opts))
    else:

        def h_in(h):
            return h.to(dtype).float()

    a_in = h_in(x) if act else x.float()
    y_ref = check_moe(y, rec, a_in, h_in, ids, wts, w13d, b13, w2d, b2, dtype, f"moe act={act} bias={bias} {gate}")
    # token 4's masked slot contributes nothing; the routed slot alone gives its output
    assert y_ref[4].abs().max() > 0


def test_fused_moe_no_tokens():
    g = torch.Generator().manual_seed(0)
    w13, s13, _ = mx_weight((4, 64, 32), g)
    w2, s2, _ = mx_weight((4, 32, 32), g)
    x = torch.zeros(0, 32)
    y = fused_moe_mxfp4(x, torch.zeros(0, 2, dtype=torch.int64), torch.zeros(0, 2), w13, s13, w2, s2, silu_concat)
    assert y.shape == (0, 32)


def test_shape_errors_name_the_operand():
    g = torch.Generator().manual_seed(0)
    w, ws, _ = mx_weight((8, 64), g)
    with pytest.raises(ValueError, match=r"K = 48 must be a multiple of 32"):
        mxfp4_gemm(torch.randn(2, 48), None, w[:, :24], ws[:, :1])
    with pytest.raises(ValueError, match=r"w must be packed e2m1 bytes \[N, K/2\] = \[8, 32\]"):
        mxfp4_gemm(torch.randn(2, 64), None, w[:, :16], ws)
    with pytest.raises(ValueError, match=r"w_scale must be one byte per 32 elements, \[8, 2\]"):
        mxfp4_gemm(torch.randn(2, 64), None, w, ws[:, :1])
    with pytest.raises(ValueError, match=r"a_scale must be e8m0 bytes \[M, K/32\] = \[2, 2\]"):
        mxfp4_gemm(torch.randn(2, 64).to(torch.float8_e4m3fn), ws[:2, :1], w, ws)
    with pytest.raises(ValueError, match=r"bias must be \[N\] = \[8\]"):
        mxfp4_gemm(torch.randn(2, 64), None, w, ws, torch.zeros(7))
    w13, s13, _ = mx_weight((4, 80, 64), g)
    w2, s2, _ = mx_weight((4, 64, 64), g)
    ids, wts = torch.zeros(3, 2, dtype=torch.int64), torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"I = 40 must be positive multiples of 32"):
        fused_moe_mxfp4(torch.randn(3, 64), ids, wts, w13, s13, w2, s2, silu_concat)
    w13, s13, _ = mx_weight((4, 64, 64), g)
    with pytest.raises(ValueError, match=r"w2 must have shape \[4, 64, 16\]"):
        fused_moe_mxfp4(torch.randn(3, 64), ids, wts, w13, s13, w2, s2, silu_concat)
    with pytest.raises(ValueError, match=r"w13_bias must have shape \[4, 64\]"):
        fused_moe_mxfp4(
            torch.randn(3, 64),
            ids,
            wts,
            w13,
            s13,
            w2[:, :, :16],
            s2[:, :, :1],
            silu_concat,
            w13_bias=torch.zeros(4, 32),
        )


def test_supported_checks_device_and_shapes():
    lin = SimpleNamespace(in_features=64)
    for fn in (triton_supported_w4a16, triton_supported_w4a8, triton_supported_w4a4):
        ok, why = fn(lin, torch.device("cpu"))
        assert ok and "TRITON_INTERPRET=1" in why, why
        ok, why = fn(SimpleNamespace(in_features=48), torch.device("cpu"))
        assert not ok and "in_features = 48 is not a positive multiple of 32" in why, why
        moe = SimpleNamespace(layout=MoELayout(4, 64, 80, False, True, False))
        ok, why = fn(moe, torch.device("cpu"))
        assert not ok and "intermediate_size = 80" in why, why
        ok, why = fn(lin, torch.device("meta"))
        assert not ok and "Triton runs on CUDA" in why, why
    assert "sm_89" in triton_supported_w4a8(lin, torch.device("cpu"))[1]
    assert "sm_80" in triton_supported_w4a16(lin, torch.device("cpu"))[1]
    assert "sm_80" in triton_supported_w4a4(lin, torch.device("cpu"))[1]
