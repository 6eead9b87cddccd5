"""The `oq` command: keys, plugins, validate, explain (on the bundled real model and on a
config.json-only folder), and errors as one clear line with exit status 2."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from oqcore.cli import app
from toy_scheme import register_toy

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "oqcore.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "explain" in out.stdout
    exe = subprocess.run(["oq", "keys", "--json"], capture_output=True, text=True)
    assert exe.returncode == 0 and json.loads(exe.stdout)["keys"]


def test_keys_table_and_json():
    r = run("keys")
    assert r.exit_code == 0
    assert "mxfp8                    float8_e4m3fn[float8_e8m0fnu static 1x32]  float8_e4m3fn[float8_e8m0fnu dynamic 1x32]  mxfp8" in r.stdout
    assert "int8_per_channel_weight_only  -" in r.stdout
    data = json.loads(run("keys", "--json").stdout)
    names = {k["name"]: k for k in data["keys"]}
    assert names["fp8_per_token"]["weight"] is None
    assert names["fp8_per_token"]["activation"] == "float8_e4m3fn[float32 dynamic per-token]"
    shorthands = {s["name"]: s for s in data["shorthands"]}
    assert shorthands["int8_per_channel_weight_only"]["linear"] is None


def test_plugins_json():
    data = json.loads(run("plugins", "--json").stdout)
    by = {r["name"]: r for r in data}
    assert by["mxfp8"]["distribution"] == "oq-plugin-mxfp8" and by["mxfp8"]["status"] == "loaded"


def test_validate_prints_the_resolved_config(tmp_path):
    register_toy()
    f = tmp_path / "c.yaml"
    f.write_text("linear: toy_int4\nmoe: toy_moe_only\n")
    r = run("validate", str(f), "linear.activation=toy_act", "ignore=[lm_head]")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [
        "linear:",
        "  weight: toy_int4",
        "  activation: toy_act",
        "moe:",
        "  weight: toy_int4",
        "  activation: null",
        "ignore:",
        "- lm_head",
        "valid",
    ]


def test_validate_error_is_one_clear_line(tmp_path):
    register_toy()
    f = tmp_path / "c.yaml"
    f.write_text("linear: toy_int4\n")
    r = run("validate", str(f), "linear.activation=toy_ac")
    assert r.exit_code == 2
    assert r.stderr.strip().startswith("error: linear.activation: unknown activation quantization key 'toy_ac'; did you mean 'toy_act'?")


def test_explain_bundled_real_model():
    register_toy()
    r = run("explain", "--config", "toy", "ignore=[re:.*pooler.*]")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "(BertModel)" in out.splitlines()[0]
    rows = {line.split()[0]: line.split() for line in out.splitlines()[3:-1]}
    assert rows["encoder.layer.0.attention.self.query"][1:4] == ["linear", "[384,", "384]"]
    assert rows["encoder.layer.5.intermediate.dense"][1:] == ["linear", "[1536,", "384]", "toy_int4", "none", "toy-fast", "linear"]
    assert rows["pooler.dense"][-3:] == ["ignored", "by", "'re:.*pooler.*'"]
    assert out.splitlines()[-1] == "Quantized 36 layers: linear toy_int4: 36; kept 1 in high precision"


def test_explain_json_on_a_config_only_folder(tmp_path):
    from transformers import AutoConfig

    register_toy()
    AutoConfig.for_model(
        "gpt_oss", hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, vocab_size=128, head_dim=16,
    ).save_pretrained(tmp_path)
    r = run("explain", "--model", str(tmp_path), "--config", "toy", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    experts = [row for row in data["layers"] if row["kind"] == "moe"]
    assert experts[0]["name"] == "model.layers.0.mlp.experts" and experts[0]["shape"].endswith("transposed, bias")


def test_explain_missing_model_folder(tmp_path):
    r = run("explain", "--model", str(tmp_path / "nope"), "--config", "fp8_per_block")
    assert r.exit_code == 2
    assert "config.json does not exist" in r.stderr


@pytest.mark.parametrize("text", ["{not json", '{"model_type": "no_such_model_type"}'])
def test_explain_unbuildable_config(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    r = run("explain", "--model", str(tmp_path), "--config", "fp8_per_block")
    assert r.exit_code == 2
    assert str(tmp_path / "config.json") in r.stderr


def test_quantize_main_job_on_the_bundled_model(tmp_path, monkeypatch):
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    r = run("quantize", "--json", str(tmp_path / "figures.json"), "--out", str(tmp_path / "q"))
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "Quantized 37 layers: linear fp8_per_block_static (act fp8_per_block_dynamic): 37" in out
    assert "fidelity: mean embedding cosine vs bf16 on 32 sentences: 0.99" in out
    assert "peak memory:" in out and "saved:" in out
    data = json.loads((tmp_path / "figures.json").read_text())
    assert abs(data["fidelity"]["cosine"] - 0.9979) <= 0.0003
    assert data["report"]["rows"][0]["count"] == 37
    assert data["report"]["peak_rss"] > 0 and data["report"]["seconds_total"] > 0
    import oqcore

    back = oqcore.load(tmp_path / "q")
    assert oqcore.report(back).summary == data["report"]["summary"]


def test_quantize_tiny_moe_causal_lm_with_overrides(tiny_moe, monkeypatch):
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    r = run("quantize", "--model", str(tiny_moe("olmoe")), "moe=int8_per_channel_weight_only", "linear=fp8_per_block")
    assert r.exit_code == 0, r.output
    rows = [line.split() for line in r.stdout.splitlines()]
    assert ["moe", "int8_per_channel_static", "none", "cpu-int8", "2"] in [row[:5] for row in rows]
    assert ["linear", "fp8_per_block_static", "fp8_per_block_dynamic", "torch", "8"] in [row[:5] for row in rows]
    assert "fidelity: logits SQNR vs bf16: " in r.stdout and "top-1 agreement" in r.stdout


def test_quantize_bad_model_is_one_error_line(tmp_path):
    r = run("quantize", "--model", str(tmp_path), "--no-check")
    assert r.exit_code == 2
    assert r.stderr.strip() == f"error: {tmp_path / 'config.json'} does not exist: a model folder needs config.json (and safetensors weights)"


def test_make_model(tmp_path):
    r = run("make-model", "gpt_oss", str(tmp_path / "g"), "--layers", "1")
    assert r.exit_code == 0 and (tmp_path / "g" / "model.safetensors").is_file()
    assert run("make-model", "llama", str(tmp_path / "x")).exit_code == 2
