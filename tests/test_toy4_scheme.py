"""Contract v2 end to end with a packed 4-bit scheme the core has never heard of.

``tests/toy4_plugin.py`` (two int4 values per byte, per-16 float16 scales under a per-tensor float32
``global_scale``) is installed as the distribution ``oq-plugin-toy4`` with an ``oqcore`` entry
point, exactly as a third-party package would be, and goes through plan, online load, in-place
reload, save and load back, each forward checked against its torch reference. Nothing under
``oqcore/`` names it (``test_core_names_no_toy4``).
"""

from __future__ import annotations

import pathlib

import pytest
import torch
from torch import nn

import oqcore
from fakedist import install_fake_dist

HERE = pathlib.Path(__file__).parent
SOURCE = (HERE / "toy4_plugin.py").read_text()


@pytest.fixture
def toy4(tmp_path, monkeypatch):
    """Install ``toy4_plugin.py`` as distribution ``oq-plugin-toy4`` (entry point ``toy4``) and
    return its module: the recipe a plugin author copies (see docs/writing-a-plugin.md)."""
    install_fake_dist(tmp_path / "site", monkeypatch, "oq-plugin-toy4", {"toy4": "oq_toy4"}, {"oq_toy4.py": SOURCE})
    pm = oqcore.get_plugin_manager()
    pm.registry
    assert pm.records["toy4"].status == "loaded" and pm.records["toy4"].distribution == "oq-plugin-toy4"
    import oq_toy4

    return oq_toy4


def _reference_linear(mod, x, qweights):
    """The numbers: float32 dequantize-and-matmul with the toy's own reference dequantizer."""
    w = mod.dequantize(qweights["weight"], qweights["weight_scale"], qweights["weight_global_scale"], torch.float32)
    return x.float() @ w.T


def test_reference_quantizer_numbers(toy4):
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(0))
    q, s, gs = toy4.quantize(w)
    assert (q.dtype, tuple(q.shape), s.dtype, tuple(s.shape), gs.dtype, tuple(gs.shape)) == (
        torch.uint8, (32, 24), torch.float16, (32, 3), torch.float32, (1,)
    )
    ints = toy4.unpack(q)
    assert ints.min() >= -7 and ints.max() <= 7 and torch.equal(toy4.pack(ints), q)
    # relative error of a 4-bit grid: well under one step (1/7 of the group max)
    err = (toy4.dequantize(q, s, gs, torch.float32) - w).abs()
    assert float(err.max()) <= float(w.abs().max()) / 7 / 2 * 1.01


def test_two_implementations_same_bytes_and_the_oracle_picks_one(toy4):
    w = torch.randn(3, 32, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    ref = oqcore.quantize_tensor(w, "toy4", quantizer="torch")
    fast = oqcore.quantize_tensor(w, "toy4")  # toy4-lut wins on the CPU (priority 10)
    assert [n for n in ref.tensors] == ["qdata", "scale", "global_scale"]
    for n in ref.tensors:
        assert torch.equal(ref[n], fast[n]), n
    assert ref.shape == w.shape and tuple(ref.qdata.shape) == (3, 32, 32)
    choice = oqcore.select_quantizer(oqcore.get_registry().format(toy4.TOY4).implementations, torch.device("cpu"), [(32, 64)], torch.float32)
    assert choice.impl.name == "toy4-lut" and choice.impl.plugin == "toy4"
    impls = oqcore.get_registry().format(toy4.TOY4).implementations
    assert oqcore.select_quantizer(impls, torch.device("meta"), [(32, 64)], torch.float32).impl.name == "torch"


def test_pinned_implementation_and_env_switch(toy4, monkeypatch):
    fmt = oqcore.get_registry().format(toy4.TOY4)
    monkeypatch.setenv("OQ_QUANTIZER", "torch")
    assert oqcore.select_quantizer(fmt.implementations, torch.device("cpu"), [(32, 64)], torch.float32).impl.name == "torch"
    with pytest.raises(oqcore.ConfigError, match="no quantizer implementation 'nope'.*implementations: torch, toy4-lut"):
        oqcore.select_quantizer(fmt.implementations, torch.device("cpu"), [(32, 64)], torch.float32, pinned="nope")


def test_plan_and_explain_show_quantizer_and_backend(toy4):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    p = oqcore.plan(model, "toy4", device="cpu")
    lp = p["0"]
    assert (lp.quantizer.name, lp.backend.name, lp.bound.method_cls.__name__) == ("toy4-lut", "toy4-unpack", "Toy4LinearMethod")
    assert issubclass(lp.bound.method_cls, toy4.Toy4Linear) and lp.bound.method_cls.weight_key == toy4.TOY4
    table = p.explain(verbose=True).splitlines()
    assert table[0].split() == ["layer", "kind", "shape", "weight", "activation", "quantizer", "backend", "why"]
    assert table[2].split()[6:8] == ["toy4-lut", "toy4-unpack"]  # shape "[32, 64]" is two words
    # the reference forward backend comes from the core, derived from the record
    assert {c.backend.name for c in lp.candidates} == {"toy4-unpack", "torch"}
    with pytest.raises(oqcore.UnsupportedLayerError, match="toy4 needs in_features divisible by 16, got 40"):
        oqcore.plan(nn.Sequential(nn.Linear(40, 16)), "toy4", device="cpu")


def _checkpoint_weights(src):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(pathlib.Path(src).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_full_lifecycle(toy4, arch, tiny_moe, tmp_path):
    src = tiny_moe(arch)
    model = oqcore.load(src, "toy4")
    rep = oqcore.report(model)
    assert rep.summary.startswith("Quantized ")
    # every quantized linear holds the packed tensors the record names, with the logical shape kept
    lin = next(m for n, m in model.named_modules() if type(m).__name__ == "QuantizedLinear")
    assert lin.weight.dtype == torch.uint8 and lin.weight.shape[-1] * 2 == lin.in_features
    assert lin.weight_scale.dtype == torch.float16 and lin.weight_global_scale.shape == (1,)
    moe = next(m for n, m in model.named_modules() if type(m).__name__ == "QuantizedMoE")
    e = moe.layout.num_experts
    assert moe.w13_weight_global_scale.shape == (e, 1) and moe.w2_weight.dtype == torch.uint8
    # linear forward (the toy4-unpack backend) == the toy's reference numbers
    x = torch.randn(5, lin.in_features, generator=torch.Generator().manual_seed(2)).to(lin.params_dtype)
    q = {"weight": lin.weight, "weight_scale": lin.weight_scale, "weight_global_scale": lin.weight_global_scale}
    ref = _reference_linear(toy4, x, q)
    if lin.bias is not None:
        ref = ref + lin.bias.float()
    assert torch.equal(lin(x), ref.to(x.dtype))
    # MoE forward (the core's reference backend through the toy's dequantizer) equals a loop by hand
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]])
    wts = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.9, 0.1]])
    xm = torch.randn(3, moe.layout.hidden_size, generator=torch.Generator().manual_seed(3)).to(moe.params_dtype)
    out = moe.method.apply(moe, xm, ids, wts)
    assert out.shape == xm.shape and torch.isfinite(out.float()).all()
    by_hand = torch.zeros(xm.shape, dtype=torch.float32)
    for t in range(3):
        for j in range(2):
            ex = int(ids[t, j])
            w13 = toy4.dequantize(moe.w13_weight[ex], moe.w13_weight_scale[ex], moe.w13_weight_global_scale[ex], torch.float32)
            w2 = toy4.dequantize(moe.w2_weight[ex], moe.w2_weight_scale[ex], moe.w2_weight_global_scale[ex], torch.float32)
            h = xm[t : t + 1].float() @ w13.T
            if moe.layout.has_bias:
                h = h + moe.gate_up_proj_bias[ex].float()
            h = moe.apply_gate(h)
            y = h.float() @ w2.T
            if moe.layout.has_bias:
                y = y + moe.down_proj_bias[ex].float()
            by_hand[t] += float(wts[t, j]) * y[0]
    torch.testing.assert_close(out.float(), by_hand.to(xm.dtype).float(), rtol=0, atol=0)

    # reload in place: same storage, new numbers, equal to a fresh load of the new weights
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    new = {k: (v * 0.5 if v.is_floating_point() else v) for k, v in _checkpoint_weights(src).items()}
    reloaded = oqcore.reload_weights(model, new)
    assert reloaded and {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    qn, sn, gn = toy4.quantize(new[lin.layer_name + ".weight"].to(lin.params_dtype))
    assert torch.equal(lin.weight, qn) and torch.equal(lin.weight_scale, sn) and torch.equal(lin.weight_global_scale, gn)

    # the toy declares no compressed-tensors form: the default export says so, oqcore's layout holds it
    with pytest.raises(oqcore.SaveError, match="its plugin declares no compressed-tensors form; save with format='oqcore'"):
        oqcore.save_quantized(model, tmp_path / "ct")
    # save, load back: every tensor bit for bit, forward identical, no re-quantization
    oqcore.save_quantized(model, tmp_path / "q", format="oqcore")
    back = oqcore.load(tmp_path / "q")
    a = {k: v for k, v in model.state_dict().items()}
    b = {k: v for k, v in back.state_dict().items()}
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ids_tok = torch.randint(0, 300, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids_tok).logits, back(input_ids=ids_tok).logits)


def test_core_names_no_toy4():
    core = pathlib.Path(oqcore.__file__).parent
    hits = [p for p in core.rglob("*.py") if "toy4" in p.read_text()]
    assert hits == []


# A scheme may run with another plugin's activation key: the toy's weights with fp8 per-token
# activations (as oq-plugin-mxfp4 runs W4A8 on oq-plugin-mxfp8's activation key). The activation
# format is imported from the fp8 plugin and used, not declared again.
TOY4_W4A8 = SOURCE + '''

from oq_plugin_fp8.scheme import FORMATS as _FP8_FORMATS
from oq_plugin_fp8 import keys as _fp8_keys

FP8_TOKEN = _FP8_FORMATS[_fp8_keys.kFp8DynamicTokenSym]

SCHEME = Scheme(
    "toy4",
    FORMAT,
    activations=(None, FP8_TOKEN),
    backends=backends,
    methods={"linear": Toy4Linear},
    description="toy packed int4 weights, fp8 per-token activations available",
)
'''


def test_a_scheme_runs_with_another_plugins_activation_key(tmp_path, monkeypatch):
    install_fake_dist(tmp_path / "site", monkeypatch, "oq-plugin-toy4", {"toy4": "oq_toy4"}, {"oq_toy4.py": TOY4_W4A8})
    pm = oqcore.get_plugin_manager()
    reg = pm.registry
    assert {n: r.status for n, r in pm.records.items() if n in ("fp8", "toy4")} == {"fp8": "loaded", "toy4": "loaded"}
    token = reg.resolve_key("fp8_per_token", "activation")
    # the fp8 plugin's quantizers stay its own (nothing re-registered by the toy)
    assert {q.plugin for (k, _), q in reg.quantizers.items() if k == token} == {"fp8"}
    import oq_toy4

    assert reg.declared_formats[token] is oq_toy4.FP8_TOKEN
    model = nn.Sequential(nn.Linear(64, 32))
    cfg = {"linear": {"weight": "toy4", "activation": "fp8_per_token"}}
    plan = oqcore.plan(model, cfg)
    (lp,) = plan.quantized
    assert reg.name_of(lp.bound.activation_key, "activation") == "fp8_per_token"
    torch.manual_seed(0)
    x = torch.randn(5, 64)
    want = model(x)
    oqcore.quantize_(model, cfg)
    got = model(x)
    # int4 weights and fp8 activations: a few percent of the output scale
    assert float((got - want).norm() / want.norm()) < 0.12
