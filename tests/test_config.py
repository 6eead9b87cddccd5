"""QuantSpec / QuantizationConfig: names, shorthands, omitted vs null activation, options, YAML
and dotlist overrides, targets, and the error messages."""

import pytest

import oqcore
from oqcore import ConfigError, QuantizationConfig, QuantSpec, UnknownKeyError
from toy_scheme import TOY, TOY_ACT, ToyOptions, register_toy


@pytest.fixture(autouse=True)
def toy():
    register_toy()


def test_spec_accepts_names_and_keys():
    assert QuantSpec(weight="toy_int4").weight == TOY
    assert QuantSpec(weight=TOY).weight == TOY
    assert QuantSpec(weight="toy4", activation="toy_act").activation == TOY_ACT


def test_activation_omitted_vs_explicit_null():
    omitted = QuantSpec(weight="toy_int4")
    null = QuantSpec(weight="toy_int4", activation=None)
    word = QuantSpec.model_validate({"weight": "toy_int4", "activation": "none"})
    assert omitted.activation is None and not omitted.activation_given
    assert null.activation is None and null.activation_given
    assert word.activation is None and word.activation_given
    assert omitted.to_dict() == {"weight": "toy_int4"}
    assert null.to_dict() == {"weight": "toy_int4", "activation": None}


def test_method_default_activation_applies_only_when_omitted():
    from oqcore.config import bind_spec

    class WithDefault(oqcore.OnlineLinearMethodBase):
        weight_key = TOY
        supported_activation_keys = (None, TOY_ACT)
        default_activation_key = TOY_ACT

    from oqcore.plugins import get_registry

    reg = get_registry()
    reg.methods[("linear", TOY)] = reg.methods[("linear", TOY)].__class__("linear", TOY, WithDefault, "toy")
    assert bind_spec({"weight": "toy_int4"}, "linear", reg).activation_key == TOY_ACT
    assert bind_spec({"weight": "toy_int4", "activation": None}, "linear", reg).activation_key is None


def test_unknown_weight_name_did_you_mean_names_the_field():
    with pytest.raises(UnknownKeyError) as e:
        QuantizationConfig(linear={"weight": "toy_in4"})
    assert e.value.field == "linear.weight"
    assert "did you mean 'toy_int4'?" in str(e.value)


def test_unknown_shorthand_in_slot_lists_keys_and_shorthands():
    with pytest.raises(UnknownKeyError, match=r"^linear.weight: unknown weight key or shorthand 'fp8_per_blok'; did you mean 'fp8_per_block'\?"):
        QuantizationConfig(linear="fp8_per_blok")


def test_shorthand_fills_its_slots_and_explicit_fields_win():
    cfg = QuantizationConfig(scheme="toy", moe={"weight": "toy_int4", "options": {"qmax": 3}})
    assert cfg.linear.weight == TOY and cfg.moe.options == {"qmax": 3}
    merged = QuantizationConfig(scheme="toy", linear={"activation": "toy_act"})
    assert merged.linear.weight == TOY and merged.linear.activation == TOY_ACT
    alias = QuantizationConfig.model_validate({"quantization": "toy_moe_only"})
    assert alias.linear is None and alias.moe.activation_given and alias.moe.activation is None


def test_shorthand_slot_error():
    with pytest.raises(ConfigError) as e:
        QuantizationConfig(linear="toy_moe_only")
    assert e.value.field == "linear.weight"
    assert "shorthand 'toy_moe_only' defines no linear spec (it defines: moe)" in str(e.value)


def test_builtin_int8_weight_only_shorthand_has_no_linear_spec():
    with pytest.raises(ConfigError, match=r"^linear.weight: shorthand 'int8_per_channel_weight_only' defines no linear spec"):
        QuantizationConfig(linear="int8_per_channel_weight_only")


def test_unsupported_activation_names_field_and_valid_choices():
    with pytest.raises(ConfigError) as e:
        QuantizationConfig(moe={"weight": "toy_int4", "activation": "toy_act"})
    assert e.value.field == "moe.activation"
    assert "ToyMoE (moe, weight toy_int4) does not support activation toy_act; supported: none" in str(e.value)


def test_no_method_for_kind():
    from oqcore.plugins import get_registry

    del get_registry().methods[("moe", TOY)]
    with pytest.raises(ConfigError, match=r"^moe.weight: no moe method quantizes weights to 'toy_int4'"):
        QuantizationConfig(moe="toy_int4")


def test_options_validated_by_method_model():
    cfg = QuantizationConfig(linear={"weight": "toy_int4", "options": {"qmax": 3}})
    assert cfg.linear.options == {"qmax": 3}
    with pytest.raises(ConfigError) as e:
        QuantizationConfig(linear={"weight": "toy_int4", "options": {"qmx": 3}})
    assert e.value.field == "linear.options.qmx"
    with pytest.raises(ConfigError) as e:
        QuantizationConfig(linear={"weight": "toy_int4", "options": {"qmax": "lots"}})
    assert e.value.field == "linear.options.qmax"
    assert ToyOptions().qmax == 7


def test_vllm_style_dict_is_accepted():
    cfg = QuantizationConfig.model_validate(
        {"linear": "toy_int4", "moe": {"weight": "toy_int4", "activation": None}, "ignore": ["lm_head", "re:.*gate"]}
    )
    assert cfg.ignore == ["lm_head", "re:.*gate"]
    assert cfg.to_dict() == {
        "linear": {"weight": "toy_int4"},
        "moe": {"weight": "toy_int4", "activation": None},
        "ignore": ["lm_head", "re:.*gate"],
    }
    assert QuantizationConfig.model_validate(cfg.to_dict()) == cfg


def test_unknown_top_level_field():
    with pytest.raises(ConfigError) as e:
        QuantizationConfig.model_validate({"linaer": "toy_int4"})
    assert e.value.field == "linaer"


def test_targets_exclusive_with_kind_specs():
    with pytest.raises(ConfigError, match="^targets: targets and scheme/linear/moe are mutually exclusive"):
        QuantizationConfig(linear="toy_int4", targets={"re:.*q_proj": "toy_int4"})


def test_target_spec_that_fits_no_kind_is_rejected_early():
    with pytest.raises(UnknownKeyError) as e:
        QuantizationConfig(targets={"re:.*q_proj": {"weight": "toy_int5"}})
    assert e.value.field == "targets['re:.*q_proj'].weight"


def test_bad_regex_and_empty_pattern():
    with pytest.raises(ConfigError, match=r"^ignore\[1\]: invalid regular expression '\('"):
        QuantizationConfig(ignore=["lm_head", "re:("])
    with pytest.raises(ConfigError, match=r"^targets\[''\]: a layer pattern must be a non-empty string"):
        QuantizationConfig(targets={"": "toy_int4"})


def test_backend_pin_kind_checked():
    assert QuantizationConfig(linear="toy_int4", backend={"linear": "torch"}).backend == {"linear": "torch"}
    with pytest.raises(ConfigError, match=r"^backend.attention: unknown layer kind 'attention'; kinds: linear, moe"):
        QuantizationConfig(backend={"attention": "torch"})


def test_yaml_with_dotlist_overrides(tmp_path):
    f = tmp_path / "q.yaml"
    f.write_text("moe: toy_moe_only\nlinear: toy_int4\nignore: [lm_head]\n")
    cfg = QuantizationConfig.from_yaml(f, ["linear.activation=toy_act", "ignore=[lm_head,re:.*router]"])
    assert cfg.linear.activation == TOY_ACT
    assert cfg.moe.weight == TOY and cfg.moe.activation is None and cfg.moe.activation_given
    assert cfg.ignore == ["lm_head", "re:.*router"]
    nulled = QuantizationConfig.from_yaml(f, ["linear.activation=null"])
    assert nulled.linear.activation_given and nulled.linear.activation is None


def test_from_dotlist_alone_and_bad_override():
    cfg = QuantizationConfig.from_dotlist(["scheme=toy", "moe.options.qmax=3"])
    assert cfg.moe.options == {"qmax": 3} and cfg.linear.weight == TOY
    with pytest.raises(ConfigError, match="override 'linear' is not of the form key=value"):
        QuantizationConfig.from_dotlist(["linear"])


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file '.*missing.yaml' does not exist"):
        QuantizationConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("linear: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml' is not valid YAML"):
        QuantizationConfig.from_yaml(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping at the top, got list"):
        QuantizationConfig.from_yaml(listy)


def test_from_any():
    assert QuantizationConfig.from_any("toy").linear.weight == TOY
    assert QuantizationConfig.from_any({"moe": "toy_int4"}).moe.weight == TOY
    with pytest.raises(ConfigError, match="the config quantizes nothing"):
        QuantizationConfig.from_any(None)
    none = QuantizationConfig.none()
    assert none.linear is None and none.moe is None and not none.targets and not none.ignore


# ---- vLLM semantics -------------------------------------------------------------------------


def test_quantization_online_is_vllms_no_shorthand_value():
    cfg = QuantizationConfig.model_validate({"quantization": "online", "linear": "toy_int4", "ignore": ["lm_head"]})
    assert cfg.scheme is None and cfg.linear.weight == TOY and cfg.moe is None
    t = QuantizationConfig.model_validate({"quantization": "online", "targets": {"re:.*q_proj": "toy_int4"}})
    assert list(t.targets) == ["re:.*q_proj"]
    for nothing in ({}, {"ignore": ["lm_head"]}, {"quantization": "online"}, {"backend": {}}):
        with pytest.raises(ConfigError, match="the config quantizes nothing") as e:
            QuantizationConfig.model_validate(nothing)
        assert e.value.field is None


def test_null_slot_falls_back_to_the_shorthand_and_null_weight_disables_the_kind():
    # vLLM: `linear or base.linear`, and {weight: null} leaves the kind unquantized
    assert QuantizationConfig.model_validate({"quantization": "toy", "linear": None}).linear.weight == TOY
    moe_only = QuantizationConfig.model_validate({"quantization": "toy", "linear": {"weight": None, "activation": None}})
    assert moe_only.linear is None and moe_only.moe.weight == TOY
    assert QuantizationConfig.from_any("toy", ["linear.weight=null"]).linear is None


def test_str_of_a_spec_is_vllms():
    assert str(QuantSpec(weight="toy_int4")) == "toy_int4"
    assert str(QuantSpec(weight="toy_int4", activation=None)) == '{"weight":"toy_int4","activation":null}'
    assert str(QuantSpec(weight="toy_int4", activation="toy_act")) == '{"weight":"toy_int4","activation":"toy_act"}'
    assert str(QuantSpec(weight="toy_int4", options={"qmax": 3})) == '{"weight":"toy_int4","options":{"qmax":3}}'
    assert str(QuantSpec(weight="mxfp8")) == "mxfp8"


def test_none_is_an_unvalidated_empty_config():
    none = QuantizationConfig.none()
    assert (none.scheme, none.linear, none.moe, none.ignore, none.targets, none.backend) == (None, None, None, [], {}, {})
    assert none.to_dict() == {} and none == QuantizationConfig.none()
    assert QuantizationConfig.from_any(none) is none


# ---- from_any and overrides -----------------------------------------------------------------


def test_from_any_sources(tmp_path):
    cfg = QuantizationConfig(linear="toy_int4")
    assert QuantizationConfig.from_any(cfg) is cfg
    assert QuantizationConfig.from_any({"moe": "toy_int4"}).moe.weight == TOY
    f = tmp_path / "q.yaml"
    f.write_text("linear: toy_int4\n")
    assert QuantizationConfig.from_any(f).linear.weight == TOY
    assert QuantizationConfig.from_any(str(f)).linear.weight == TOY
    j = tmp_path / "q.json"
    j.write_text('{"moe": {"weight": "toy_int4", "activation": null}}')
    assert QuantizationConfig.from_any(j).moe.activation_given
    sh = QuantizationConfig.from_any("toy_moe_only")
    assert sh.linear is None and sh.moe.weight == TOY
    assert QuantizationConfig.from_any(None, ["linear=toy_int4"]).linear.weight == TOY
    assert QuantizationConfig.from_any("online", ["moe=toy4"]).moe.weight == TOY


def test_from_any_key_name_fills_every_kind_with_a_method():
    both = QuantizationConfig.from_any("toy_int4")
    assert both.linear.weight == TOY and both.moe.weight == TOY
    assert QuantizationConfig.from_any("toy4") == both  # an alias names the same key
    from oqcore.plugins import get_registry

    del get_registry().methods[("linear", TOY)]
    moe_only = QuantizationConfig.from_any("toy_int4")
    assert moe_only.linear is None and moe_only.moe.weight == TOY
    with pytest.raises(ConfigError, match="'toy_act' is an activation key, not a weight key"):
        QuantizationConfig.from_any("toy_act")


def test_from_any_unknown_name_says_neither_file_nor_name():
    with pytest.raises(ConfigError) as e:
        QuantizationConfig.from_any("toy_int5")
    msg = str(e.value)
    assert msg.startswith("config 'toy_int5' is neither a file nor a shorthand or weight key name; did you mean 'toy_int4'?")
    assert "shorthands: " in msg and "toy_moe_only" in msg


def test_overrides_on_a_shorthand_base_merge_replace_and_keep_order():
    base = QuantizationConfig.from_any("toy")
    merged = QuantizationConfig.from_any("toy", ["linear.activation=toy_act"])
    assert merged.linear.weight == TOY and merged.linear.activation == TOY_ACT and merged.moe == base.moe
    replaced = QuantizationConfig.from_any("toy", ["moe=toy_moe_only"])
    assert replaced.linear == base.linear and replaced.moe.activation_given
    kept = QuantizationConfig.from_any("toy_moe_only", ["linear=toy_int4", "linear.activation=null"])
    assert kept.linear.weight == TOY and kept.linear.activation_given and kept.linear.activation is None
    last_wins = QuantizationConfig.from_any("toy", ["linear.activation=toy_act", "linear.activation=null"])
    assert last_wins.linear.activation is None and last_wins.linear.activation_given
    on_config = QuantizationConfig.from_any(base, ["ignore=[lm_head, 're:.*router']"])
    assert on_config.ignore == ["lm_head", "re:.*router"] and on_config.linear == base.linear


def test_override_values_are_yaml_with_omegaconf_booleans():
    from oqcore.config_io import parse_override

    assert parse_override("a.b=null") == (["a", "b"], None)
    assert parse_override("x=off") == (["x"], "off")  # not False: only true/false are booleans
    assert parse_override("x=yes") == (["x"], "yes")
    assert parse_override("x=true") == (["x"], True)
    assert parse_override("m={weight: toy_int4, activation: null}") == (["m"], {"weight": "toy_int4", "activation": None})
    assert parse_override("ignore=[lm_head, re:.*gate]") == (["ignore"], ["lm_head", "re:.*gate"])


def test_interpolation_is_off_unless_asked(monkeypatch):
    monkeypatch.setenv("OQ_TEST_SCHEME", "toy_int4")
    literal = QuantizationConfig.from_any("toy", ["ignore=['${oc.env:OQ_TEST_SCHEME}']"])
    assert literal.ignore == ["${oc.env:OQ_TEST_SCHEME}"]
    with pytest.raises(UnknownKeyError, match=r"pass interpolate=True"):
        QuantizationConfig.from_any(None, ["linear=${oc.env:OQ_TEST_SCHEME}"])
    on = QuantizationConfig.from_any(None, ["linear=${oc.env:OQ_TEST_SCHEME}"], interpolate=True)
    assert on.linear.weight == TOY
    ref = QuantizationConfig.from_dotlist(["moe=toy_int4", "linear.weight=${moe.weight}"], interpolate=True)
    assert ref.linear.weight == TOY


def test_interpolation_in_a_file_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("OQ_TEST_SCHEME", "toy_int4")
    f = tmp_path / "q.yaml"
    f.write_text("linear: ${oc.env:OQ_TEST_SCHEME}\n")
    assert QuantizationConfig.from_yaml(f, interpolate=True).linear.weight == TOY
    with pytest.raises(UnknownKeyError) as e:
        QuantizationConfig.from_yaml(f)
    assert e.value.field == "linear.weight" and "q.yaml" in str(e.value) and "interpolate=True" in str(e.value)


# ---- errors ---------------------------------------------------------------------------------


def test_config_error_lists_every_error_with_its_path():
    with pytest.raises(ConfigError) as e:
        QuantizationConfig.model_validate({"linear": {"weigth": "toy_int4"}, "ignore": 5, "backend": {"linear": 3}})
    assert {f for f, _ in e.value.errors} == {"linear.weight", "linear.weigth", "ignore", "backend.linear"}
    assert e.value.field == e.value.errors[0][0]
    assert str(e.value).splitlines()[0] == "4 errors in the config:"
    single = ConfigError("bad", "moe.weight")
    assert single.errors == [("moe.weight", "bad")] and str(single) == "moe.weight: bad"
    moved = ConfigError("x", None, errors=[("a", "x"), ("[1]", "y")]).at("targets")
    assert moved.errors == [("targets.a", "x"), ("targets[1]", "y")] and moved.field == "targets"


def test_unknown_field_did_you_mean_lists_valid_fields():
    with pytest.raises(ConfigError) as e:
        QuantSpec.model_validate({"weigth": "toy_int4", "weight": "toy_int4"})
    assert str(e.value) == "weigth: unknown field 'weigth'; did you mean 'weight'?; valid fields: weight, activation, options"


def test_backend_pin_checked_at_validation_against_the_configured_weight_keys():
    with pytest.raises(ConfigError) as e:
        QuantizationConfig(linear="toy_int4", backend={"linear": "toy-fsat"})
    assert e.value.field == "backend.linear"
    assert "did you mean 'toy-fast'?" in str(e.value) and "valid backends: torch, toy-fast" in str(e.value)
    # a target that can serve the kind counts as well
    assert QuantizationConfig(targets={"re:.*proj": "toy_int4"}, backend={"moe": "toy-fast"}).backend == {"moe": "toy-fast"}
    with pytest.raises(ConfigError, match="^backend.linear: the config quantizes no linear layers"):
        QuantizationConfig(scheme="toy_moe_only", backend={"linear": "torch"})


def test_omitted_and_null_activation_are_different_specs():
    """An omitted activation means the method's default, an explicit null weight-only: not equal."""
    default = QuantizationConfig.from_any("fp8_per_block")
    weight_only = QuantizationConfig.from_any("fp8_per_block", ["linear.activation=null"])
    assert default != weight_only
    assert default == QuantizationConfig.from_any("fp8_per_block")
    assert len({default.linear, weight_only.linear, QuantizationConfig.from_any("fp8_per_block").linear}) == 2


def test_each_spec_is_bound_once_from_validation_to_plan(monkeypatch):
    """resolve(): validation binds every slot once; plan reuses that resolution (no per-layer binding)."""
    import oqcore.config as C
    from torch import nn

    calls = []
    real = C.bind_spec
    monkeypatch.setattr(C, "bind_spec", lambda v, kind, reg=None: (calls.append(kind), real(v, kind, reg))[1])
    c = QuantizationConfig(linear="fp8_per_tensor", moe="mxfp8")
    assert sorted(calls) == ["linear", "moe"]
    oqcore.plan(nn.Sequential(*[nn.Linear(64, 64) for _ in range(5)]), c)
    assert sorted(calls) == ["linear", "moe"]
    r = oqcore.resolve(c)
    assert r is oqcore.resolve(c) and r.kind("linear").spec is c.linear and r.kind("moe").spec is c.moe
    assert r.weight_keys("linear") == [c.linear.weight]


def test_resolution_against_an_explicit_registry():
    """A registry given as validation context is the one names resolve against, not the process one."""
    from toy_scheme import ToyScheme

    from oqcore.plugins import OqPluginManager

    pm = OqPluginManager()
    pm.register(ToyScheme(), "toy")
    reg = pm.registry
    if "toy" in oqcore.get_plugin_manager().records:  # this module's fixture registers it globally
        oqcore.get_plugin_manager().unregister("toy")
    with pytest.raises(oqcore.UnknownKeyError, match="toy_int4"):
        QuantizationConfig(linear="toy_int4")  # the process registry has no toy plugin
    c = QuantizationConfig.model_validate({"linear": "toy_int4"}, context={"registry": reg})
    r = oqcore.resolve(c, reg)
    assert r.registry is reg and r.kind("linear").method_cls.__name__ == "ToyLinear"
    with pytest.raises(oqcore.ConfigError, match="expected a QuantizationConfig"):
        oqcore.resolve({"linear": "toy_int4"})
