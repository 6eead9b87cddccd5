"""Bad-input battery: configs. Every case raises exactly one typed error (ConfigError or its
subclass UnknownKeyError) whose ``field`` is the path at fault and whose message names the culprit
and what would be valid. Plan-time cases also check the model is left bit-identical."""

from __future__ import annotations

import pytest
from torch import nn

import oqcore
from oqcore import ConfigError, NoBackendError, QuantizationConfig, QuantSpec, UnknownKeyError
from tests.battery.util import assert_unchanged, raises_naming, snapshot

# (id, config dict, error type, field, culprits named in the message)
DICT_CASES = [
    ("empty", {}, ConfigError, None, ["quantizes nothing", "scheme", "linear", "moe", "targets"]),
    ("ignore-only", {"ignore": ["lm_head"]}, ConfigError, None, ["quantizes nothing"]),
    ("online-alone", {"quantization": "online"}, ConfigError, None, ["quantizes nothing"]),
    ("ignore-int", {"linear": "mxfp8", "ignore": 5}, ConfigError, "ignore", ["list of layer patterns", "int 5"]),
    ("ignore-str", {"linear": "mxfp8", "ignore": "lm_head"}, ConfigError, "ignore", ["list of layer patterns", "'lm_head'"]),
    ("ignore-item-int", {"linear": "mxfp8", "ignore": ["lm_head", 1]}, ConfigError, "ignore[1]", ["non-empty string", "int 1"]),
    ("ignore-item-bytes", {"linear": "mxfp8", "ignore": [b"lm_head"]}, ConfigError, "ignore[0]", ["non-empty string", "bytes"]),
    ("ignore-bad-regex", {"linear": "mxfp8", "ignore": ["re:("]}, ConfigError, "ignore[0]", ["invalid regular expression", "'('"]),
    ("ignore-empty-pattern", {"linear": "mxfp8", "ignore": [""]}, ConfigError, "ignore[0]", ["non-empty string"]),
    ("targets-list", {"targets": ["re:.*q_proj"]}, ConfigError, "targets", ["mapping of layer patterns", "list"]),
    ("targets-int-key", {"targets": {1: "mxfp8"}}, ConfigError, "targets[1]", ["non-empty string", "int 1"]),
    ("targets-bad-regex", {"targets": {"re:[a-": "mxfp8"}}, ConfigError, "targets['re:[a-']", ["invalid regular expression"]),
    ("targets-unknown-key", {"targets": {"re:.*q_proj": "mxfp9"}}, UnknownKeyError, "targets['re:.*q_proj'].weight", ["'mxfp9'", "mxfp8"]),
    ("targets-null-spec", {"targets": {"re:.*q_proj": None}}, ConfigError, "targets['re:.*q_proj']", ["needs a weight key", "ignore"]),
    ("targets-and-linear", {"linear": "mxfp8", "targets": {"re:.*q_proj": "mxfp8"}}, ConfigError, "targets", ["mutually exclusive"]),
    ("linear-int", {"linear": 5}, ConfigError, "linear", ["key name, a shorthand or a mapping", "int 5"]),
    ("linear-list", {"linear": ["mxfp8"]}, ConfigError, "linear", ["key name, a shorthand or a mapping", "list"]),
    ("linear-bytes", {"linear": b"mxfp8"}, ConfigError, "linear", ["bytes"]),
    ("linear-int-field-name", {"linear": {1: "mxfp8"}}, ConfigError, "linear", ["field names must be strings", "weight"]),
    ("linear-nested-garbage", {"linear": {"weight": {"weight": {"weight": "mxfp8"}}}}, ConfigError, "linear.weight", ["weight key name", "dict"]),
    ("weight-is-quantspec", {"linear": {"weight": QuantSpec(weight="mxfp8")}}, ConfigError, "linear.weight", ["weight key name", "got QuantSpec"]),
    ("weight-typo-field", {"linear": {"weigth": "mxfp8"}}, ConfigError, "linear.weight", ["'weigth'", "did you mean 'weight'?", "activation, options"]),
    ("activation-typo-field", {"moe": {"weight": "mxfp8", "activaton": "mxfp8"}}, ConfigError, "moe.activaton", ["did you mean 'activation'?"]),
    ("top-level-typo", {"linaer": "mxfp8"}, ConfigError, "linaer", ["did you mean 'linear'?", "scheme", "targets", "backend"]),
    ("top-level-int-key", {1: "mxfp8"}, ConfigError, None, ["field names must be strings", "linear"]),
    ("options-int", {"linear": {"weight": "mxfp8", "options": 3}}, ConfigError, "linear.options", ["mapping of option names", "int 3"]),
    ("options-typo", {"linear": {"weight": "mxfp8", "options": {"scale_mod": "floor"}}}, ConfigError, "linear.options.scale_mod", ["did you mean 'scale_mode'?"]),
    ("options-bad-value", {"moe": {"weight": "mxfp8", "options": {"scale_mode": "ceil"}}}, ConfigError, "moe.options.scale_mode", ["'rceil' or 'floor'", "'ceil'"]),
    ("options-none-taken", {"linear": {"weight": "fp8_per_block_static", "options": {"x": 1}}}, ConfigError, "linear.options.x", ["no fields to set"]),
    ("backend-value-int", {"linear": "mxfp8", "backend": {"linear": 3}}, ConfigError, "backend.linear", ["valid string", "int 3"]),
    ("backend-not-mapping", {"linear": "mxfp8", "backend": "torch"}, ConfigError, "backend", ["mapping of layer kinds", "'torch'"]),
    ("backend-unknown-kind", {"linear": "mxfp8", "backend": {"attention": "torch"}}, ConfigError, "backend.attention", ["unknown layer kind", "linear, moe"]),
    ("backend-typo", {"linear": "mxfp8", "backend": {"linear": "tritonn"}}, ConfigError, "backend.linear", ["'tritonn'", "did you mean 'triton'?", "torch", "mxfp8"]),
    ("backend-unquantized-kind", {"linear": "mxfp8", "backend": {"moe": "torch"}}, ConfigError, "backend.moe", ["no moe layers"]),
    ("scheme-typo", {"quantization": "fp8_per_blok"}, UnknownKeyError, "quantization", ["'fp8_per_blok'", "did you mean 'fp8_per_block'?", "online"]),
    ("scheme-list", {"quantization": ["mxfp8"]}, ConfigError, "quantization", ["shorthand name", "list"]),
    ("scheme-dict", {"scheme": {"linear": "mxfp8"}}, ConfigError, "scheme", ["shorthand name", "dict"]),
    ("scheme-and-alias", {"scheme": "mxfp8", "quantization": "mxfp8"}, ConfigError, "quantization", ["either scheme or its alias"]),
    ("activation-key-as-weight", {"linear": {"weight": "fp8_per_token"}}, ConfigError, "linear.weight", ["'fp8_per_token'", "not valid as a weight key"]),
    ("static-key-as-activation", {"linear": {"weight": "mxfp8", "activation": "fp8_per_block_static"}}, ConfigError, "linear.activation", ["does not support activation fp8_per_block_static", "supported: none, mxfp8"]),
    ("unsupported-activation", {"linear": {"weight": "fp8_per_block_static", "activation": "mxfp8"}}, ConfigError, "linear.activation", ["does not support activation mxfp8", "supported"]),
    ("shorthand-without-slot", {"linear": "int8_per_channel_weight_only"}, ConfigError, "linear.weight", ["defines no linear spec", "moe"]),
    ("null-weight-with-activation", {"moe": "mxfp8", "linear": {"weight": None, "activation": "mxfp8"}}, ConfigError, "linear.activation", ["weight: null", "remove it"]),
    ("all-kinds-nulled", {"quantization": "mxfp8", "linear": {"weight": None}, "moe": {"weight": None}}, ConfigError, None, ["quantizes nothing"]),
    ("unknown-weight-name", {"moe": "fp8_per_blok_static"}, UnknownKeyError, "moe.weight", ["did you mean 'fp8_per_block_static'?"]),
    ("not-a-mapping", [("linear", "mxfp8")], ConfigError, None, ["valid dictionary", "list"]),
]


@pytest.mark.parametrize("data, exc, field, culprits", [c[1:] for c in DICT_CASES], ids=[c[0] for c in DICT_CASES])
def test_bad_dict_config(data, exc, field, culprits):
    with raises_naming(exc, *culprits) as e:
        QuantizationConfig.model_validate(data)
    assert type(e.value) is exc
    assert e.value.field == field
    assert e.value.errors[0] == (field, e.value.reason)


def test_every_error_is_listed_one_per_line_with_its_path():
    with raises_naming(ConfigError, "ignore", "linear", "linaer") as e:
        QuantizationConfig.model_validate({"linear": 5, "ignore": [1, "re:("], "linaer": "mxfp8"})
    fields = [f for f, _ in e.value.errors]
    assert sorted(fields) == ["ignore[0]", "ignore[1]", "linaer", "linear"]
    assert e.value.field == fields[0]
    lines = str(e.value).splitlines()
    assert lines[0] == "4 errors in the config:"
    assert sorted(line.split(":")[0].strip() for line in lines[1:]) == sorted(fields)
    assert "more error" not in str(e.value)


QUANTSPEC_CASES = [
    ("weight-none", {"weight": None}, "weight", ["weight key is required"]),
    ("weight-int", {"weight": 5}, "weight", ["weight key name", "int 5"]),
    ("activation-list", {"weight": "mxfp8", "activation": ["mxfp8"]}, "activation", ["activation key name", "list"]),
    ("options-list", {"weight": "mxfp8", "options": [1]}, "options", ["mapping of option names"]),
    ("extra-field", {"weight": "mxfp8", "bogus": 1}, "bogus", ["unknown field 'bogus'", "weight, activation, options"]),
    ("option-int-key", {"weight": "mxfp8", "options": {1: 2}}, "options", ["option names must be strings"]),
]


@pytest.mark.parametrize("data, field, culprits", [c[1:] for c in QUANTSPEC_CASES], ids=[c[0] for c in QUANTSPEC_CASES])
def test_bad_quantspec(data, field, culprits):
    with raises_naming(ConfigError, *culprits) as e:
        QuantSpec.model_validate(data)
    assert e.value.field == field


# (id, from_any object, overrides, interpolate, culprits)
SOURCE_CASES = [
    ("name-typo", "fp8_per_blok", [], False, ["'fp8_per_blok'", "neither a file nor a shorthand", "did you mean 'fp8_per_block'?"]),
    ("missing-file", "missing.yaml", [], False, ["'missing.yaml'", "neither a file (no such file) nor a shorthand"]),
    ("missing-path", "conf/q.yml", [], False, ["'conf/q.yml'", "neither a file (no such file) nor a shorthand"]),
    ("activation-key-name", "fp8_per_token", [], False, ["'fp8_per_token'", "activation key", "weight keys"]),
    ("int-config", 5, [], False, ["expected a config", "int"]),
    ("none-alone", None, [], False, ["quantizes nothing"]),
    ("online-alone", "online", [], False, ["quantizes nothing"]),
    ("no-equals", None, ["moe.activation"], False, ["'moe.activation'", "key=value"]),
    ("empty-key", "mxfp8", ["=x"], False, ["'=x'", "no key"]),
    ("empty-key-part", "mxfp8", ["a..b=1"], False, ["'a..b=1'", "empty part"]),
    ("space-in-key", "mxfp8", ["moe activation=mxfp8"], False, ["'moe activation=mxfp8'", "spaces"]),
    ("unbalanced-list", None, ["linear=[mxfp8"], False, ["'linear=[mxfp8'", "not valid YAML"]),
    ("unbalanced-map", None, ["linear={weight: mxfp8"], False, ["'linear={weight: mxfp8'", "not valid YAML"]),
    ("no-value", "mxfp8", ["linear.activation="], False, ["'linear.activation='", "no value", "null"]),
    ("into-a-list", "mxfp8", ["ignore=[lm_head]", "ignore.x=1"], False, ["'ignore.x=1'", "list", "not a mapping"]),
    ("override-not-str", "mxfp8", [5], False, ["override 5", "string"]),
    ("overrides-not-list", "mxfp8", 5, False, ["overrides must be a list", "int"]),
    ("override-typo-field", "mxfp8", ["linaer=mxfp8"], False, ["'linaer'", "did you mean 'linear'?"]),
    ("override-typo-backend", "mxfp8", ["backend.moe=tritonn"], False, ["'tritonn'", "did you mean 'triton'?"]),
    ("interpolation-off", None, ["linear=${oc.env:HOME}"], False, ["'${oc.env:HOME}'", "interpolation", "interpolate=True"]),
    ("interpolation-unset-env", None, ["linear=${oc.env:OQ_SURELY_UNSET_VARIABLE}"], True, ["interpolation", "OQ_SURELY_UNSET_VARIABLE"]),
    ("interpolation-bad-ref", None, ["linear=${nowhere.weight}"], True, ["interpolation", "nowhere"]),
]


@pytest.mark.parametrize("obj, overrides, interpolate, culprits", [c[1:] for c in SOURCE_CASES], ids=[c[0] for c in SOURCE_CASES])
def test_bad_config_source_or_override(obj, overrides, interpolate, culprits):
    with raises_naming(ConfigError, *culprits):
        QuantizationConfig.from_any(obj, overrides, interpolate=interpolate)


# (id, file name, bytes, culprits)
FILE_CASES = [
    ("yaml-unclosed", "q.yaml", b"linear: [unclosed\n", ["q.yaml", "not valid YAML", "line"]),
    ("yaml-duplicate-key", "q.yaml", b"linear: mxfp8\nlinear: fp8_per_block\n", ["q.yaml", "duplicate key 'linear'"]),
    ("yaml-top-list", "q.yaml", b"- linear\n- moe\n", ["q.yaml", "must hold a mapping", "list"]),
    ("yaml-top-scalar", "q.yml", b"mxfp8\n", ["q.yml", "must hold a mapping", "str"]),
    ("yaml-empty", "q.yaml", b"", ["quantizes nothing", "q.yaml"]),
    ("yaml-not-utf8", "q.yaml", b"linear: \xff\xfe\n", ["q.yaml", "not UTF-8"]),
    ("yaml-bad-field", "q.yaml", b"linear:\n  weigth: mxfp8\n", ["q.yaml", "did you mean 'weight'?"]),
    ("json-invalid", "q.json", b'{"linear": "mxfp8",}', ["q.json", "not valid JSON", "line 1"]),
    ("json-duplicate-key", "q.json", b'{"linear": "mxfp8", "linear": "mxfp8"}', ["q.json", "'linear' given twice"]),
    ("json-wrong-type", "q.json", b'{"linear": "mxfp8", "ignore": 5}', ["q.json", "ignore", "int 5"]),
]


@pytest.mark.parametrize("name, content, culprits", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_bad_config_file(tmp_path, name, content, culprits):
    p = tmp_path / name
    p.write_bytes(content)
    with raises_naming(ConfigError, *culprits):
        QuantizationConfig.from_yaml(p)
    with raises_naming(ConfigError, *culprits):
        QuantizationConfig.from_any(str(p))


def test_config_path_that_is_a_directory(tmp_path):
    with raises_naming(ConfigError, str(tmp_path), "directory"):
        QuantizationConfig.from_yaml(tmp_path)


def test_from_yaml_with_a_non_path():
    with raises_naming(ConfigError, "config file path", "int"):
        QuantizationConfig.from_yaml(5)


class Tiny(nn.Module):
    """An embedding, a norm and two linears: the layers a careless target can land on."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(16, 64)
        self.layers = nn.ModuleList([nn.ModuleDict({"norm": nn.LayerNorm(64), "proj": nn.Linear(64, 64)})])
        self.lm_head = nn.Linear(64, 16, bias=False)


# (id, config, error type, culprits)
PLAN_CASES = [
    ("target-on-embedding", {"targets": {"re:.*embed": "fp8_per_tensor_static"}}, ConfigError, ["targets['re:.*embed']", "'embed_tokens'", "Embedding", "cannot be quantized"]),
    ("target-on-layernorm", {"targets": {"re:layers.0": "fp8_per_tensor_static"}}, ConfigError, ["targets['re:layers.0']", "'layers.0.norm'", "LayerNorm"]),
    ("target-glob-on-norm", {"targets": {"layers.*.norm": "fp8_per_tensor_static"}}, ConfigError, ["targets['layers.*.norm']", "LayerNorm"]),
    ("ignore-and-target", {"targets": {"re:.*proj": "fp8_per_tensor_static"}, "ignore": ["layers.0.proj"]}, ConfigError, ["'layers.0.proj'", "ignore pattern", "'re:.*proj'"]),
    ("two-targets", {"targets": {"re:.*proj": "fp8_per_tensor_static", "layers.*.proj": "mxfp8"}}, ConfigError, ["'layers.0.proj'", "two targets"]),
    ("target-kind-without-slot", {"targets": {"re:.*proj": "int8_per_channel_weight_only"}}, ConfigError, ["targets['re:.*proj'].weight", "'layers.0.proj'", "defines no linear spec"]),
]


@pytest.mark.parametrize("config, exc, culprits", [c[1:] for c in PLAN_CASES], ids=[c[0] for c in PLAN_CASES])
def test_bad_plan(config, exc, culprits):
    model = Tiny()
    snap = snapshot(model)
    with raises_naming(exc, *culprits):
        oqcore.plan(model, config, device="cpu")
    assert_unchanged(model, snap)


def test_plan_on_a_device_that_does_not_exist():
    model = Tiny()
    snap = snapshot(model)
    with raises_naming(ConfigError, "device", "cuda:7") as e:
        oqcore.plan(model, "fp8_per_tensor", device="cuda:7")
    assert e.value.field == "device"
    assert_unchanged(model, snap)


def test_no_backend_error_names_kind_weight_method_and_plugin(monkeypatch):
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    model = Tiny()
    snap = snapshot(model)
    # triton is a candidate for fp8 linears, but disabled: pinning it leaves no backend
    with raises_naming(NoBackendError, "'layers.0.proj'", "linear layer", "weight key fp8_per_tensor_static", "method ", "plugin 'fp8'", "triton", "OQ_DISABLE_TRITON"):
        oqcore.plan(model, {"linear": "fp8_per_tensor_static", "backend": {"linear": "triton"}}, device="cpu")
    assert_unchanged(model, snap)


def test_cyclic_config_is_a_config_error():
    data: dict = {"linear": {}}
    data["linear"]["weight"] = data
    with raises_naming(ConfigError, "nested too deeply"):
        QuantizationConfig.from_any(data, ["ignore=[lm_head]"])
    with raises_naming(ConfigError, "linear.weight"):
        QuantizationConfig.model_validate(data)


def test_objects_that_cannot_be_copied_are_never_copied():
    import threading

    data = {"linear": "mxfp8", "lock": threading.Lock()}
    with raises_naming(ConfigError, "unknown field 'lock'") as e:
        QuantizationConfig.from_any(data, ["ignore=[lm_head]"])
    assert e.value.field == "lock" and list(data) == ["linear", "lock"]


def test_plan_of_something_that_is_not_a_module():
    with raises_naming(ConfigError, "torch.nn.Module", "dict") as e:
        oqcore.plan({"lin": nn.Linear(4, 4)}, "fp8_per_tensor")
    assert e.value.field == "model"
