"""A config given with an already-quantized checkpoint: vLLM's overlay semantics (PR 41566 and the
online quantization docs), on compressed-tensors checkpoints written by compressed-tensors' own
compressors (tests/ct_reference.py) and on oqcore's exports of both formats.

- activation-only specs (``moe: {activation: mxfp8}``) keep the stored weights and apply the
  activation where the checkpoint declares none; the plan then holds only backends serving it;
- an activation conflicting with the declared one, a weight key other than the stored one, a
  target naming a stored layer: each its own ConfigError (field and message asserted);
- a shorthand naming the checkpoint's own scheme reads the stored bytes (nothing re-quantized);
- composing: on a partly quantized checkpoint, ``linear: fp8_per_block`` quantizes the
  high-precision layers online (bytes equal to quantizing the bf16 source), the stored layers keep
  their bytes; ``ignore`` keeps a stored layer's quantization as it is;
- an activation-only spec on a bf16 checkpoint is a ConfigError asking for a weight key.
"""

from __future__ import annotations

import pytest
import torch
from test_import_ct import _assert_stored_bytes, _minilm_err, _reference, _write
from test_roundtrip import _no_requantize

import oqcore
from oqcore import ConfigError
from oqcore.plugins import get_registry


def _act(model, layer: str) -> str | None:
    key = model.oq_state.wrappers[layer].method.activation_key
    return None if key is None else get_registry().name_of(key, "activation")


def _same_state(a: torch.nn.Module, b: torch.nn.Module, layers) -> None:
    """Every parameter of ``layers`` bit-identical between models ``a`` and ``b``."""
    for layer in layers:
        pa = dict(a.get_submodule(layer).named_parameters(recurse=False))
        pb = dict(b.get_submodule(layer).named_parameters(recurse=False))
        assert pa.keys() == pb.keys(), layer
        for k in pa:
            assert pa[k].dtype == pb[k].dtype and torch.equal(pa[k].view(torch.uint8), pb[k].view(torch.uint8)), (layer, k)


# -- activation-only overrides ------------------------------------------------------------------------


def test_activation_override_on_weight_only_checkpoint_dense(minilm, tmp_path_factory, monkeypatch):
    """MXFP8 weights stored weight-only (MXFP8A16) served with MXFP8 activations: PR 41566's case."""
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    folder = _write(minilm, "MXFP8A16", tmp_path_factory)
    _no_requantize(monkeypatch)
    model = oqcore.load(folder, {"linear": {"activation": "mxfp8"}}, dtype=torch.float32)
    _assert_stored_bytes(model, folder)
    assert {_act(model, n) for n in model.oq_state.wrappers} == {"mxfp8"}
    # the oracle's candidates are those of the W8A8 pairing, as if planned from bf16 with it
    fresh = oqcore.plan(oqcore.loading.build_meta_model(minilm), {"linear": {"weight": "mxfp8", "activation": "mxfp8"}}, device="cpu")
    names = lambda p: {lp.name: [(c.backend.name, str(c.backend.activation_key), c.reason) for c in lp.candidates] for lp in p.quantized}
    assert names(model.oq_state.plan) == names(fresh)
    # the forward quantizes activations: within bf16 rounding of a fake-quant reference, run by the
    # torch reference backend (W8A8 kernels agree with it per layer within float32 rounding, which
    # six layers amplify at fp8 rounding boundaries: tests/test_import_ct.py)
    ref = _reference(minilm, folder, "MXFP8A16", causal=False)
    pinned = oqcore.load(folder, {"linear": {"activation": "mxfp8"}, "backend": {"linear": "torch"}}, dtype=torch.float32)
    assert _minilm_err(pinned, ref) < 2**-6
    # and the override is not a no-op: without it the activations stay in high precision, served
    # by the weight-only candidates
    plain = oqcore.load(folder, dtype=torch.float32)
    assert names(plain.oq_state.plan) != names(fresh)
    assert _minilm_err(plain, ref, like=model) > 2**-6  # the activation rounding the override adds is measurable


@pytest.mark.parametrize("how", ["dict", "override"])
def test_activation_override_on_moe_experts(how, tiny_moe, tmp_path_factory, monkeypatch):
    folder = _write(tiny_moe("mixtral"), "MXFP8A16", tmp_path_factory)
    config = {"moe": {"activation": "mxfp8"}} if how == "dict" else oqcore.QuantizationConfig.from_any(None, ["moe.activation=mxfp8"])
    _no_requantize(monkeypatch)
    model = oqcore.load(folder, config)
    _assert_stored_bytes(model, folder)
    acts = {n: _act(model, n) for n in model.oq_state.wrappers}
    assert {a for n, a in acts.items() if n.endswith("experts")} == {"mxfp8"}
    assert {a for n, a in acts.items() if not n.endswith("experts")} == {None}  # linear layers as stored


def test_an_activation_conflicting_with_the_checkpoint_is_refused(minilm, tmp_path_factory):
    folder = _write(minilm, "FP8_DYNAMIC", tmp_path_factory)  # fp8 per-channel weights, per-token activations
    for asked, shown in (("fp8_per_tensor_dynamic", "fp8_per_tensor_dynamic"), (None, "none")):
        with pytest.raises(ConfigError) as e:
            oqcore.load(folder, {"linear": {"activation": asked}})
        assert e.value.field == "linear.activation"
        msg = str(e.value)
        assert f"linear activation {shown} conflicts with compressed-tensors checkpoint {folder}" in msg
        assert "declares activation fp8_per_token for layer 'encoder.layer.0.attention.self.query'" in msg
        assert "remove the override or align it with the checkpoint" in msg


def test_the_declared_activation_or_the_own_shorthand_is_the_stored_model(minilm, tmp_path_factory, monkeypatch):
    folder = _write(minilm, "FP8_DYNAMIC", tmp_path_factory)
    stored = oqcore.load(folder)
    _no_requantize(monkeypatch)
    for config in ({"linear": {"activation": "fp8_per_token"}}, "fp8_per_channel", {"linear": "fp8_per_channel_static"}):
        model = oqcore.load(folder, config)
        _assert_stored_bytes(model, folder)
        assert model.oq_state.config.to_dict() == stored.oq_state.config.to_dict(), config


def test_a_shorthand_naming_another_scheme_is_refused_naming_both(minilm, tmp_path_factory):
    folder = _write(minilm, "MXFP8", tmp_path_factory)
    with pytest.raises(ConfigError) as e:
        oqcore.load(folder, "fp8_per_block")
    assert e.value.field == "linear.weight"
    assert "linear weight fp8_per_block_static conflicts with compressed-tensors checkpoint" in str(e.value)
    assert "already quantized as mxfp8" in str(e.value)


def test_an_override_the_stored_method_cannot_serve_is_refused_naming_the_layer(tiny_moe, tmp_path_factory):
    folder = _write(tiny_moe("mixtral"), "W8A16_CHANNEL", tmp_path_factory)  # int8 weight-only experts
    with pytest.raises(ConfigError) as e:
        oqcore.load(folder, {"moe": {"activation": "mxfp8"}})
    assert e.value.field == "moe.activation"
    assert "layer 'model.layers.0.mlp.experts'" in str(e.value) and "does not support activation mxfp8" in str(e.value)


def test_an_activation_only_spec_on_a_bf16_checkpoint_needs_a_weight(tiny_moe):
    with pytest.raises(ConfigError) as e:
        oqcore.load(tiny_moe("mixtral"), {"moe": {"activation": "mxfp8"}})
    assert e.value.field == "moe.weight"
    assert "an activation-only spec overrides the activation" in str(e.value) and "a weight key is needed" in str(e.value)


# -- composing with partly quantized checkpoints -------------------------------------------------------


@pytest.fixture(scope="module")
def experts_only(tiny_moe, tmp_path_factory):
    """A Mixtral whose experts are stored MXFP8 weight-only and attention in bf16."""
    return _write(tiny_moe("mixtral"), "MXFP8A16", tmp_path_factory, ignore=("lm_head", "re:.*self_attn.*"))


def _attention(model) -> list[str]:
    return [n for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))]


def test_composing_quantizes_the_high_precision_layers_online(experts_only, tiny_moe):
    src = tiny_moe("mixtral")
    model = oqcore.load(experts_only, {"linear": "fp8_per_block", "moe": {"activation": "mxfp8"}})
    fresh = oqcore.load(src, {"linear": "fp8_per_block"})
    attention = _attention(model)
    assert attention and set(attention) <= set(model.oq_state.wrappers)
    _same_state(model, fresh, attention)  # online, bytes as from the bf16 source
    _assert_stored_bytes_of_experts(model, experts_only)
    assert {_act(model, n) for n in model.oq_state.wrappers if n.endswith("experts")} == {"mxfp8"}
    # the model runs, and reloads from the source it came from are not involved
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(out.float()).all()


def _assert_stored_bytes_of_experts(model, folder):
    from safetensors.torch import load_file

    stored = load_file(folder / "model.safetensors")
    for name, w in model.oq_state.wrappers.items():
        if not name.endswith("experts"):
            continue
        prefix = name.replace(".mlp.", ".block_sparse_moe.")
        for e in range(w.w13_weight.shape[0]):
            gate = stored[f"{prefix}.{e}.w1.weight"]
            assert torch.equal(w.w13_weight[e, : gate.shape[0]].view(torch.uint8), gate.view(torch.uint8))
            assert torch.equal(w.w2_weight[e].view(torch.uint8), stored[f"{prefix}.{e}.w2.weight"].view(torch.uint8))


def test_without_a_linear_spec_the_high_precision_layers_stay(experts_only):
    model = oqcore.load(experts_only, {"moe": {"activation": "mxfp8"}})
    assert not set(_attention(model)) & set(model.oq_state.wrappers)
    assert type(model.get_submodule(_attention(model)[0])).__name__ == "Linear"


def test_a_target_naming_a_stored_layer_is_refused(experts_only):
    with pytest.raises(ConfigError) as e:
        oqcore.load(experts_only, {"targets": {"re:.*experts": "fp8_per_block"}})
    assert e.value.field == "targets"
    assert "targets pattern 're:.*experts' names layer 'model.layers.0.mlp.experts'" in str(e.value)
    assert "stores already quantized (weight mxfp8, activation none)" in str(e.value)


def test_a_target_on_high_precision_layers_composes(experts_only, tiny_moe):
    model = oqcore.load(experts_only, {"targets": {"re:.*q_proj": "fp8_per_channel"}})
    q = [n for n in _attention(model) if n.endswith("q_proj")]
    assert set(q) <= set(model.oq_state.wrappers)
    assert not {n for n in _attention(model) if not n.endswith("q_proj")} & set(model.oq_state.wrappers)
    _same_state(model, oqcore.load(tiny_moe("mixtral"), {"targets": {"re:.*q_proj": "fp8_per_channel"}}), q)


def test_ignore_keeps_the_stored_quantization_as_it_is(experts_only, monkeypatch):
    _no_requantize(monkeypatch)
    model = oqcore.load(experts_only, {"moe": {"activation": "mxfp8"}, "ignore": [r"re:model\.layers\.0\..*"]})
    assert _act(model, "model.layers.0.mlp.experts") is None  # ignored: as stored, no override
    assert _act(model, "model.layers.1.mlp.experts") == "mxfp8"
    _assert_stored_bytes_of_experts(model, experts_only)


@pytest.mark.parametrize("fmt", ["compressed-tensors", "oqcore"])
def test_composing_on_an_oqcore_export(fmt, tiny_moe, tmp_path):
    src = tiny_moe("mixtral")
    saved = oqcore.save_quantized(oqcore.load(src, {"moe": "mxfp8"}), tmp_path / "q", format=fmt)
    stored = oqcore.load(saved)
    model = oqcore.load(saved, {"linear": "fp8_per_channel"})
    attention = _attention(model)
    _same_state(model, oqcore.load(src, {"linear": "fp8_per_channel"}), attention)
    experts = [n for n in model.oq_state.wrappers if n.endswith("experts")]
    _same_state(model, stored, experts)
    # the stored layers keep their declared activation; asking another is the conflict error
    with pytest.raises(ConfigError, match=r"moe activation none conflicts with .*remove the override or align it"):
        oqcore.load(saved, {"moe": {"activation": None}})


# -- the CLI -------------------------------------------------------------------------------------------


def test_cli_overlays_overrides_on_a_stored_checkpoint(experts_only, tmp_path):
    import json

    from typer.testing import CliRunner

    from oqcore.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["explain", "--model", str(experts_only), "--json", "moe.activation=mxfp8", "linear.weight=fp8_per_channel"])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.stdout)["layers"] if row["action"] == "quantize"}
    assert rows, r.stdout
    experts = {n: row for n, row in rows.items() if n.endswith("experts")}
    assert experts and {row["activation"] for row in experts.values()} == {"mxfp8"}
    assert {row["weight"] for n, row in rows.items() if n.endswith("q_proj")} == {"fp8_per_channel_static"}
    r = runner.invoke(app, ["quantize", "--model", str(experts_only), "--out", str(tmp_path / "o"), "moe.activation=mxfp8"])
    assert r.exit_code == 0, r.output
    assert "(the checkpoint's, overlaid with --config/overrides)" in r.stdout
    back = oqcore.load(tmp_path / "o")
    assert {_act(back, n) for n in back.oq_state.wrappers} == {"mxfp8"}
    r = runner.invoke(app, ["explain", "--model", str(experts_only), "moe.activation=fp8_per_token"])
    assert r.exit_code == 2
    assert r.stderr.startswith(f"error: --config: {experts_only} is already quantized, and --config/overrides do not fit it: moe.activation: layer 'model.layers.0.mlp.experts'"), r.stderr


def test_backend_pins_of_the_overlay_apply_to_stored_layers(experts_only):
    model = oqcore.load(experts_only, {"moe": {"activation": "mxfp8"}, "backend": {"moe": "torch"}})
    assert {w.method.backend.name for n, w in model.oq_state.wrappers.items() if n.endswith("experts")} == {"torch"}
    plain = oqcore.load(experts_only, {"moe": {"activation": "mxfp8"}})
    assert model.oq_state.config.backend == {"moe": "torch"} and plain.oq_state.config.backend == {}
    with pytest.raises(ConfigError) as e:
        oqcore.load(experts_only, {"moe": {"activation": "mxfp8"}, "backend": {"moe": "nope"}})
    assert e.value.field == "backend.moe" and "unknown backend 'nope' for moe layers with weight mxfp8" in str(e.value)


# -- every MoE layout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme, act", [("MXFP8A16", "mxfp8"), ("W8A16_CHANNEL", "int8_per_token")])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe"])
def test_activation_override_on_every_layout(arch, scheme, act, tiny_moe, tmp_path_factory, monkeypatch):
    folder = _write(tiny_moe(arch), scheme, tmp_path_factory)
    _no_requantize(monkeypatch)
    model = oqcore.load(folder, {"linear": {"activation": act}, "moe": {"activation": act}})
    _assert_stored_bytes(model, folder)
    assert model.oq_state.wrappers and {_act(model, n) for n in model.oq_state.wrappers} == {act}
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4, 5]])).logits.float()).all()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe"])
def test_composing_on_every_layout(arch, tiny_moe, tmp_path_factory):
    src = tiny_moe(arch)
    folder = _write(src, "W8A16_CHANNEL", tmp_path_factory, ignore=("lm_head", "re:.*self_attn.*"))
    model = oqcore.load(folder, {"linear": "fp8_per_channel"})
    attention = _attention(model)
    assert attention and set(attention) <= set(model.oq_state.wrappers)
    _same_state(model, oqcore.load(src, {"linear": "fp8_per_channel"}), attention)
    stored = oqcore.load(folder)  # the experts exactly as a plain read of the checkpoint gives them
    experts = [n for n in model.oq_state.wrappers if n.endswith("experts")]
    assert experts and set(stored.oq_state.wrappers) == set(experts)
    _same_state(model, stored, experts)
