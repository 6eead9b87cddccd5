"""Battery: damaged folders written by save_quantized are refused by oqcore.load.

Each case copies a good export, damages one thing, and asserts ``oqcore.load`` raises exactly
:class:`oqcore.CheckpointError` naming the file and the tensor (or ``config.json`` and the entry),
and that the folder's files are byte-for-byte unchanged afterwards (loading never writes).

The expected quantized tensors are not listed here: the loader derives them from each layer's
method, so these cases also check that derivation (a scale of the wrong shape is caught because the
method, run on the meta device, says what shape it makes).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import oqcore
from oqcore.errors import CheckpointError, ConfigError
from oqcore.loading.saved import load_quantized
from tests.battery.util import raises_naming

L0 = "model.layers.0"
Q = f"{L0}.self_attn.q_proj"
K = f"{L0}.self_attn.k_proj"  # not square: [80, 160]
EXP = f"{L0}.mlp.experts"


@pytest.fixture(autouse=True)
def _cpu_backends(monkeypatch):
    """Saving and loading do not depend on the backend; the CPU backends keep these tests fast
    (conftest turns Triton's interpreter on, which would otherwise be chosen and is slow)."""
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")


@pytest.fixture(scope="module")
def good(tiny_moe, tmp_path_factory) -> Path:
    """A tiny Mixtral (linears without bias, fused experts), fp8 per-channel, saved."""
    model = oqcore.load(tiny_moe("mixtral"), "fp8_per_channel")
    return oqcore.save_quantized(model, tmp_path_factory.mktemp("saved") / "good", format="oqcore")


@pytest.fixture(scope="module")
def good_mx(tiny_moe, tmp_path_factory) -> Path:
    """A tiny GPT-OSS (linears and experts with biases, transposed expert storage), mxfp8, saved."""
    model = oqcore.load(tiny_moe("gpt_oss"), "mxfp8")
    return oqcore.save_quantized(model, tmp_path_factory.mktemp("saved") / "good_mx", format="oqcore")


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _tensors(folder: Path, fn) -> None:
    """Rewrite ``model.safetensors`` with ``fn(dict)`` applied."""
    f = folder / "model.safetensors"
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f), metadata={"format": "pt", "producer": "oqcore"})


def _config(folder: Path, fn) -> None:
    f = folder / "config.json"
    raw = json.loads(f.read_text())
    fn(raw)
    f.write_text(json.dumps(raw))


def _drop(name):
    return lambda t: t.pop(name)


def _set(name, make):
    def fn(t):
        t[name] = make(t[name])

    return fn


def _add(name, value):
    def fn(t):
        t[name] = value

    return fn


def _rename(old, new):
    def fn(t):
        t[new] = t.pop(old)

    return fn


def _qc(fn):
    return lambda raw: fn(raw["quantization_config"])


def _truncate(nbytes):
    def fn(folder: Path):
        f = folder / "model.safetensors"
        data = f.read_bytes()
        f.write_bytes(data[: len(data) - nbytes] if nbytes > 0 else data[:-nbytes])

    return fn


# (id, which export, damage(folder), culprits the message must name)
CASES = [
    ("missing-scale", "good", lambda d: _tensors(d, _drop(f"{Q}.weight_scale")), ["model.safetensors", f"{Q}.weight_scale"]),
    ("missing-qdata", "good", lambda d: _tensors(d, _drop(f"{Q}.weight")), ["model.safetensors", f"{Q}.weight"]),
    ("scale-wrong-shape", "good", lambda d: _tensors(d, _set(f"{Q}.weight_scale", lambda s: s.reshape(-1))), ["model.safetensors", f"{Q}.weight_scale"]),
    ("scale-per-tensor-in-channel-folder", "good", lambda d: _tensors(d, _set(f"{Q}.weight_scale", lambda s: s.amax().reshape(1))), ["model.safetensors", f"{Q}.weight_scale"]),
    ("scale-wrong-dtype-bf16", "good", lambda d: _tensors(d, _set(f"{Q}.weight_scale", lambda s: s.bfloat16())), ["model.safetensors", f"{Q}.weight_scale", "float32"]),
    ("qdata-wrong-dtype-bf16", "good", lambda d: _tensors(d, _set(f"{Q}.weight", lambda w: w.bfloat16())), ["model.safetensors", f"{Q}.weight", "float8_e4m3fn"]),
    ("qdata-wrong-dtype-int8", "good", lambda d: _tensors(d, _set(f"{Q}.weight", lambda w: w.view(torch.int8))), ["model.safetensors", f"{Q}.weight"]),
    ("qdata-transposed", "good", lambda d: _tensors(d, _set(f"{K}.weight", lambda w: w.t().contiguous())), ["model.safetensors", f"{K}.weight"]),
    ("missing-expert-w13", "good", lambda d: _tensors(d, _set(f"{EXP}.w13_weight", lambda w: w[:-1].contiguous())), ["model.safetensors", f"{EXP}.w13_weight", "experts"]),
    ("missing-expert-w2-scale", "good", lambda d: _tensors(d, _set(f"{EXP}.w2_weight_scale", lambda w: w[:-1].contiguous())), ["model.safetensors", f"{EXP}.w2_weight_scale"]),
    ("missing-w13", "good", lambda d: _tensors(d, _drop(f"{EXP}.w13_weight")), ["model.safetensors", f"{EXP}.w13_weight"]),
    ("missing-w2", "good", lambda d: _tensors(d, _drop(f"{EXP}.w2_weight")), ["model.safetensors", f"{EXP}.w2_weight"]),
    ("missing-w2-scale", "good", lambda d: _tensors(d, _drop(f"{EXP}.w2_weight_scale")), ["model.safetensors", f"{EXP}.w2_weight_scale"]),
    ("hp-experts-instead-of-quantized", "good", lambda d: _tensors(d, _rename(f"{EXP}.w13_weight", f"{EXP}.gate_up_proj")), ["model.safetensors", f"{EXP}.gate_up_proj"]),
    ("extra-unknown-tensor", "good", lambda d: _tensors(d, _add(f"{L0}.mystery", torch.zeros(3))), ["model.safetensors", f"{L0}.mystery"]),
    ("extra-tensor-in-quantized-layer", "good", lambda d: _tensors(d, _add(f"{Q}.weight_zero_point", torch.zeros(1))), ["model.safetensors", f"{Q}.weight_zero_point"]),
    ("missing-plain-weight", "good", lambda d: _tensors(d, _drop("model.embed_tokens.weight")), ["model.safetensors", "model.embed_tokens.weight"]),
    ("plain-weight-wrong-shape", "good", lambda d: _tensors(d, _set("model.norm.weight", lambda w: w[:-1].contiguous())), ["model.safetensors", "model.norm.weight"]),
    ("plain-weight-integer", "good", lambda d: _tensors(d, _set("model.norm.weight", lambda w: w.to(torch.int32))), ["model.safetensors", "model.norm.weight"]),
    ("truncated-data", "good", _truncate(100), ["model.safetensors", "truncated"]),
    ("truncated-header", "good", _truncate(-20), ["model.safetensors"]),
    ("no-safetensors", "good", lambda d: (d / "model.safetensors").unlink(), ["model.safetensors"]),
    ("config-missing-config", "good", lambda d: _config(d, _qc(lambda q: q.pop("config"))), ["config.json", "quantization_config.config"]),
    ("config-config-not-a-mapping", "good", lambda d: _config(d, _qc(lambda q: q.update(config=["fp8"]))), ["config.json", "quantization_config.config"]),
    ("config-bad-format-version", "good", lambda d: _config(d, _qc(lambda q: q.update(format_version=2))), ["config.json", "format_version"]),
    ("config-format-version-string", "good", lambda d: _config(d, _qc(lambda q: q.update(format_version="1"))), ["config.json", "format_version"]),
    ("config-format-version-missing", "good", lambda d: _config(d, _qc(lambda q: q.pop("format_version"))), ["config.json", "format_version"]),
    ("config-invalid-key", "good", lambda d: _config(d, _qc(lambda q: q.update(config={"linear": {"weight": "fp9_per_nothing"}}))), ["config.json", "linear"]),
    ("config-unknown-field", "good", lambda d: _config(d, _qc(lambda q: q.update(config={"linaer": {"weight": "fp8_per_channel_static"}}))), ["config.json", "linaer"]),
    ("config-other-scheme-than-tensors", "good", lambda d: _config(d, _qc(lambda q: q.update(config={"linear": {"weight": "mxfp8"}, "moe": {"weight": "mxfp8"}}))), ["model.safetensors", f"{Q}.weight_scale", "float8_e8m0fnu"]),
    ("config-ignores-a-saved-layer", "good", lambda d: _config(d, _qc(lambda q: q["config"].update(ignore=[Q]))), ["model.safetensors", f"{Q}.weight_scale"]),
    ("mx-scale-wrong-dtype", "good_mx", lambda d: _tensors(d, _set(f"{Q}.weight_scale", lambda s: s.view(torch.uint8))), ["model.safetensors", f"{Q}.weight_scale", "float8_e8m0fnu"]),
    ("mx-missing-expert-bias", "good_mx", lambda d: _tensors(d, _drop(f"{EXP}.down_proj_bias")), ["model.safetensors", f"{EXP}.down_proj_bias"]),
    ("mx-missing-linear-bias", "good_mx", lambda d: _tensors(d, _drop(f"{Q}.bias")), ["model.safetensors", f"{Q}.bias"]),
    ("mx-bias-integer", "good_mx", lambda d: _tensors(d, _set(f"{Q}.bias", lambda b: b.to(torch.int16))), ["model.safetensors", f"{Q}.bias"]),
    ("mx-w13-scale-one-expert-short", "good_mx", lambda d: _tensors(d, _set(f"{EXP}.w13_weight_scale", lambda s: s[1:].contiguous())), ["model.safetensors", f"{EXP}.w13_weight_scale"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_damaged_export_is_refused(case, good, good_mx, tmp_path):
    _id, which, damage, culprits = case
    folder = tmp_path / "q"
    shutil.copytree(good if which == "good" else good_mx, folder)
    damage(folder)
    before = _tree(folder)
    with raises_naming(CheckpointError, *culprits):
        oqcore.load(folder)
    assert _tree(folder) == before, "loading changed the folder"


def test_a_good_export_loads(good, good_mx):
    """The fixtures themselves are fine (so every refusal above is the damage's doing)."""
    for folder in (good, good_mx):
        model = oqcore.load(folder)
        ids = torch.arange(3, 15)[None]
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=ids).logits.float()).all()


def test_config_not_a_mapping_is_refused_by_load_quantized(good, tmp_path):
    folder = tmp_path / "q"
    shutil.copytree(good, folder)
    _config(folder, lambda raw: raw.update(quantization_config="oqcore"))
    before = _tree(folder)
    with raises_naming(CheckpointError, "config.json", "quantization_config"):
        load_quantized(folder)
    assert _tree(folder) == before


def test_another_config_is_a_config_error_naming_the_folder(good, tmp_path):
    folder = tmp_path / "q"
    shutil.copytree(good, folder)
    before = _tree(folder)
    with raises_naming(ConfigError, str(folder), "already quantized"):
        oqcore.load(folder, "mxfp8")
    assert _tree(folder) == before


def test_a_bad_user_config_stays_the_users_config_error(good):
    """The user's own invalid config is their ConfigError (naming their field), not a checkpoint problem."""
    with pytest.raises(ConfigError) as e:
        oqcore.load(good, {"linear": {"weight": "fp9"}})
    assert not isinstance(e.value, CheckpointError) and "fp9" in str(e.value)


def test_every_problem_is_found_before_reading(good, tmp_path, monkeypatch):
    """A damaged folder is refused before any tensor is read (validation first, then reading)."""
    from oqcore.loading import checkpoint

    folder = tmp_path / "q"
    shutil.copytree(good, folder)
    _tensors(folder, _drop(f"{EXP}.w2_weight"))

    def no_reads(self, entry, out):
        raise AssertionError(f"read {entry.name} before validating")

    monkeypatch.setattr(checkpoint.TensorReader, "read_into", no_reads)
    with raises_naming(CheckpointError, f"{EXP}.w2_weight"):
        oqcore.load(folder)
