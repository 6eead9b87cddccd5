"""Static per-tensor fp8 input activation scales (issue 11): checkpoints whose layers carry a
calibrated ``input_scale`` load as stored and run with the STORED scale, as vLLM serves them.

- compressed-tensors' FP8 preset (weights fp8 per tensor, ``input_activations`` float 8 ``tensor``
  ``dynamic: false``), written by ``tests/ct_reference.py`` (``calibrate_input_scales``: running
  min/max of each Linear's input, compressed-tensors' ``calculate_qparams``); MoE checkpoints get
  per-expert input scales written beside each gate / up / down (llm-compressor's oneshot layout;
  ct_reference cannot calibrate through experts). The real llm-compressor fixture and ModelOpt
  are in ``test_import_llmcompressor.py`` / ``test_import_peers.py``.
- Experts keep one ``w13_input_scale`` and one ``w2_input_scale`` per layer: the max over the
  experts (and over gate / up), as vLLM's ``process_fp8_input_tensor_strategy_moe`` does.

Checked: stored bytes incl. ``input_scale`` bit-exact in the layer; the forward within float32
summation order of a fake-quant reference quantizing each input with the stored scale (and NOT
within that bound of one quantizing with a per-call dynamic scale: the test can fail); export to
compressed-tensors and back bit-identical, compressed-tensors' own decompression accepting the
layer's tensors (``input_scale`` included, strict); the ConfigError for a static activation on a
high-precision checkpoint (online, overlay); reload keeping the calibrated scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import oqcore
from oqcore import ConfigError

pytest.importorskip("compressed_tensors")
from battery.util import raises_naming  # noqa: E402
from ct_export_util import ct_config, tensors_of  # noqa: E402
from ct_reference import write_ct_checkpoint  # noqa: E402
from test_export_ct import ct_decompress  # noqa: E402
from test_import_ct import _assert_stored_bytes, _fake_quant_inputs, _reference, _rel_err, _same  # noqa: E402

STATIC = "fp8_per_tensor_static"
F = "model.safetensors"
# float32 model on the reference ("torch") backend: the same arithmetic as the reference, only the
# summation order may differ (MiniLM: measured 0); a dynamic instead of the stored scale: 0.099
EXACT = 2**-14
STATIC_ACTS = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False, "observer": "static_minmax"}


@pytest.fixture(scope="module")
def dense(minilm, tmp_path_factory) -> Path:
    """MiniLM in compressed-tensors' FP8 preset with calibrated input scales."""
    return write_ct_checkpoint(minilm, tmp_path_factory.mktemp("fp8_static") / "ck", "FP8")


def _moe_static(src: Path, out: Path) -> Path:
    """A compressed-tensors FP8 checkpoint of a tiny MoE with static input activations: per-tensor
    fp8 weights by compressed-tensors, and a distinct bf16 ``input_scale`` beside every quantized
    linear and expert projection (gate and up of one expert equal, as vLLM requires)."""
    ck = write_ct_checkpoint(src, out, "FP8_W8A16")
    t = load_file(ck / F)
    g = torch.Generator().manual_seed(1)
    for k in sorted(k for k in t if k.endswith(".weight_scale")):
        mod = k.removesuffix(".weight_scale")
        if mod.endswith((".up_proj", ".w3")):
            continue  # equal to its gate's, below
        t[f"{mod}.input_scale"] = ((torch.rand((1,), generator=g) * 8 + 2) / 448).to(torch.bfloat16)
    for k in sorted(k for k in t if k.endswith(".up_proj.weight_scale") or k.endswith(".w3.weight_scale")):
        mod = k.removesuffix(".weight_scale")
        gate = mod.removesuffix(".up_proj") + ".gate_proj" if mod.endswith(".up_proj") else mod[:-3] + ".w1"
        t[f"{mod}.input_scale"] = t[f"{gate}.input_scale"].clone()
    save_file(t, ck / F, metadata={"format": "pt"})
    cfg = json.loads((ck / "config.json").read_text())
    group = cfg["quantization_config"]["config_groups"]["group_0"]
    group["input_activations"] = dict(STATIC_ACTS)
    group["format"] = cfg["quantization_config"]["format"] = "float-quantized"
    (ck / "config.json").write_text(json.dumps(cfg))
    return ck


@pytest.fixture(scope="module")
def moe(tiny_moe, tmp_path_factory):
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = _moe_static(Path(tiny_moe(arch)), tmp_path_factory.mktemp(f"moe_static_{arch}") / "ck")
        return made[arch]

    return get


def _dynamic_hooks(ref, model):
    """Hooks quantizing each quantized layer's input with a per-call per-tensor scale instead."""
    hooks = []
    for name in model.oq_state.wrappers:

        def hook(mod, args):
            x = args[0]
            qt = oqcore.quantize_tensor(x.reshape(-1, x.shape[-1]).float(), "fp8_per_tensor_dynamic", quantizer="torch", role="activation")
            return (qt.dequantize(torch.float32).reshape(x.shape).to(x.dtype),)

        hooks.append(ref.get_submodule(name).register_forward_pre_hook(hook))
    return hooks


def _forward_errors(model, src, folder) -> tuple[float, float]:
    """(error vs the stored-scale reference, error vs a dynamic-scale reference) of MiniLM's output."""
    ref = _reference(src, folder, "FP8", causal=False)
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    out = []
    for make in (_fake_quant_inputs, _dynamic_hooks):
        hooks = make(ref, model)
        with torch.no_grad():
            got, want = model(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state
        for h in hooks:
            h.remove()
        out.append(_rel_err(got, want))
    return out[0], out[1]


def test_dense_loads_the_stored_input_scales_and_runs_with_them(dense, minilm, monkeypatch):
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    model = oqcore.load(dense, dtype=torch.float32)
    _assert_stored_bytes(model, dense)
    stored = load_file(dense / F)
    targets = model.oq_state.config.to_dict()["targets"]
    assert len(targets) == 37 and all(t == {"weight": STATIC, "activation": STATIC} for t in targets.values())
    for name, w in model.oq_state.wrappers.items():
        assert w.input_scale.dtype == torch.float32 and w.input_scale.shape == (1,)
        assert torch.equal(w.input_scale, stored[f"{name}.input_scale"].float()), name
        # only the reference backend reads the stored scale; the fp8 kernels compute scales per call
        assert w.method.backend.name == "torch"
    static, dynamic = _forward_errors(model, minilm, dense)
    assert static < EXACT, static
    assert dynamic > 16 * EXACT, dynamic  # a forward with a per-call scale would fail the bound above


def test_oracle_offers_only_backends_reading_the_stored_scale(dense):
    plan = oqcore.load(dense).oq_state.plan
    for lp in plan.quantized:
        viable = [c.backend.name for c in lp.candidates if c.reason is None]
        assert viable == ["torch"] and lp.backend.name == "torch", (lp.name, viable)
        # the kernels for this weight key (computing activation scales per call) are listed as rejected
        assert all(c.reason for c in lp.candidates if c.backend.name in ("triton", "scaled-mm", "cpu")), lp.name


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_moe_keeps_one_input_scale_per_projection_the_max_over_experts(arch, moe, monkeypatch):
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    folder = moe(arch)
    model = oqcore.load(folder, dtype=torch.float32)
    stored = load_file(folder / F)
    experts = {n: w for n, w in model.oq_state.wrappers.items() if n.endswith("experts")}
    assert experts
    for name, w in experts.items():
        ck = name.replace(".mlp.experts", ".block_sparse_moe.experts") if arch == "mixtral" else name
        gate, up, down = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        n = w.layout.num_experts
        s13 = torch.stack([stored[f"{ck}.{e}.{p}.input_scale"].float() for e in range(n) for p in (gate, up)])
        s2 = torch.stack([stored[f"{ck}.{e}.{down}.input_scale"].float() for e in range(n)])
        assert len(set(s2.flatten().tolist())) > 1  # the experts' scales differ: the max is what is kept
        assert w.w13_input_scale.shape == (1,) and torch.equal(w.w13_input_scale, s13.max().reshape(1)), name
        assert w.w2_input_scale.shape == (1,) and torch.equal(w.w2_input_scale, s2.max().reshape(1)), name
        assert w.method.backend.name == "torch"
        # the layer's forward against an independent loop: each expert's input quantized with the stored scale
        torch.manual_seed(0)
        x = torch.randn(16, w.layout.hidden_size)
        ids = torch.randint(0, n, (16, 2))
        tw = torch.rand(16, 2)
        got = w.method.apply(w, x, ids, tw)
        for fq, bound_ok in ((_static_fq, True), (_dynamic_fq, False)):
            want = torch.zeros_like(x)
            for e in range(n):
                tok, pos = torch.where(ids == e)
                if tok.numel() == 0:
                    continue
                w13 = w.w13_weight[e].float() * w.w13_weight_scale[e].float()
                w2 = w.w2_weight[e].float() * w.w2_weight_scale[e].float()
                h = torch.nn.functional.linear(fq(x[tok], w.w13_input_scale), w13)
                h = w.apply_gate(h)
                y = torch.nn.functional.linear(fq(h, w.w2_input_scale), w2)
                want.index_add_(0, tok, y * tw[tok, pos, None])
            err = _rel_err(got, want)
            assert (err < EXACT) == bound_ok, (name, fq.__name__, err)


def _static_fq(x, s):
    return (x.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s


def _dynamic_fq(x, s):
    qt = oqcore.quantize_tensor(x.float(), "fp8_per_tensor_dynamic", quantizer="torch", role="activation")
    return qt.dequantize(torch.float32)


def _params(model) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def _assert_same_model(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and _same(pa[k], pb[k]), k


def test_dense_export_to_compressed_tensors_and_back(dense, tmp_path):
    model = oqcore.load(dense, dtype=torch.float32)
    out = oqcore.save_quantized(model, tmp_path / "ct", format="compressed-tensors")
    cfg, raw = ct_config(out)
    group = cfg.config_groups["group_0"]
    acts = group.input_activations
    assert acts is not None and acts.dynamic is False and acts.strategy == "tensor" and acts.type == "float"
    assert group.format == "float-quantized"
    tensors = tensors_of(out)
    wrappers = model.oq_state.wrappers
    for name, w in wrappers.items():
        assert torch.equal(tensors[f"{name}.input_scale"].float(), w.input_scale), name
    for name in ("encoder.layer.0.attention.self.query", "pooler.dense"):
        # compressed-tensors' own module for the group (input_scale registered by it, loaded strictly)
        theirs = ct_decompress(tensors, name, group)
        assert torch.equal(theirs, wrappers[name].method.dequantize_layer_weight(wrappers[name], "weight", torch.float32)), name
    _assert_same_model(model, oqcore.load(out, dtype=torch.float32))


def test_moe_export_writes_the_layer_scale_for_every_expert(moe, tmp_path):
    folder = moe("qwen3_moe")
    model = oqcore.load(folder, dtype=torch.float32)
    out = oqcore.save_quantized(model, tmp_path / "ct", format="compressed-tensors")
    tensors = tensors_of(out)
    for name, w in model.oq_state.wrappers.items():
        if not name.endswith("experts"):
            continue
        for e in range(w.layout.num_experts):
            for p, s in (("gate_proj", w.w13_input_scale), ("up_proj", w.w13_input_scale), ("down_proj", w.w2_input_scale)):
                assert torch.equal(tensors[f"{name}.{e}.{p}.input_scale"], s), (name, e, p)
    _assert_same_model(model, oqcore.load(out, dtype=torch.float32))
    # the oqcore format keeps it too
    own = oqcore.save_quantized(model, tmp_path / "oq", format="oqcore")
    _assert_same_model(model, oqcore.load(own, dtype=torch.float32))


def test_static_activation_on_a_high_precision_checkpoint_is_a_config_error(minilm):
    from transformers import AutoModel

    cfg = {"linear": {"weight": STATIC, "activation": STATIC}}
    culprits = ("linear.activation", "encoder.layer.0.attention.self.query", STATIC, "calibrated checkpoint", "dynamic activation key")
    with raises_naming(ConfigError, *culprits):
        oqcore.load(minilm, cfg)
    model = AutoModel.from_pretrained(minilm, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with raises_naming(ConfigError, *culprits):
        oqcore.quantize_(model, cfg)
    # nothing half-applied: no wrapper installed, every tensor as before
    assert not any(type(m).__name__.startswith("Quantized") for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_overlays(dense, minilm, tmp_path_factory):
    # weight-only storage (no input scale) with a static activation override: nothing to run with
    w8a16 = write_ct_checkpoint(minilm, tmp_path_factory.mktemp("w8a16") / "ck", "FP8_W8A16")
    with raises_naming(ConfigError, "linear.activation", "stores no input scale", STATIC, "calibrated checkpoint"):
        oqcore.load(w8a16, {"linear": {"activation": STATIC}})
    # a dynamic override on the static checkpoint conflicts with what it declares
    with raises_naming(ConfigError, "linear.activation", "fp8_per_tensor_dynamic", STATIC, "remove the override"):
        oqcore.load(dense, {"linear": {"activation": "fp8_per_tensor_dynamic"}})
    # naming the checkpoint's own pairing keeps the stored scales
    model = oqcore.load(dense, {"linear": {"weight": STATIC, "activation": STATIC}}, dtype=torch.float32)
    stored = load_file(dense / F)
    assert all(torch.equal(w.input_scale, stored[f"{n}.input_scale"].float()) for n, w in model.oq_state.wrappers.items())


def test_reload_requantizes_the_weights_and_keeps_the_calibrated_scale(dense, minilm):
    model = oqcore.load(dense, dtype=torch.float32)
    wrappers = model.oq_state.wrappers
    scales = {n: (w.input_scale.clone(), w.input_scale.data_ptr()) for n, w in wrappers.items()}
    src = load_file(Path(minilm) / F)
    g = torch.Generator().manual_seed(3)
    new = {k: (v.float() * (1 + 0.1 * torch.rand(v.shape, generator=g))) if k.rpartition(".")[0] in wrappers and k.endswith(".weight") else v.float() for k, v in src.items() if v.is_floating_point()}
    done = oqcore.reload_weights(model, new)
    assert sorted(done) == sorted(wrappers)
    for n, w in wrappers.items():
        assert torch.equal(w.input_scale, scales[n][0]) and w.input_scale.data_ptr() == scales[n][1], n
        ref = oqcore.quantize_tensor(new[f"{n}.weight"], STATIC, quantizer="torch")
        assert _same(w.weight, ref.qdata) and torch.equal(w.weight_scale, ref.scale), n


def test_oq_explain_refuses_a_static_activation_on_a_bf16_checkpoint(tiny_moe):
    """What `oq quantize` would refuse before reading a weight, `oq explain` refuses as well."""
    from typer.testing import CliRunner

    from oqcore.cli import app

    r = CliRunner().invoke(app, ["explain", "--model", str(tiny_moe("mixtral")), "linear.weight=fp8_per_tensor_static", "linear.activation=fp8_per_tensor_static"])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: linear.activation: layer 'model.layers.0.self_attn.q_proj': activation fp8_per_tensor_static uses static input scales")
