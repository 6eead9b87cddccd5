"""reload_weights: RL-style refits re-quantize into the same storages, bit-exact with a fresh load,
and bad input changes nothing."""

import pytest
import torch

import oqcore
from oqcore.errors import CheckpointError, UnsupportedLayerError
from oqcore.loading.checkpoint import iter_checkpoint
from oqcore.synthetic import perturbed_copy

IDS = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
CONFIG = {"linear": "fp8_per_block", "moe": "mxfp8"}


@pytest.fixture(autouse=True)
def no_triton(monkeypatch):
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")


@pytest.fixture(scope="module")
def second(tiny_moe, tmp_path_factory):
    return {arch: perturbed_copy(tiny_moe(arch), tmp_path_factory.mktemp(f"{arch}-b")) for arch in ("mixtral", "gpt_oss")}


def snapshot(model):
    return {n: (t.data_ptr(), t.detach().clone()) for n, t in model.state_dict().items()}


@torch.no_grad()
def logits(model):
    return model(input_ids=IDS).logits


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_reload_equals_fresh_load_and_moves_no_storage(tiny_moe, second, arch):
    model = oqcore.load(tiny_moe(arch), CONFIG)
    before = snapshot(model)
    layers = oqcore.reload_weights(model, iter_checkpoint(second[arch]))
    assert len(layers) == len(model.oq_state.wrappers)
    fresh = oqcore.load(second[arch], CONFIG)
    assert torch.equal(logits(model), logits(fresh))
    after = model.state_dict()
    assert {n: t.data_ptr() for n, t in after.items()} == {n: p for n, (p, _) in before.items()}
    changed = [n for n, (_, old) in before.items() if not torch.equal(old, after[n])]
    assert "model.layers.0.mlp.experts.w13_weight" in changed and "model.embed_tokens.weight" in changed


def test_reload_a_subset_of_layers(tiny_moe, second):
    model = oqcore.load(tiny_moe("mixtral"), CONFIG)
    before = snapshot(model)
    new = dict(iter_checkpoint(second["mixtral"]))
    subset = {k: v for k, v in new.items() if k.startswith("model.layers.1.block_sparse_moe.experts.")}
    assert len(subset) == 12  # 4 experts x w1, w2, w3, in the checkpoint's per-expert naming
    assert oqcore.reload_weights(model, subset) == ["model.layers.1.mlp.experts"]
    after = model.state_dict()
    changed = {n for n, (_, old) in before.items() if not torch.equal(old, after[n])}
    assert changed == {
        "model.layers.1.mlp.experts.w13_weight",
        "model.layers.1.mlp.experts.w13_weight_scale",
        "model.layers.1.mlp.experts.w2_weight",
        "model.layers.1.mlp.experts.w2_weight_scale",
    }


def test_reload_in_model_naming(tiny_moe, second):
    """The fused name (what a trainer holding the transformers model has) works as well."""
    model = oqcore.load(tiny_moe("gpt_oss"), CONFIG)
    new = dict(iter_checkpoint(second["gpt_oss"]))
    part = {k: v for k, v in new.items() if ".layers.0.mlp.experts." in k}
    assert sorted(part) == [f"model.layers.0.mlp.experts.{p}" for p in ("down_proj", "down_proj_bias", "gate_up_proj", "gate_up_proj_bias")]
    assert oqcore.reload_weights(model, part) == ["model.layers.0.mlp.experts"]


BAD = {
    "unknown name": (lambda w: {**w, "model.layers.0.mlp.experts.99.w1.weight": torch.zeros(96, 160)}, CheckpointError,
                     "'model.layers.0.mlp.experts.99.w1.weight' is not a weight of this model"),
    "typo": (lambda w: {"model.layers.0.self_attn.q_prj.weight": torch.zeros(160, 160)}, CheckpointError,
             "did you mean 'model.layers.0.self_attn.q_proj.weight'"),
    "shape": (lambda w: {**w, "model.norm.weight": torch.zeros(161)}, CheckpointError,
              "'model.norm.weight' has shape [161], expected [160]"),
    "dtype": (lambda w: {**w, "model.norm.weight": torch.zeros(160, dtype=torch.int32)}, CheckpointError,
              "must be a floating-point tensor"),
    "nan": (lambda w: {**w, "model.layers.1.block_sparse_moe.experts.3.w2.weight": torch.full((160, 96), float("nan"))},
            UnsupportedLayerError, "layer 'model.layers.1.block_sparse_moe.experts.3.w2.weight': weight holds 15360 NaN/Inf"),
    "part of the experts": (lambda w: {k: v for k, v in w.items() if "experts.2.w1" not in k}, CheckpointError,
                            "needs 8 checkpoint tensors, 1 missing: model.layers.0.block_sparse_moe.experts.2.w1.weight"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_reload_changes_nothing(tiny_moe, second, case):
    make, err, msg = BAD[case]
    model = oqcore.load(tiny_moe("mixtral"), CONFIG)
    before = snapshot(model)
    ref = logits(model)
    with pytest.raises(err, match=msg.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        oqcore.reload_weights(model, make(dict(iter_checkpoint(second["mixtral"]))))
    after = model.state_dict()
    assert all(torch.equal(old, after[n]) and after[n].data_ptr() == p for n, (p, old) in before.items())
    assert torch.equal(logits(model), ref)


def test_reload_needs_a_whole_layer(tiny_moe, second):
    model = oqcore.load(tiny_moe("mixtral"), CONFIG)
    new = dict(iter_checkpoint(second["mixtral"]))
    only_w2 = {k: v for k, v in new.items() if k.startswith("model.layers.0.block_sparse_moe.experts.") and k.endswith("w2.weight")}
    with pytest.raises(CheckpointError, match="layer 'model.layers.0.mlp.experts' is quantized as a whole; missing model.layers.0.mlp.experts.gate_up_proj"):
        oqcore.reload_weights(model, only_w2)


def test_reload_after_quantize_inplace(tiny_moe, second):
    from oqcore.fidelity import reference_model

    model = oqcore.quantize_(reference_model(tiny_moe("gpt_oss"), torch.bfloat16), CONFIG)
    ptrs = {n: t.data_ptr() for n, t in model.state_dict().items()}
    oqcore.reload_weights(model, iter_checkpoint(second["gpt_oss"]))
    assert torch.equal(logits(model), logits(oqcore.load(second["gpt_oss"], CONFIG)))
    assert {n: t.data_ptr() for n, t in model.state_dict().items()} == ptrs


def test_reload_on_a_plain_model():
    with pytest.raises(oqcore.ConfigError, match="^model: Linear was not loaded or quantized by oqcore"):
        oqcore.reload_weights(torch.nn.Linear(2, 2), {})


FP4_CONFIGS = {
    "mxfp4": {"linear": "mxfp4", "moe": {"weight": "mxfp4", "activation": "mxfp8"}},
    "nvfp4": {"linear": "nvfp4", "moe": "nvfp4"},
}


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe", "gpt_oss"])
@pytest.mark.parametrize("scheme", list(FP4_CONFIGS))
def test_fp4_reload_in_place_equals_fresh_load_and_a_bad_one_changes_nothing(tiny_moe, tmp_path, arch, scheme):
    """The 4-bit schemes on every layout: packed codes, e8m0 / e4m3 scales and nvfp4's per-expert
    global scales refit into the same storages, equal to a fresh load; a NaN in the last expert
    stack is refused naming the layer, with the model as it was."""
    cfg = FP4_CONFIGS[scheme]
    src = tiny_moe(arch)
    new = perturbed_copy(src, tmp_path / "b")
    model = oqcore.load(src, cfg)
    ptrs = {n: t.data_ptr() for n, t in model.state_dict().items()}
    oqcore.reload_weights(model, iter_checkpoint(new))
    assert {n: t.data_ptr() for n, t in model.state_dict().items()} == ptrs
    assert torch.equal(logits(model), logits(oqcore.load(new, cfg)))

    before = snapshot(model)
    ref = logits(model)
    weights = dict(iter_checkpoint(src))
    last = [k for k in weights if "experts" in k and weights[k].is_floating_point() and weights[k].dim() >= 2][-1]
    weights[last] = weights[last].clone()
    weights[last].view(-1)[7] = float("nan")
    with pytest.raises(UnsupportedLayerError, match="NaN/Inf"):
        oqcore.reload_weights(model, weights)
    after = model.state_dict()
    assert all(torch.equal(old, after[n]) and after[n].data_ptr() == p for n, (p, old) in before.items())
    assert torch.equal(logits(model), ref)


def test_nvfp4_fused_siblings_reload_together(tiny_moe, tmp_path):
    """q/k/v share one NVFP4 global scale (as vLLM serves them fused): reloading one alone is
    refused by name, nothing changed; all three together give a fresh load's bytes."""
    src = tiny_moe("mixtral")
    new = perturbed_copy(src, tmp_path / "new")
    model = oqcore.load(src, {"linear": "nvfp4"})
    attn = "model.layers.0.self_attn"
    weights = dict(iter_checkpoint(new))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        oqcore.reload_weights(model, {f"{attn}.q_proj.weight": weights[f"{attn}.q_proj.weight"]})
    msg = str(e.value)
    assert f"'{attn}.q_proj'" in msg and f"'{attn}.k_proj'" in msg and f"'{attn}.v_proj'" in msg and "same call" in msg, msg
    assert all(torch.equal(v.view(torch.uint8) if v.element_size() == 1 else v, before[k].view(torch.uint8) if v.element_size() == 1 else before[k]) for k, v in model.state_dict().items())
    oqcore.reload_weights(model, {f"{attn}.{p}_proj.weight": weights[f"{attn}.{p}_proj.weight"] for p in "qkv"})
    fresh = oqcore.load(new, {"linear": "nvfp4"})
    for p in "qkv":
        got, want = model.get_submodule(f"{attn}.{p}_proj"), fresh.get_submodule(f"{attn}.{p}_proj")
        assert torch.equal(got.weight, want.weight) and torch.equal(got.weight_global_scale, want.weight_global_scale)
        assert torch.equal(got.weight_scale.view(torch.uint8), want.weight_scale.view(torch.uint8))
    shared = {float(model.get_submodule(f"{attn}.{p}_proj").weight_global_scale) for p in "qkv"}
    assert len(shared) == 1
