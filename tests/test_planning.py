"""plan(): layer classification (nn.Linear, transformers v5 fused experts incl. GPT-OSS), ignore,
targets (exact, re: matched from the start as vLLM does, globs), routers and lm_head, overlap errors,
targets on modules that cannot be quantized, shape checks, the vLLM summary line, explain."""

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import oqcore
from oqcore import ConfigError, UnsupportedLayerError
from oqcore.layers import is_router, layer_kind, moe_layout
from oqcore.matching import matches
from toy_scheme import TOY, register_toy

MOE_CONFIGS = {
    "mixtral": dict(num_local_experts=4),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=40, head_dim=16),
    "olmoe": dict(num_experts=4),
    "gpt_oss": dict(num_local_experts=4, head_dim=16),
}


@pytest.fixture(autouse=True)
def toy():
    register_toy()


def meta_moe(model_type):
    cfg = AutoConfig.for_model(
        model_type,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        **MOE_CONFIGS[model_type],
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("model_type", sorted(MOE_CONFIGS))
def test_moe_models_are_classified(model_type):
    m = meta_moe(model_type)
    p = oqcore.plan(m, {"scheme": "toy"}, device="cpu")
    moe = [lp.name for lp in p.quantized if lp.kind == "moe"]
    linear = [lp.name for lp in p.quantized if lp.kind == "linear"]
    assert moe == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert len(linear) == 8 and all(n.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj") for n in linear)
    assert [(lp.name, lp.reason) for lp in p.skipped] == [("lm_head", "output embedding: kept in high precision")]
    assert p.summary() == (
        "Quantized 10 layers of types: self_attn.q_proj: 2 (from linear: toy_int4); self_attn.k_proj: 2 (from linear: "
        "toy_int4); self_attn.v_proj: 2 (from linear: toy_int4); self_attn.o_proj: 2 (from linear: toy_int4); "
        "mlp.experts: 2 (from moe: toy_int4)"
    )


def test_moe_layouts_standard_and_gpt_oss_transposed():
    mix = moe_layout(meta_moe("mixtral").model.layers[0].mlp.experts)
    assert (mix.num_experts, mix.hidden_size, mix.intermediate_size, mix.transposed, mix.has_bias) == (4, 64, 96, False, False)
    assert mix.w13_shape == (4, 192, 64) and mix.w2_shape == (4, 64, 96)
    oss = moe_layout(meta_moe("gpt_oss").model.layers[0].mlp.experts)
    assert (oss.transposed, oss.has_bias, oss.concatenated) == (True, True, False)
    assert oss.w13_shape == (4, 64, 192) and oss.w2_shape == (4, 96, 64)
    qwen = moe_layout(meta_moe("qwen3_moe").model.layers[0].mlp.experts)
    assert qwen.intermediate_size == 40


class Experts(nn.Module):
    """A fused-experts module with no transformers attributes: layout inferred from shapes."""

    def __init__(self, e=4, h=32, i=24, transposed=False):
        super().__init__()
        shape13, shape2 = ((e, h, 2 * i), (e, i, h)) if transposed else ((e, 2 * i, h), (e, h, i))
        self.gate_up_proj = nn.Parameter(torch.zeros(shape13))
        self.down_proj = nn.Parameter(torch.zeros(shape2))


class Block(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.gate = nn.Linear(32, 4, bias=False)
        self.experts = Experts(**kw)
        self.proj = nn.Linear(32, 32)


def test_layout_inferred_from_shapes():
    assert moe_layout(Experts()).transposed is False
    assert moe_layout(Experts(transposed=True)).transposed is True
    assert moe_layout(nn.Linear(3, 3)) is None
    assert layer_kind(nn.Conv1d(3, 3, 1)) is None


def test_router_linear_stays_high_precision_unless_targeted():
    m = nn.ModuleDict({"block": Block()})
    assert is_router("block.gate", m.block.gate, m.block)
    p = oqcore.plan(m, {"scheme": "toy"})
    assert p["block.gate"].action == "skip" and p["block.gate"].reason == "MoE router: kept in high precision"
    assert p["block.experts"].quantized and p["block.proj"].quantized
    t = oqcore.plan(m, {"targets": {"block.gate": "toy_int4", "re:.*experts": "toy_int4"}})
    assert t["block.gate"].quantized and t["block.gate"].reason == "targets['block.gate']"
    assert not t["block.proj"].quantized and t["block.proj"].reason == "no linear spec in the config"


def test_pattern_kinds():
    assert matches("model.layers.0.q_proj", "model.layers.0.q_proj")
    assert not matches("q_proj", "model.layers.0.q_proj")  # exact means exact
    assert matches("re:.*q_proj", "model.layers.0.q_proj")
    assert not matches("re:q_proj", "model.layers.0.q_proj")  # re.match: from the start of the name
    assert matches("re:.*q_pro", "model.layers.0.q_proj")  # ...but not to its end (vLLM's re.match)
    assert matches("re:.*mlp", "model.layers.0.mlp.gate")
    assert not matches("re:.*mlp$", "model.layers.0.mlp.gate")
    assert matches("re:model", "model.layers.0.q_proj")
    assert matches("model.layers.*.q_proj", "model.layers.11.q_proj")
    assert matches("*.experts", "model.layers.0.mlp.experts")
    assert not matches("model.layers.?.q_proj", "model.layers.11.q_proj")


def test_ignore_and_targets_apply_per_layer():
    m = meta_moe("mixtral")
    p = oqcore.plan(
        m,
        {
            "targets": {"re:.*\\.(q|k)_proj": {"weight": "toy_int4", "activation": "toy_act"}, "*.experts": "toy"},
            "ignore": ["model.layers.1.self_attn.v_proj", "nothing.matches.this"],
        },
    )
    assert p["model.layers.0.self_attn.q_proj"].bound.activation_key is not None
    assert p["model.layers.1.self_attn.v_proj"].reason == "ignored by 'model.layers.1.self_attn.v_proj'"
    assert p["model.layers.1.self_attn.k_proj"].reason == "targets['re:.*\\\\.(q|k)_proj']"
    assert p["model.layers.0.self_attn.v_proj"].reason == "no linear spec in the config"
    assert p["model.layers.0.mlp.experts"].bound.spec.weight == TOY
    assert p.unmatched == ["nothing.matches.this"]


def test_layer_matched_by_ignore_and_target_is_an_error():
    with pytest.raises(ConfigError) as e:
        oqcore.plan(meta_moe("mixtral"), {"targets": {"re:.*q_proj": "toy_int4"}, "ignore": ["model.layers.0.self_attn.q_proj"]})
    assert str(e.value) == (
        "targets: layer 'model.layers.0.self_attn.q_proj' is matched by ignore pattern "
        "'model.layers.0.self_attn.q_proj' and by target 're:.*q_proj'; remove it from one of them"
    )


def test_layer_matched_by_two_targets_is_an_error():
    with pytest.raises(ConfigError, match=r"layer 'model.layers.0.self_attn.q_proj' is matched by two targets, 're:.*q_proj' and 'model.layers.\*.self_attn.\*'"):
        oqcore.plan(meta_moe("mixtral"), {"targets": {"re:.*q_proj": "toy_int4", "model.layers.*.self_attn.*": "toy_int4"}})


def test_target_whose_shorthand_has_no_slot_for_the_layer_kind():
    with pytest.raises(ConfigError) as e:
        oqcore.plan(meta_moe("mixtral"), {"targets": {"re:.*o_proj": "toy_moe_only"}})
    assert e.value.field == "targets['re:.*o_proj'].weight"
    assert "cannot apply to linear layer 'model.layers.0.self_attn.o_proj': shorthand 'toy_moe_only' defines no linear spec" in str(e.value)


def test_exact_target_naming_a_non_layer():
    with pytest.raises(ConfigError) as e:
        oqcore.plan(meta_moe("mixtral"), {"targets": {"model.layers.0.input_layernorm": "toy_int4"}})
    assert e.value.field == "targets['model.layers.0.input_layernorm']"
    assert "matches layer 'model.layers.0.input_layernorm' of type MixtralRMSNorm, which cannot be quantized" in str(e.value)


@pytest.mark.parametrize(
    "pattern, layer, type_name",
    [
        ("re:.*embed", "model.embed_tokens", "Embedding"),
        ("re:model.layers.0", "model.layers.0.mlp.gate", "MixtralTopKRouter"),  # transformers v5's router
        ("model.layers.*", "model.layers.0.mlp.gate", "MixtralTopKRouter"),
        ("model.layers.*_layernorm", "model.layers.0.input_layernorm", "MixtralRMSNorm"),
        ("re:.*norm$", "model.layers.0.input_layernorm", "MixtralRMSNorm"),
    ],
)
def test_target_landing_on_a_module_that_cannot_be_quantized(pattern, layer, type_name):
    with pytest.raises(ConfigError) as e:
        oqcore.plan(meta_moe("mixtral"), {"targets": {pattern: "toy_int4"}})
    assert e.value.field == f"targets[{pattern!r}]"
    assert f"matches layer {layer!r} of type {type_name}, which cannot be quantized" in str(e.value)


def test_target_matching_containers_is_fine():
    # re.match from the start: the container and every layer under it match; only the layers count
    p = oqcore.plan(
        meta_moe("mixtral"), {"targets": {"re:model.layers.0.self_attn": "toy_int4", "model.layers.1.mlp": "toy_int4"}}
    )
    assert [lp.name for lp in p.quantized] == [f"model.layers.0.self_attn.{x}_proj" for x in "qkvo"]
    assert p.unmatched == ["model.layers.1.mlp"]


def test_vllm_ignore_regex_is_a_prefix_match():
    p = oqcore.plan(meta_moe("mixtral"), {"scheme": "toy", "ignore": ["re:.*mlp", "re:.*self_attn.[qk]"]})
    assert [lp.name for lp in p.quantized] == ["model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj",
                                               "model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.o_proj"]
    assert p["model.layers.1.mlp.experts"].reason == "ignored by 're:.*mlp'"


def test_summary_groups_by_layer_type_and_source_in_vllm_format():
    m = meta_moe("mixtral")
    p = oqcore.plan(m, {"targets": {"re:.*[qk]_proj": {"weight": "toy_int4", "activation": None}, "re:.*experts$": "toy_int4"}})
    assert p.summary() == (
        "Quantized 6 layers of types: self_attn.q_proj: 2 (from targets: re:.*[qk]_proj, "
        '{"weight":"toy_int4","activation":null}); self_attn.k_proj: 2 (from targets: re:.*[qk]_proj, '
        '{"weight":"toy_int4","activation":null}); mlp.experts: 2 (from targets: re:.*experts$, toy_int4)'
    )
    assert oqcore.plan(m, {"linear": {"weight": "toy_int4", "activation": "toy_act"}, "ignore": ["re:.*[qkv]_proj"]}).summary() == (
        'Quantized 2 layers of types: self_attn.o_proj: 2 (from linear: {"weight":"toy_int4","activation":"toy_act"})'
    )
    assert oqcore.plan(m, oqcore.QuantizationConfig.none()).summary() == "Quantized 0 layers"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("model.layers.11.mlp.down_proj", "mlp.down_proj"),
        ("model.layers.0.mlp.experts", "mlp.experts"),
        ("lm_head", "lm_head"),
        ("encoder.layer.3.attention.self.query", "attention.self.query"),
        ("blocks.1.2.proj", "proj"),
        ("0", "0"),
    ],
)
def test_layer_type(name, expected):
    from oqcore.planning import layer_type

    assert layer_type(name) == expected


def test_shape_limits_are_checked_at_plan_time_naming_the_layer():
    m = nn.Sequential(nn.Linear(32, 8), nn.Linear(8, 8), nn.Linear(8, 7), nn.Linear(7, 4))
    with pytest.raises(UnsupportedLayerError) as e:
        oqcore.plan(m, {"linear": "toy_int4"})
    assert str(e.value) == "layer '3': toy needs an even K, got in_features=7"
    assert e.value.layer == "3"


def test_explain_table_and_rows():
    p = oqcore.plan(nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 15)), {"linear": "toy_int4", "ignore": []})
    text = p.explain(verbose=True)
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "kind", "shape", "weight", "activation", "quantizer", "backend", "why"]
    assert lines[2].split() == ["0", "linear", "[16,", "32]", "toy_int4", "none", "torch", "toy-fast", "linear"]
    assert "  1: backend toy-fast rejected: toy-fast needs an even N" in lines
    assert lines[-1] == "Quantized 2 layers of types: 0: 1 (from linear: toy_int4); 1: 1 (from linear: toy_int4)"
    row = p.rows()[1]
    assert row["backend"] == "torch" and row["rejected"]["toy-fast"] == "toy-fast needs an even N"
    assert row["quantizer"] == "torch" and row["rejected_quantizers"] == {}
    assert row["options"] == {"qmax": 7} and row["method"] == "ToyLinear"


def test_plan_does_not_touch_weights_on_meta():
    m = meta_moe("gpt_oss")
    before = {n: (p.device.type, p.shape) for n, p in m.named_parameters()}
    oqcore.plan(m, "toy")
    assert {n: (p.device.type, p.shape) for n, p in m.named_parameters()} == before
    assert all(d == "meta" for d, _ in before.values())
