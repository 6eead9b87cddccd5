"""NVFP4 torch reference quantizer (:mod:`oq_plugin_nvfp4.quant`): byte for byte compressed-tensors
0.20.1's own NVFP4 functions on float32 input (weights, expert stacks, dynamic activations, the
real compressor), the measured differences from torchao 0.18's NVFP4 tensor, dequantization,
errors and meta tensors."""

from __future__ import annotations

import pytest
import torch

from oq_plugin_nvfp4.quant import (
    Nvfp4Options,
    compute_global_scale,
    dequantize_nvfp4,
    global_scale_from_amax,
    quantize_nvfp4,
)

ct_args = pytest.importorskip("compressed_tensors.quantization")
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor  # noqa: E402
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize  # noqa: E402
from compressed_tensors.quantization.utils import (  # noqa: E402
    calculate_qparams,
    compute_dynamic_scales_and_zp,
    generate_gparam,
)

WEIGHT_ARGS = ct_args.preset_name_to_scheme("NVFP4", ["Linear"]).weights
INPUT_ARGS = ct_args.preset_name_to_scheme("NVFP4", ["Linear"]).input_activations


def u8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def ct_nvfp4(w: torch.Tensor, g: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """compressed-tensors' NVFP4 of a 2D ``w``: llm-compressor's observer statistics (global min/max ->
    ``generate_gparam``; per-16 min/max -> ``calculate_qparams``), then ``quantize`` and
    ``pack_fp4_to_uint8``. ``g`` replaces the global scale (as fused observers do)."""
    if g is None:
        g = generate_gparam(w.amin(), w.amax())
    xg = w.unflatten(-1, (w.shape[-1] // 16, 16))
    s, zp = calculate_qparams(xg.amin(-1), xg.amax(-1), WEIGHT_ARGS, global_scale=g)
    q = ct_quantize(w, s, zp, WEIGHT_ARGS, global_scale=g)
    return pack_fp4_to_uint8(q), s.to(torch.float8_e4m3fn), g


def cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mixed = torch.randn(64, 256, generator=g) * torch.logspace(-30, 30, 64)[:, None]
    mixed[::3, :32] = 0.0
    wide = torch.randn(64, 256, generator=g) * torch.logspace(-8, 3, 256)  # block scales down to e4m3 subnormals and 0
    neg_zero = torch.randn(40, 96, generator=g)
    neg_zero[torch.rand(40, 96, generator=g) < 0.3] = -0.0
    neg_zero[5] = -0.0
    return {
        "random": torch.randn(128, 256, generator=g),
        "zeros": torch.zeros(32, 128),
        "zero_blocks": torch.cat([torch.zeros(16, 32), torch.randn(16, 32, generator=g)], 1),
        "neg_zero": neg_zero,
        "tiny": torch.randn(32, 128, generator=g) * 1e-30,
        "subnormal": torch.randn(32, 128, generator=g) * 1e-40,
        "huge": torch.randn(32, 128, generator=g).clamp(-1, 1) * 3e38,
        "mixed": mixed,
        "wide": wide,
        "one_block": torch.randn(1, 16, generator=g),
    }


def ties() -> torch.Tensor:
    """Every multiple of 1/8 in [-6.5, 6.5] after a 6.0 in each block of 16: under global scale 448
    the block scale is 448 and the element divisor exactly 1, so every e2m1 tie point is hit exactly."""
    v = (torch.arange(-52, 53, dtype=torch.float32) / 8).reshape(7, 15)
    return torch.cat([torch.full((7, 1), 6.0), v], 1)


@pytest.mark.parametrize("name", list(cases()))
def test_bytes_equal_compressed_tensors(name):
    w = cases()[name]
    q, s, g = quantize_nvfp4(w)
    cq, cs, cg = ct_nvfp4(w)
    assert q.dtype == torch.uint8 and q.shape == (*w.shape[:-1], w.shape[-1] // 2)
    assert s.dtype == torch.float8_e4m3fn and s.shape == (*w.shape[:-1], w.shape[-1] // 16)
    assert g.dtype == torch.float32 and g.shape == (1,)
    assert torch.equal(g, cg)
    assert torch.equal(u8(s), u8(cs))
    assert torch.equal(q, cq)


def test_ties_and_global_scale_override_equal_compressed_tensors():
    w = ties()
    g = torch.tensor([448.0])
    q, s, _ = quantize_nvfp4(w, global_scale=g)
    cq, cs, _ = ct_nvfp4(w, g)
    assert torch.equal(u8(s), torch.full_like(u8(s), 0x7E))  # 448
    assert torch.equal(q, cq) and torch.equal(u8(s), u8(cs))
    # the ties went to the even code: 0.25 -> 0, 0.75 -> 1.0, 1.25 -> 1.0, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    from oq_plugin_mxfp4.fp4 import E2M1_VALUES, unpack_fp4

    vals = torch.tensor(E2M1_VALUES)[unpack_fp4(q).long()].flatten()
    src = w.flatten()
    for x, want in ((0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0), (-5.0, -4.0)):
        assert torch.all(vals[src == x] == want), x


def test_real_compressor_writes_the_same_bytes():
    """compressed-tensors' NVFP4PackedCompressor.compress (what its save path runs) on the qparams of
    its own calculate_qparams: weight_packed / weight_scale / weight_global_scale are ours."""
    w = cases()["random"]
    _, cs, cg = ct_nvfp4(w)
    xg = w.unflatten(-1, (w.shape[-1] // 16, 16))
    scale, _ = calculate_qparams(xg.amin(-1), xg.amax(-1), WEIGHT_ARGS, global_scale=cg)
    scheme = ct_args.preset_name_to_scheme("NVFP4A16", ["Linear"])
    out = NVFP4PackedCompressor.compress({"weight": w, "weight_scale": scale, "weight_global_scale": cg}, scheme)
    q, s, g = quantize_nvfp4(w)
    assert torch.equal(out["weight_packed"], q) and torch.equal(u8(out["weight_scale"]), u8(s))
    assert torch.equal(out["weight_global_scale"], g)
    # and compressed-tensors' decompress is our dequantization, bit for bit
    back = NVFP4PackedCompressor.decompress(
        {"weight_packed": q, "weight_scale": s, "weight_global_scale": g}, scheme
    )["weight"]
    assert torch.equal(back.float(), dequantize_nvfp4(q, s, g, dtype=back.dtype).float())
    assert torch.equal(dequantize_nvfp4(q, s, g), dequantize_nvfp4(q, s, g, dtype=torch.float32))


def test_expert_stack_has_one_global_scale_per_expert():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4, 48, 64, generator=gen) * torch.tensor([1.0, 1e-3, 50.0, 0.0]).reshape(4, 1, 1)
    q, s, g = quantize_nvfp4(w)
    assert q.shape == (4, 48, 32) and s.shape == (4, 48, 4) and g.shape == (4, 1)
    for e in range(4):
        cq, cs, cg = ct_nvfp4(w[e])
        assert torch.equal(g[e], cg) and torch.equal(q[e], cq) and torch.equal(u8(s[e]), u8(cs)), e
    assert g[3].item() == 1.0  # an all-zero expert: compressed-tensors' fallback global scale
    assert torch.equal(compute_global_scale(w), g)


def test_dynamic_activations_equal_compressed_tensors_dynamic_path():
    """W4A4 activations: compressed-tensors' dynamic local scales (compute_dynamic_scales_and_zp with
    the NVFP4 preset's input args) under a global scale generated from the same input."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(7, 96, generator=gen) * 3
    x[2] = 0
    q, s, g = quantize_nvfp4(x)
    cg = generate_gparam(x.amin(), x.amax())
    cs, zp = compute_dynamic_scales_and_zp(x, INPUT_ARGS, module=None, global_scale=cg)
    cq = pack_fp4_to_uint8(ct_quantize(x, cs, zp, INPUT_ARGS, global_scale=cg))
    assert torch.equal(g, cg) and torch.equal(q, cq) and torch.equal(u8(s), u8(cs.to(torch.float8_e4m3fn)))


def test_global_scale_is_a_reciprocal_then_a_product():
    """compressed-tensors writes ``2688.0 / amax``, which torch runs as ``amax.reciprocal() * 2688``:
    on these amax values it differs from a true division for about a quarter of them."""
    amax = torch.rand(4096, generator=torch.Generator().manual_seed(5)) * 10 + 1e-3
    ours = global_scale_from_amax(amax)
    ct = torch.cat([generate_gparam(-a.reshape(1), a.reshape(1)) for a in amax[:256]])
    assert torch.equal(ours[:256], ct)
    frac = (ours != (2688.0 / amax.double()).float()).float().mean().item()  # vs the correctly rounded quotient
    assert 0.15 < frac < 0.35, frac
    assert torch.equal(global_scale_from_amax(torch.tensor([0.0, 1e-45, float("inf")])), torch.tensor([1.0, 1.0, 0.0]))


def test_bf16_input_is_upcast_first():
    """bf16 weights are quantized as their exact float32 values. compressed-tensors (so llm-compressor)
    computes the global and block scales in bf16 instead: on this bf16 Gaussian the global scale
    and a few percent of the bytes differ (measured numbers asserted)."""
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(6)).bfloat16()
    q, s, g = quantize_nvfp4(w)
    rq, rs, rg = quantize_nvfp4(w.float())
    assert torch.equal(q, rq) and torch.equal(u8(s), u8(rs)) and torch.equal(g, rg)
    cq, cs, cg = ct_nvfp4(w)
    assert cg.item() != g.item() and cg.item() == cg.bfloat16().item()  # a bf16-rounded global scale
    dq, ds = (cq != q).sum().item(), (u8(cs) != u8(s)).sum().item()
    assert (dq, ds) == (514, 164), (dq, ds)  # of 32768 and 4096 (1.6 % and 4.0 %)


# ---- torchao 0.18 (torchao.prototype.mx_formats.nvfp4_tensor): the same format, other arithmetic ----


def torchao_nvfp4(w: torch.Tensor):
    nv = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    pts = nv.per_tensor_amax_to_scale(w.abs().amax())
    t = nv.NVFP4Tensor.to_nvfp4(w, per_tensor_scale=pts)
    return u8(t.qdata), u8(t.scale), pts


def test_torchao_global_scale_is_the_dequant_reciprocal():
    w = cases()["random"]
    _, _, g = quantize_nvfp4(w)
    _, _, pts = torchao_nvfp4(w)
    amax = w.abs().amax()
    assert pts.item() == (amax / 2688.0).item()  # torchao: a dequantization multiplier, a true division
    assert g.item() == (amax.reciprocal() * 2688.0).item()  # ours / CT: quantization multiplier
    assert abs(g.item() * pts.item() - 1) < 2**-22


def test_torchao_gaussian_differs_in_single_bytes():
    """Gaussian 1024x1024 (seed 2): scales all equal; one element byte differs, in a block whose
    scale is the same (element math: CT ``x / fl(s / g)`` vs torchao ``x * fl(fl(1 / pts) / s)``)."""
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(2))
    q, s, g = quantize_nvfp4(w)
    aq, as_, pts = torchao_nvfp4(w)
    assert torch.equal(u8(s), as_)
    diff = (q != aq).nonzero()
    assert diff.shape[0] == 1
    r, c = diff[0].tolist()
    blk = w[r, (2 * c) // 16 * 16 : (2 * c) // 16 * 16 + 16]
    sf = s.float()[r, (2 * c) // 16]
    x = w[r, 2 * c : 2 * c + 2]
    y_ct = x / (sf / g)
    y_ao = x * ((1.0 / pts) / sf)
    from oq_plugin_mxfp4.fp4 import e2m1_encode

    assert not torch.equal(e2m1_encode(y_ct), e2m1_encode(y_ao)) and blk.abs().amax() > 0


def test_torchao_zero_and_tiny_blocks_and_negative_zero():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(7))
    w[0, :16] = 0  # zero block
    w[1, :16] = torch.linspace(-1, 1, 16) * 2e-5  # block scale ~ g * 3e-6 ~ 2**-10: an e4m3 subnormal for us
    w[2, 16:32] = -0.0
    q, s, _ = quantize_nvfp4(w)
    aq, as_, _ = torchao_nvfp4(w)
    assert u8(s)[0, 0] == 0x20 and as_[0, 0] == 0x08  # CT: zero scale -> 0.125; torchao: clamped to 2**-6
    assert 0 < u8(s)[1, 0] < 0x08 and as_[1, 0] == 0x08  # torchao never writes e4m3 subnormal scales
    assert torch.all(q[2, 8:16] == 0) and torch.all(aq[2, 8:16] == 0x88)  # -0.0: code 0 (CT) vs 8 (torchao)
    same = torch.ones_like(u8(s), dtype=torch.bool)
    same[0, 0] = same[1, 0] = same[2, 1] = False
    assert torch.equal(u8(s)[same], as_[same])


# ---- dequantization, fidelity, errors, meta ----


def test_dequantize_and_sqnr():
    from oqcore.metrics import sqnr

    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(8))
    q, s, g = quantize_nvfp4(w)
    d = dequantize_nvfp4(q, s, g)
    assert d.shape == w.shape and d.dtype == torch.float32
    assert 20.2 < sqnr(w, d) < 20.7  # measured 20.44 dB on 4096x4096 Gaussian (e2m1 with e4m3 scales per 16)
    # exact definition: e2m1 value * fl(scale / global_scale)
    from oq_plugin_mxfp4.fp4 import dequantize_codes

    want = dequantize_codes(q).reshape(512, 32, 16) * (s.float() / g).unsqueeze(-1)
    assert torch.equal(d, want.reshape(512, 512))
    assert dequantize_nvfp4(q, s, g, dtype=torch.bfloat16).dtype == torch.bfloat16
    e = torch.randn(3, 32, 48)
    eq, es, eg = quantize_nvfp4(e)
    de = dequantize_nvfp4(eq, es, eg)
    for i in range(3):
        assert torch.equal(de[i], dequantize_nvfp4(eq[i], es[i], eg[i]))


def test_errors_name_the_rule():
    with pytest.raises(ValueError, match=r"divisible by 16.*\(4, 40\)"):
        quantize_nvfp4(torch.randn(4, 40))
    with pytest.raises(ValueError, match=r"\[E, N, K\].*\(2, 2, 2, 16\)"):
        quantize_nvfp4(torch.randn(2, 2, 2, 16))
    with pytest.raises(ValueError, match=r"global_scale.*float32 of shape \[3, 1\].*\[1\]"):
        quantize_nvfp4(torch.randn(3, 4, 16), global_scale=torch.ones(1))
    with pytest.raises(ValueError, match=r"global_scale.*float32 of shape \[1\].*torch.float64"):
        quantize_nvfp4(torch.randn(4, 16), global_scale=torch.ones(1, dtype=torch.float64))
    with pytest.raises(Exception) as err:
        Nvfp4Options(scale_mode="rceil")
    assert "scale_mode" in str(err.value)
    assert Nvfp4Options() == Nvfp4Options()


def test_meta_tensors():
    for shape, gshape in (((64, 128), (1,)), ((3, 32, 64), (3, 1)), ((5, 16), (1,))):
        q, s, g = quantize_nvfp4(torch.empty(shape, device="meta", dtype=torch.bfloat16))
        assert q.is_meta and q.shape == (*shape[:-1], shape[-1] // 2) and q.dtype == torch.uint8
        assert s.is_meta and s.shape == (*shape[:-1], shape[-1] // 16) and s.dtype == torch.float8_e4m3fn
        assert g.is_meta and g.shape == gshape and g.dtype == torch.float32
        d = dequantize_nvfp4(q, s, g, dtype=torch.bfloat16)
        assert d.is_meta and d.shape == shape and d.dtype == torch.bfloat16


def test_llmcompressor_fixture_is_compressed_tensors_on_bf16(tmp_path):
    """The committed llm-compressor NVFP4A16 checkpoint (model_free_ptq 0.14.0.1 on a bf16 tiny Llama
    rebuilt from its seed): compressed-tensors' functions run on the bf16 weights with the stored
    (fused q/k/v and gate/up) global scales give every stored byte, so those functions are what
    llm-compressor runs; ours, computed in float32 from the same weights and global scales, differ
    in the measured 463 of 90112 element bytes and 178 of 11264 scale bytes (the bf16 roundings of
    ``2688 / amax`` and ``amax_b / 6``), and equal compressed-tensors on the float32 upcast."""
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    data = Path(__file__).resolve().parents[2] / "data" / "llmcompressor"
    sys.path.insert(0, str(data))
    try:
        import make_fixtures
    finally:
        sys.path.remove(str(data))
    src = load_file(make_fixtures.make_source("dense", tmp_path) / "model.safetensors")
    stored = load_file(data / "dense_NVFP4A16" / "model.safetensors")
    dq = ds = nq = ns = 0
    for key in [k for k in stored if k.endswith(".weight_packed")]:
        base = key[: -len("weight_packed")]
        w, g = src[base + "weight"], stored[base + "weight_global_scale"]
        assert w.dtype == torch.bfloat16
        cq, cs, _ = ct_nvfp4(w, g)
        assert torch.equal(cq, stored[key]) and torch.equal(u8(cs), u8(stored[base + "weight_scale"])), base
        q, s, _ = quantize_nvfp4(w, global_scale=g)
        fq, fs, _ = ct_nvfp4(w.float(), g)
        assert torch.equal(q, fq) and torch.equal(u8(s), u8(fs)), base
        dq += (q != cq).sum().item()
        ds += (u8(s) != u8(cs)).sum().item()
        nq, ns = nq + q.numel(), ns + s.numel()
    assert (dq, nq, ds, ns) == (463, 90112, 178, 11264)
