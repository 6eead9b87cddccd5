"""The Triton NVFP4 weight-only kernels (under TRITON_INTERPRET=1, set by tests/conftest.py) against
float32 references built from ``oq_plugin_mxfp4.fp4`` decoding times ``scale.float() / global``
(compressed-tensors' convention): the linear GEMM in float32 / bf16 / fp16 (K = 48, 64, 96: K % 32
== 16 runs a half-masked last step) and the fused MoE (4 experts, top-2, one global scale per
expert, with and without biases, stacked and GPT-OSS-interleaved gate / up), within the float32
rounding-order bound of tests/fp4_kernel_reference.py; every code times every finite e4m3 scale
byte decoded exactly; shape errors name the operand."""

import zlib
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")
kg = pytest.importorskip("oq_plugin_nvfp4.kernels.gemm")

from fp4_kernel_reference import (
    Recorder,
    assert_within,
    cast_bound,
    check_moe,
    gemm_bound,
    gptoss_interleaved,
    random_codes,
    silu_concat,
)
from oq_plugin_mxfp4 import fp4
from oq_plugin_nvfp4.kernels.moe import fused_moe_nvfp4
from oq_plugin_nvfp4.kernels.quant import quantize_nvfp4_triton
from oq_plugin_nvfp4.kernels.support import triton_supported
from oq_plugin_nvfp4.quant import quantize_nvfp4

from oqcore.layers import MoELayout

nvfp4_gemm = kg.nvfp4_gemm


def nv_dequant(packed, scale, glob):
    """float32 reference: ``e2m1 * (scale.float() / global)`` per 16 along the last dim; ``glob``
    ``[1]`` or ``[E, 1]`` (broadcast over the leading expert dim)."""
    s = scale.float() / (glob.reshape(-1, *([1] * (scale.dim() - 1))) if glob.numel() > 1 else glob)
    return fp4.dequantize_codes(packed) * s.repeat_interleave(16, -1)


def nv_weight(shape, g, amax=3.0):
    """Random packed NVFP4 weight ``shape = (..., N, K)``: ``(packed uint8 [..., K/2], scale
    float8_e4m3fn [..., K/16], global float32)``; block scales spread over the e4m3 normal range
    (2**-6 .. 448), global ``448 * 6 / amax`` ([1], or [E, 1] with a different amax per expert)."""
    codes = random_codes(shape, g)
    sc = torch.exp2(torch.rand(*shape[:-1], shape[-1] // 16, generator=g) * 14.8 - 6).to(torch.float8_e4m3fn)
    if len(shape) == 3:
        glob = 448 * 6 / (amax * (1 + torch.arange(shape[0], dtype=torch.float32)[:, None]))
    else:
        glob = torch.tensor([448 * 6 / amax])
    packed = fp4.pack_fp4(codes)
    return packed, sc, glob, nv_dequant(packed, sc, glob)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("N,K", [(33, 64), (45, 96), (7, 48)])
def test_gemm_w4a16(M, N, K, dtype):
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    w, sc, glob, wd = nv_weight((N, K), g)
    a = torch.randn(M, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype) if M != 3 else None
    y = nvfp4_gemm(a, w, sc, glob, bias)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    af = a.float()
    ref = af @ wd.T + (0 if bias is None else bias.float())
    assert_within(y, ref, gemm_bound(af, wd, bias), f"nvfp4 {dtype} M={M} N={N} K={K}")


@pytest.mark.parametrize("path", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("glob", [1.0, 0.25])
def test_every_code_and_scale_decodes_exactly(path, glob):
    """``eye(K) @ W.T`` is exactly ``W.T`` (one nonzero product per output; a power-of-two global
    scale divides exactly): every nibble in both positions times every finite e4m3 byte (both signs,
    subnormals included), bit for bit."""
    N, K = 32, 128
    n, k = torch.arange(N)[:, None], torch.arange(K)[None, :]
    codes = ((n + 3 * k) % 16).to(torch.uint8)
    finite = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    assert finite.numel() == 254  # 256 slots: all of them, then the first two again
    sc = torch.cat([finite, finite[:2]]).reshape(N, K // 16).view(torch.float8_e4m3fn)
    w, gl = fp4.pack_fp4(codes), torch.tensor([glob])
    wd = nv_dequant(w, sc, gl)
    y = nvfp4_gemm(torch.eye(K).to(path), w, sc, gl)
    assert torch.equal(y, wd.T), f"{(y != wd.T).sum().item()} elements differ"


@pytest.mark.parametrize("K", [64, 48])
def test_nan_scale_poisons_its_column_only(K):
    """e4m3 byte 0xFF is NaN: its column is NaN in every row (the reference's F.linear over a NaN
    weight), the other columns stay within the bound. With K = 48 the NaN is row 2's first block,
    which row 1's half-masked last step would read if the tile were not masked beyond K."""
    g = torch.Generator().manual_seed(3)
    w, sc, glob, wd = nv_weight((5, K), g)
    sc = sc.view(torch.uint8).clone()
    sc[2, 3 if K == 64 else 0] = 0xFF  # e4m3fn NaN
    a = torch.randn(3, K, generator=g)
    y = nvfp4_gemm(a, w, sc, glob)
    keep = [0, 1, 3, 4]
    assert torch.isnan(y[:, 2]).all() and not torch.isnan(y[:, keep]).any()
    assert_within(y[:, keep], a @ wd[keep].T, gemm_bound(a, wd[keep]), "NaN scale")


@pytest.mark.parametrize(
    "bias,gate,dtype,I",
    [
        (False, "concat", torch.float32, 96),
        (True, "interleaved", torch.float32, 48),
        (True, "concat", torch.bfloat16, 48),
        (False, "interleaved", torch.float16, 96),
    ],
)
def test_fused_moe(bias, gate, dtype, I):
    """4 experts, top-2, 9 tokens (one slot masked with id E), H = 64, each expert its own global
    scale: gate-up against an independent reference, then the down GEMM (K = I, 48 runs a
    half-masked step), weighting and top-k sum against a reference fed with the kernel's own
    intermediate (see ``Recorder``)."""
    E, H, T, k = 4, 64, 9, 2
    g = torch.Generator().manual_seed(zlib.crc32(f"{bias} {gate} {dtype} {I}".encode()))
    w13, s13, g13, w13d = nv_weight((E, 2 * I, H), g)
    w2, s2, g2, w2d = nv_weight((E, H, I), g, amax=40.0)
    b13 = torch.randn(E, 2 * I, generator=g).to(dtype) if bias else None
    b2 = torch.randn(E, H, generator=g).to(dtype) if bias else None
    x = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int64)
    ids[4, 1] = E
    wts = torch.softmax(torch.randn(T, k, generator=g), -1)
    rec = Recorder(silu_concat if gate == "concat" else gptoss_interleaved)
    y = fused_moe_nvfp4(x, ids, wts, w13, s13, g13, w2, s2, g2, rec, w13_bias=b13, w2_bias=b2)
    assert y.dtype == dtype and y.shape == (T, H)
    check_moe(
        y,
        rec,
        x.float(),
        lambda h: h.to(dtype).float(),
        ids,
        wts,
        w13d,
        b13,
        w2d,
        b2,
        dtype,
        f"nvfp4 moe bias={bias} {gate}",
    )


def test_per_expert_global_scale_is_used():
    """Experts identical but for their global scale: each token's output scales with 1 / global of
    the expert it was routed to (a kernel reading global[0] for every expert fails this)."""
    g = torch.Generator().manual_seed(5)
    w13, s13, _, _ = nv_weight((1, 64, 32), g)
    w2, s2, _, _ = nv_weight((1, 32, 32), g)
    E = 3
    rep = lambda t: t.expand(E, *t.shape[1:]).contiguous()
    x = torch.randn(1, 32, generator=g).expand(E, 32).contiguous()
    ids = torch.arange(E)[:, None]
    wts = torch.ones(E, 1)
    ones = torch.ones(E, 1)
    g2 = torch.tensor([[1.0], [2.0], [0.5]])
    y = fused_moe_nvfp4(x, ids, wts, rep(w13), rep(s13), ones, rep(w2), rep(s2), g2, silu_concat)
    assert torch.equal(y[1] * 2, y[0]) and torch.equal(y[2] * 0.5, y[0]) and y[0].abs().max() > 0


def test_shape_errors_name_the_operand():
    g = torch.Generator().manual_seed(0)
    w, sc, glob, _ = nv_weight((8, 64), g)
    with pytest.raises(ValueError, match=r"K = 40 must be a multiple of 16"):
        nvfp4_gemm(torch.randn(2, 40), w[:, :20], sc[:, :2], glob)
    with pytest.raises(ValueError, match=r"w_scale must be one byte per 16 elements, \[8, 4\]"):
        nvfp4_gemm(torch.randn(2, 64), w, sc[:, :2], glob)
    with pytest.raises(ValueError, match=r"w_global must hold one float32 global scale"):
        nvfp4_gemm(torch.randn(2, 64), w, sc, torch.ones(2))
    w13, s13, g13, _ = nv_weight((4, 64, 64), g)
    w2, s2, g2, _ = nv_weight((4, 64, 32), g)
    ids, wts = torch.zeros(3, 2, dtype=torch.int64), torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"w2_global must hold one float32 global scale per expert, \[4, 1\]"):
        fused_moe_nvfp4(torch.randn(3, 64), ids, wts, w13, s13, g13, w2, s2, g2[:2], silu_concat)
    with pytest.raises(ValueError, match=r"w13_scale must have shape \[4, 64, 4\]"):
        fused_moe_nvfp4(torch.randn(3, 64), ids, wts, w13, s13[:, :, :2], g13, w2, s2, g2, silu_concat)
    with pytest.raises(ValueError, match=r"H = 40 and I = 32 must be positive multiples of 16"):
        fused_moe_nvfp4(torch.randn(3, 40), ids, wts, w13[:, :, :20], s13, g13, w2, s2, g2, silu_concat)


def test_supported_checks_device_and_shapes():
    ok, why = triton_supported(SimpleNamespace(in_features=48), torch.device("cpu"))
    assert ok and "TRITON_INTERPRET=1" in why and "sm_80" in why, why
    ok, why = triton_supported(SimpleNamespace(in_features=40), torch.device("cpu"))
    assert not ok and "in_features = 40 is not a positive multiple of 16" in why, why
    ok, why = triton_supported(SimpleNamespace(layout=MoELayout(4, 64, 24, False, True, False)), torch.device("cpu"))
    assert not ok and "intermediate_size = 24" in why, why
    ok, why = triton_supported(SimpleNamespace(in_features=64), torch.device("meta"))
    assert not ok and "Triton runs on CUDA" in why, why


@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("N,K", [(33, 64), (7, 48)])
def test_gemm_w4a4_on_the_same_quantized_activations(M, N, K):
    """Activations NVFP4-quantized by the Triton quantizer (the reference's bytes, see
    test_nvfp4_triton_quant.py; one global scale for the whole input, as the reference forward
    quantizes a linear's input), packed e2m1 [M, K/2] with e4m3 scales and their global scale."""
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K + 13)
    w, sc, glob, wd = nv_weight((N, K), g)
    x = torch.randn(M, K, generator=g).bfloat16() * 3
    aq, a_s, a_g = quantize_nvfp4_triton(x)
    bias = torch.randn(N, generator=g) if M != 3 else None
    y = nvfp4_gemm(aq, w, sc, glob, bias, a_scale=a_s, a_global=a_g)
    ad = nv_dequant(aq, a_s, a_g)
    ref = ad @ wd.T + (0 if bias is None else bias)
    assert_within(y, ref, gemm_bound(ad, wd, bias), f"nvfp4 W4A4 M={M} N={N} K={K}")


def test_w4a4_decodes_every_activation_code_and_scale_exactly():
    """``A @ onehot-weight`` is exactly ``dequant(A)``: every activation code in both nibble positions
    times every finite e4m3 scale byte (power-of-two global scales divide exactly)."""
    M, K = 32, 128
    m, k = torch.arange(M)[:, None], torch.arange(K)[None, :]
    codes = ((m + 5 * k) % 16).to(torch.uint8)
    finite = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    a_s = torch.cat([finite, finite[:2]]).reshape(M, K // 16).view(torch.float8_e4m3fn)
    aq, a_g = fp4.pack_fp4(codes), torch.tensor([0.5])
    eye = fp4.pack_fp4(fp4.e2m1_encode(torch.eye(K)))  # weight rows one-hot, code 2 = 1.0
    one = torch.full((K, K // 16), 0x38, dtype=torch.uint8).view(torch.float8_e4m3fn)  # 1.0
    y = nvfp4_gemm(aq, eye, one, torch.tensor([2.0]), a_scale=a_s, a_global=a_g)
    assert torch.equal(y, nv_dequant(aq, a_s, a_g) / 2)


def test_w4a4_operand_errors():
    g = torch.Generator().manual_seed(0)
    w, sc, glob, _ = nv_weight((8, 64), g)
    aq, a_s, a_g = quantize_nvfp4_triton(torch.randn(2, 64))
    with pytest.raises(ValueError, match=r"a_scale must be float8_e4m3fn \[M, K/16\] = \[2, 4\]"):
        nvfp4_gemm(aq, w, sc, glob, a_scale=a_s[:, :2], a_global=a_g)
    with pytest.raises(ValueError, match=r"a_global must hold the activations' one float32 global scale"):
        nvfp4_gemm(aq, w, sc, glob, a_scale=a_s)
    with pytest.raises(ValueError, match=r"w must be packed e2m1 bytes \[N, K/2\] = \[8, 32\]"):
        nvfp4_gemm(aq, w[:, :16], sc, glob, a_scale=a_s, a_global=a_g)


def test_w4a4_supported():
    from oq_plugin_nvfp4.kernels.support import triton_supported_w4a4

    ok, why = triton_supported_w4a4(SimpleNamespace(in_features=64), torch.device("cpu"))
    assert ok and "NVFP4 activations" in why and "sm_80" in why, why
    ok, why = triton_supported_w4a4(
        SimpleNamespace(layout=MoELayout(4, 64, 24, False, True, False)), torch.device("cpu")
    )
    assert not ok and "intermediate_size = 24" in why, why


def test_pair_quantization_equals_the_per_expert_reference():
    """W4A4 experts: each (token, slot) row is quantized with the global scale of the rows routed to
    its expert, byte for byte what ``quantize_nvfp4`` gives each expert's rows alone (the
    reference's expert loop); a masked slot (id E) takes no part."""
    from oq_plugin_nvfp4.kernels.moe import quantize_pairs_per_expert

    g = torch.Generator().manual_seed(8)
    E, T, k = 4, 9, 2
    x = torch.randn(T, 48, generator=g) * torch.logspace(-2, 2, T)[:, None]
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    ids[2, 0] = E
    rows = x.repeat_interleave(k, 0)
    q, s, gl = quantize_pairs_per_expert(rows, ids.reshape(-1), E)
    for e in range(E):
        tok, slot = torch.where(ids == e)
        rq, rs, rg = quantize_nvfp4(x[tok])
        p = tok * k + slot
        assert torch.equal(q[p], rq) and torch.equal(s[p], rs.view(torch.uint8)), e
        assert torch.equal(gl[p], rg.expand(len(p))), e


@pytest.mark.parametrize("bias,gate,dtype", [(True, "interleaved", torch.bfloat16), (False, "concat", torch.float32)])
def test_fused_moe_w4a4(bias, gate, dtype):
    """W4A4 experts against the reference's expert loop: per expert, its tokens quantized with their
    own global scale, gate-up (+ bias) checked against the recorded kernel output, then the down
    GEMM on the per-expert quantization of the kernel's own gated intermediate (``Recorder``)."""
    E, H, I, T, k = 4, 64, 48, 9, 2
    g = torch.Generator().manual_seed(zlib.crc32(f"w4a4 {bias} {gate} {dtype}".encode()))
    w13, s13, g13, w13d = nv_weight((E, 2 * I, H), g)
    w2, s2, g2, w2d = nv_weight((E, H, I), g, amax=40.0)
    b13 = torch.randn(E, 2 * I, generator=g).to(dtype) if bias else None
    b2 = torch.randn(E, H, generator=g).to(dtype) if bias else None
    x = (torch.randn(T, H, generator=g) * torch.logspace(-1, 1, T)[:, None]).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int64)
    ids[4, 1] = E
    wts = torch.softmax(torch.randn(T, k, generator=g), -1)
    rec = Recorder(silu_concat if gate == "concat" else gptoss_interleaved)
    y = fused_moe_nvfp4(x, ids, wts, w13, s13, g13, w2, s2, g2, rec, w13_bias=b13, w2_bias=b2, act_fp4=True)
    assert y.dtype == dtype and y.shape == (T, H)
    h = rec.gate(rec.seen)
    y_ref = torch.zeros(T, H)
    bound = torch.zeros(T, H)
    for e in range(E):
        tok, slot = torch.where(ids == e)
        p = tok * k + slot
        ad = nv_dequant(*quantize_nvfp4(x[tok]))
        bb = None if b13 is None else b13[e]
        ref = ad @ w13d[e].T + (0 if bb is None else bb.float())
        assert_within(rec.seen[p], ref, gemm_bound(ad, w13d[e], bb), f"w4a4 gate-up expert {e}")
        hd = nv_dequant(*quantize_nvfp4(h[p]))
        bb = None if b2 is None else b2[e]
        wt = wts[tok, slot].float()[:, None]
        y_ref.index_add_(0, tok, wt * (hd @ w2d[e].T + (0 if bb is None else bb.float())))
        bound.index_add_(0, tok, wt.abs() * gemm_bound(hd, w2d[e], bb) * (1 + (k + 2) / (I + 4)))
    assert_within(y, y_ref, cast_bound(y_ref, bound, dtype), "w4a4 output")
