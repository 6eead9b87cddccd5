"""Hypothesis fuzz of the config borders: dicts, dotlist overrides and YAML text built from valid
and invalid names, types and nesting. Every input gives a valid config or a ConfigError, never
another exception; a valid config round-trips through to_dict().

About 2,800 generated configs (1,100 dicts, 700 override lists, 500 YAML/JSON texts read two ways) in all (derandomized, so CI sees the same ones every run)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oqcore import ConfigError, QuantizationConfig, QuantSpec

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)

NAMES = [
    # shorthands, weight keys, activation keys, vLLM's "online", null words
    "fp8_per_tensor", "fp8_per_channel", "fp8_per_block", "mxfp8", "int8_per_channel_weight_only",
    "fp8_per_tensor_static", "fp8_per_channel_static", "fp8_per_block_static", "int8_per_channel_static",
    "fp8_per_token", "fp8_per_block_dynamic", "fp8_per_tensor_dynamic", "int8_per_token",
    "online", "none", "null", "None",
    # near misses and junk
    "fp8_per_blok", "mxfp4", "nvfp4", "", " ", "re:(", "${oc.env:HOME}", "${linear.weight}", "torch", "triton", "cpu",
]
FIELDS = ["scheme", "quantization", "linear", "moe", "ignore", "targets", "backend", "weigth", "linaer", "options", "weight"]
SPEC_FIELDS = ["weight", "activation", "options", "weigth", "activaton", "scale_mode"]
PATTERNS = ["lm_head", "re:.*mlp", "re:.*q_proj$", "model.layers.*.mlp.experts", "re:(", "", "re:[a-", "*", "re:.*"]

names = st.sampled_from(NAMES)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True), names,
    st.text(max_size=12), st.binary(max_size=6),
)


def junk(depth: int = 3):
    """Arbitrary nested data: lists and dicts (string, int and None keys) of scalars."""
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.dictionaries(st.one_of(st.sampled_from(FIELDS + SPEC_FIELDS), st.text(max_size=5), st.integers(0, 3)), inner, max_size=3),
        ),
        max_leaves=5,
    )


spec = st.one_of(
    names,
    junk(),
    st.fixed_dictionaries(
        {},
        optional={
            "weight": st.one_of(names, junk()),
            "activation": st.one_of(names, st.none(), junk()),
            "options": st.one_of(st.dictionaries(st.sampled_from(["scale_mode", "x", "qmax"]), st.one_of(names, scalars), max_size=2), junk()),
            "weigth": names,
        },
    ),
    st.builds(lambda: QuantSpec(weight="mxfp8")),
)

SHORTHANDS = ["fp8_per_tensor", "fp8_per_channel", "fp8_per_block", "mxfp8", "int8_per_channel_weight_only"]
WEIGHTS = ["fp8_per_tensor_static", "fp8_per_channel_static", "fp8_per_block_static", "int8_per_channel_static", "mxfp8"]
ACTS = [None, "fp8_per_token", "fp8_per_block_dynamic", "fp8_per_tensor_dynamic", "int8_per_token", "mxfp8"]
GOOD_PATTERNS = ["lm_head", "re:.*mlp", "re:.*q_proj$", "model.layers.*.mlp.experts", "re:.*"]
good_spec = st.one_of(
    st.sampled_from(SHORTHANDS + WEIGHTS),
    st.fixed_dictionaries({"weight": st.sampled_from(WEIGHTS)}, optional={"activation": st.sampled_from(ACTS)}),
)
# Mostly-valid configs: the right shapes and names, so many validate and the checks past the
# types (methods, activations, pins, exclusivity) are reached too.
good_config = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "quantization": st.sampled_from(SHORTHANDS + ["online"]),
            "linear": good_spec,
            "moe": good_spec,
            "ignore": st.lists(st.sampled_from(GOOD_PATTERNS), max_size=3),
            "backend": st.dictionaries(st.sampled_from(["linear", "moe"]), st.sampled_from(["torch", "cpu", "triton", "cutlass"]), max_size=2),
        },
    ),
    st.fixed_dictionaries(
        {"targets": st.dictionaries(st.sampled_from(GOOD_PATTERNS), good_spec, min_size=1, max_size=3)},
        optional={"ignore": st.lists(st.sampled_from(GOOD_PATTERNS), max_size=2), "quantization": st.just("online")},
    ),
)
wild_config = st.fixed_dictionaries(
    {},
    optional={
        "scheme": st.one_of(names, junk()),
        "quantization": st.one_of(names, junk()),
        "linear": spec,
        "moe": spec,
        "ignore": st.one_of(st.lists(st.one_of(st.sampled_from(PATTERNS), scalars), max_size=4), junk()),
        "targets": st.one_of(st.dictionaries(st.one_of(st.sampled_from(PATTERNS), st.integers(0, 2)), spec, max_size=3), junk()),
        "backend": st.one_of(st.dictionaries(st.sampled_from(["linear", "moe", "attention", 3]), st.one_of(names, scalars), max_size=2), junk()),
        "linaer": names,
        "weigth": names,
    },
)
config = st.one_of(
    good_config,
    wild_config,
    # one field of a good config replaced by anything
    st.builds(lambda c, k, v: {**c, k: v}, good_config, st.sampled_from(FIELDS), st.one_of(spec, junk())),
)

KEYS = ["linear", "moe", "scheme", "quantization", "ignore", "targets", "backend", "linear.weight", "linear.activation",
        "moe.activation", "moe.options.scale_mode", "linear.weigth", "linaer", "", "a..b", "linear.activation.x",
        "ignore.0", "targets.lm_head", "backend.linear", "moe activation", "x[0]"]
VALUES = ["mxfp8", "fp8_per_block", "null", "[lm_head, re:.*router]", "{weight: mxfp8, activation: null}", "[unclosed",
          "{a: 1", "3", "true", "off", "floor", "${oc.env:HOME}", "", "'quoted'", "fp8_per_block_static", "torch", "tritonn",
          "- a", "{1: 2}", "re:(", "]", "!!python/object:os.system", "&a [*a]"]
override = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.sampled_from(VALUES)),
    st.sampled_from(["moe.activation", "=x", "linear", "==", "a=b=c", "linear.activation=null"]),
    st.text(max_size=20),
)
base = st.one_of(st.none(), names, config, st.sampled_from(["missing.yaml", "dir/x.yml", "fp8_per_blok"]))


def check(build):
    """Run ``build``: a valid config must round-trip, anything else must be a ConfigError."""
    try:
        cfg = build()
    except ConfigError as e:
        assert str(e) and e.errors, "a ConfigError must say something"
        return None
    assert isinstance(cfg, QuantizationConfig)
    assert cfg.linear is not None or cfg.moe is not None or cfg.targets
    again = QuantizationConfig.model_validate(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    return cfg


@settings(max_examples=1100, **SETTINGS)
@given(config)
def test_fuzz_dict_configs(data):
    check(lambda: QuantizationConfig.model_validate(data))


@settings(max_examples=700, **SETTINGS)
@given(base, st.lists(override, max_size=4), st.booleans())
def test_fuzz_dotlist_overrides(b, overrides, interpolate):
    check(lambda: QuantizationConfig.from_any(b, overrides, interpolate=interpolate))


yaml_text = st.one_of(
    st.text(max_size=80),
    config.map(lambda c: _dump(c)),
    st.builds(lambda a, b: a + b, st.sampled_from(["linear: ", "moe:\n  weight: ", "ignore: [", "targets:\n  ", "{", "- "]), st.text(max_size=20)),
)


def _dump(c):
    try:
        return yaml.safe_dump(c)
    except yaml.YAMLError:  # a QuantSpec object has no YAML form: write its name instead
        return "linear: mxfp8\n"


@settings(max_examples=500, **SETTINGS)
@given(yaml_text, st.sampled_from([".yaml", ".json", ".yml", ""]), st.lists(override, max_size=2))
def test_fuzz_yaml_text(text, suffix, overrides):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"q{suffix}"
        p.write_text(text, encoding="utf-8")
        check(lambda: QuantizationConfig.from_yaml(p, overrides))
        check(lambda: QuantizationConfig.from_any(str(p), overrides))
