"""More bad-input battery for configs (adversarial pass on issue 9): odd Python values in every
field, odd files (encodings, tags, anchors, deep nesting, unopenable names), dotlist overrides
with patterns as keys, and case variations. Each case asserts ConfigError (or its subclass
UnknownKeyError) and that the message names the culprit; a few assert the valid result instead.
"""

from __future__ import annotations

import pytest

from oqcore import ConfigError, QuantizationConfig, QuantSpec, UnknownKeyError
from oqcore.errors import InternalError

from .util import raises_naming

QC = QuantizationConfig
FIELDS = ("linear", "moe", "targets", "ignore", "backend", "scheme", "quantization")
ODD = {
    "true": True, "int": 7, "float": 1.5, "nan": float("nan"), "bytes": b"fp8_per_tensor",
    "tuple": ("fp8_per_tensor",), "frozenset": frozenset({"a"}), "object": object(),
    "nested_list": [1, [2]],
}


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("value", list(ODD.values()), ids=list(ODD))
def test_odd_value_in_every_field(field, value):
    # 'ignore' alone quantizes nothing: the field's own error must still come first or alongside
    with pytest.raises(ConfigError) as info:
        QC(**{field: value})
    assert not isinstance(info.value, InternalError)
    msg = str(info.value)
    assert field in msg or "quantizes nothing" in msg, msg


@pytest.mark.parametrize("value", list(ODD.values()), ids=list(ODD))
def test_odd_from_any(value):
    with raises_naming(ConfigError, type(value).__name__, "expected a config"):
        QC.from_any(value)


@pytest.mark.parametrize("name, suggestion", [
    ("FP8_PER_BLOCK", "fp8_per_block"), ("MXFP8", "mxfp8"), ("Fp8_Per_Tensor", "fp8_per_tensor"),
])
def test_case_variation_suggests_the_name(name, suggestion):
    with raises_naming(ConfigError, repr(name), f"did you mean {suggestion!r}"):
        QC.from_any(name)
    with raises_naming(UnknownKeyError, "linear.weight", f"did you mean {suggestion!r}"):
        QC(linear=name)


def test_long_unknown_name_is_cut_in_the_message():
    with raises_naming(ConfigError, "neither a file", "shorthands:") as info:
        QC.from_any("x" * 5000)
    assert len(str(info.value)) < 1000


@pytest.mark.parametrize("path", ["a" * 5000, "a\0b"], ids=["too_long", "nul"])
def test_unopenable_config_path(path):
    with raises_naming(ConfigError, "config file"):
        QC.from_yaml(path)


@pytest.mark.parametrize("text, culprit", [
    ("linear: fp8_per_tensor\nlinear: mxfp8\n", "duplicate key 'linear'"),
    ("linear: !!python/object:os.system {}\n", "python/object"),
    ("linear: !foo bar\n", "'!foo'"),
    ("linear: !!binary aGVsbG8=\n", "bytes"),
    ("linear: 2020-01-01\n", "date"),
    ("linear:\n\tweight: mxfp8\n", "'\\t'"),
    ("- a\n", "mapping at the top"),
    ("1: mxfp8\n", "field names must be strings"),
    ("? [a]\n: mxfp8\n", "unhashable key"),
    ("a: &x mxfp8\nlinear: *x\n", "unknown field 'a'"),
    ("linear: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("", "quantizes nothing"),
    ("# only a comment\n", "quantizes nothing"),
])
def test_odd_yaml_file(tmp_path, text, culprit):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with raises_naming(ConfigError, culprit, str(p)):
        QC.from_yaml(p)


@pytest.mark.parametrize("raw, culprit", [
    (b"linear: \xff\xfe\n", "not UTF-8"),
    ("linear: mxfp8".encode("utf-16"), "not UTF-8"),
])
def test_non_utf8_file(tmp_path, raw, culprit):
    p = tmp_path / "c.yaml"
    p.write_bytes(raw)
    with raises_naming(ConfigError, culprit, str(p)):
        QC.from_yaml(p)


def test_bom_and_merge_keys_are_fine(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"\xef\xbb\xbflinear: &b {weight: mxfp8}\nmoe:\n  <<: *b\n")
    cfg = QC.from_yaml(p)
    assert str(cfg.linear) == "mxfp8" and str(cfg.moe) == "mxfp8"


@pytest.mark.parametrize("text, culprit", [
    ('{"linear": "mxfp8" // comment\n}', "not valid JSON"),
    ('{"linear": "mxfp8", "linear": "mxfp8"}', "'linear' given twice"),
    ('{"linear": NaN}', "float nan"),
    ('{"linear": ' + "[" * 50000 + "]" * 50000 + "}", "nested too deeply"),
])
def test_odd_json_file(tmp_path, text, culprit):
    p = tmp_path / "c.json"
    p.write_text(text)
    with raises_naming(ConfigError, culprit, str(p)):
        QC.from_yaml(p)


@pytest.mark.parametrize("override, culprit", [
    ("a.b[0]=1", "brackets"),
    ("linear..weight=x", "empty part"),
    ("=x", "no key"),
    ("linear", "key=value"),
    ("linear= ", "no value"),
    ("linear={a: [", "not valid YAML"),
    ("linear=!!python/object:os.system {}", "python/object"),
    ("linear=mxfp8\x00", "#x0000"),
    ("ignore.0=x", "ignore"),
    ("linear.weight.x=1", "linear.weight"),
    ("targets.re:(=mxfp8", "re:("),
    ("scheme=fp8", "did you mean 'mxfp8'"),
])
def test_bad_override(override, culprit):
    with raises_naming(ConfigError, culprit):
        QC.from_dotlist([override])


@pytest.mark.parametrize("overrides, pattern, expected", [
    (["targets.re:.*down_proj.*=mxfp8"], "re:.*down_proj.*", {"weight": "mxfp8"}),
    (["targets.model.layers.[0-3].mlp.down_proj=fp8_per_tensor",
      "targets.model.layers.[0-3].mlp.down_proj.activation=null"],
     "model.layers.[0-3].mlp.down_proj", {"weight": "fp8_per_tensor", "activation": None}),
    (["targets.re:.*x$.weight=mxfp8"], "re:.*x$", {"weight": "mxfp8"}),
])
def test_targets_override_keeps_dotted_pattern_whole(overrides, pattern, expected):
    # a targets key is a layer pattern: its dots and brackets belong to the pattern, not the path
    assert QC.from_dotlist(overrides).to_dict()["targets"] == {pattern: expected}


@pytest.mark.parametrize("kwargs, culprit", [
    ({"targets": {"re:(": "mxfp8"}}, "targets['re:(']"),
    ({"linear": "mxfp8", "ignore": ["re:["]}, "ignore[0]"),
    ({"linear": "mxfp8", "ignore": [1]}, "ignore[0]"),
    ({"linear": {"weight": "fp8_per_tensor", "activation": "mxfp8"}}, "linear.activation"),
    ({"linear": {"weight": "fp8_per_block", "options": {"block_size": "x"}}}, "linear.options.block_size"),
    ({"linear": {"weight": "fp8_per_tensor", "options": {1: 1}}}, "linear.options"),
    ({"linear": "fp8_per_tensor", "backend": {"moe": "torch"}}, "backend.moe"),
    ({"linear": "fp8_per_tensor", "backend": {"linear": "nope"}}, "backend.linear"),
    ({"linear": "fp8_per_tensor", "backend": {"fp8_per_tensor": "torch"}}, "backend.fp8_per_tensor"),
    ({"scheme": "mxfp8", "quantization": "online", "linear": "mxfp8"}, "quantization"),
])
def test_bad_field_values(kwargs, culprit):
    with raises_naming(ConfigError, culprit):
        QC(**kwargs)


@pytest.mark.parametrize("kwargs, culprit", [
    ({"weight": None}, "weight"), ({"weight": True}, "weight"), ({"weight": "nope"}, "'nope'"),
    ({"weight": "mxfp8", "activation": 3}, "activation"), ({"weight": "mxfp8", "options": 3}, "options"),
])
def test_bad_quantspec(kwargs, culprit):
    with raises_naming(ConfigError, culprit):
        QuantSpec(**kwargs)


@pytest.mark.parametrize("kwargs, culprit", [
    ({"targets": {"re:": "mxfp8"}}, "targets['re:']"),
    ({"linear": "mxfp8", "ignore": ["re:"]}, "ignore[0]"),
])
def test_empty_regex_is_refused(kwargs, culprit):
    # an empty re: matches every layer (re.match): refuse it and say how to ask for that
    with raises_naming(ConfigError, culprit, "re:.*"):
        QC(**kwargs)


@pytest.mark.parametrize("kwargs, culprit", [
    ({"targets": {"re:" + "a" * 5000 + "(": "mxfp8"}}, "targets['re:aaa"),
    ({"linear": "mxfp8", "ignore": ["re:" + "a" * 5000 + "("]}, "ignore[0]"),
])
def test_long_bad_regex_is_cut_in_the_message(kwargs, culprit):
    with raises_naming(ConfigError, culprit, "invalid regular expression") as info:
        QC(**kwargs)
    assert len(str(info.value)) < 1000


def test_folder_as_config_says_folder(tmp_path, monkeypatch):
    (tmp_path / "somemodel").mkdir()
    monkeypatch.chdir(tmp_path)
    with raises_naming(ConfigError, "'somemodel'", "is a folder", "--model"):
        QC.from_any("somemodel")


def test_folder_named_like_a_shorthand_does_not_shadow_it(tmp_path, monkeypatch):
    (tmp_path / "mxfp8").mkdir()
    monkeypatch.chdir(tmp_path)
    assert str(QC.from_any("mxfp8").linear) == "mxfp8"


@pytest.mark.parametrize("extra, culprit", [({}, "model_type"), ({"quantization_config": {}}, "quantization_config")])
def test_model_config_json_as_config_is_one_error(tmp_path, extra, culprit):
    import json

    p = tmp_path / "config.json"
    p.write_text(json.dumps({"model_type": "mixtral", "architectures": ["X"], "hidden_size": 8, **extra}))
    with raises_naming(ConfigError, str(p), "model's config.json", culprit) as info:
        QC.from_any(p)
    assert len(info.value.errors) == 1


def test_billion_laughs_is_refused_not_expanded(tmp_path):
    # 9 lines of YAML aliases stand for 9**8 = 43 million strings: refuse, do not hang
    lines = ['l0: &l0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 8)]
    p = tmp_path / "laughs.yaml"
    p.write_text("\n".join(lines) + "\nignore: *l7\nlinear: mxfp8\n")
    with raises_naming(ConfigError, "more than 1,000,000 values", str(p)):
        QC.from_yaml(p)


def test_shared_python_lists_count_too():
    inner = ["x"] * 1000
    with raises_naming(ConfigError, "more than 1,000,000 values"):
        QC.from_any({"linear": "mxfp8", "ignore": [inner] * 1001})


def test_billion_laughs_in_an_override_value():
    expr = '&l0 ["x","x","x","x","x","x","x","x","x"]'
    expr = "[" + expr + "," + ",".join(["*l0"] * 8) + "]"
    for i in range(1, 8):
        expr = "[" + f"&l{i} {expr}" + "," + ",".join([f"*l{i}"] * 8) + "]"
    with raises_naming(ConfigError, "override 'ignore=", "more than 1,000,000 values"):
        QC.from_dotlist(["linear=mxfp8", "ignore=" + expr])


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_non_regular_file_is_refused_without_reading(tmp_path, special):
    import os

    if special == "fifo":
        special = str(tmp_path / "fifo")
        os.mkfifo(special)  # reading it would block forever
    elif not os.path.exists(special):
        pytest.skip("no /dev/zero")
    for call in (QC.from_yaml, QC.from_any):
        with raises_naming(ConfigError, special, "not a regular file"):
            call(special)


def test_oversized_config_file_is_refused(tmp_path):
    p = tmp_path / "big.yaml"
    with open(p, "wb") as f:  # sparse: no 64 MiB written
        f.truncate(64 * 1024 * 1024 + 1)
    with raises_naming(ConfigError, str(p), "at most"):
        QC.from_yaml(p)


@pytest.mark.parametrize("options, culprit", [
    ({"scale_mode": 5}, "'rceil' or 'floor'"), ({"scale_mode": "FLOOR"}, "'FLOOR'"),
    ({"scale_mode": None}, "NoneType"), ({"scale_mode": ["floor"]}, "list"),
    ({"scale_calculation_mode": "floor"}, "did you mean 'scale_mode'"),
])
def test_plugin_option_of_wrong_type(options, culprit):
    with raises_naming(ConfigError, "linear.options.", culprit):
        QC(linear={"weight": "mxfp8", "options": options})
