"""The `oq` command: keys, plugins, validate, explain (on the bundled real model, a config.json-only
folder and a saved export), quantize (MiniLM, a tiny MoE, a saved export), make-model; overrides on
top of the default scheme; --config as shorthand, key name or file in every command. The bad-input
cases (exit status, one error line each) are in tests/battery/test_cli.py."""

import json
import re
import subprocess
from pathlib import Path
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
    rows: dict[str, list[str]] = {}  # the keys table comes first; shorthands of the same name follow
    for line in r.stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        rows.setdefault(cells[0], cells[1:])
    assert rows["mxfp8"] == ["float8_e4m3fn[float8_e8m0fnu static 1x32]", "float8_e4m3fn[float8_e8m0fnu dynamic 1x32]", "mxfp8"]
    assert rows["mxfp4"] == ["float4_e2m1fn_x2[float8_e8m0fnu static 1x32]", "float4_e2m1fn_x2[float8_e8m0fnu dynamic 1x32]", "mxfp4"]
    assert rows["nvfp4"][2] == "nvfp4" and rows["nvfp4"][0].startswith("float4_e2m1fn_x2[float8_e4m3fn static 1x16, scale2 float32")
    assert rows["int8_per_channel_weight_only"][0] == "-"
    data = json.loads(run("keys", "--json").stdout)
    names = {k["name"]: k for k in data["keys"]}
    assert names["fp8_per_token"]["weight"] is None
    assert names["fp8_per_token"]["activation"] == "float8_e4m3fn[float32 dynamic per-token]"
    shorthands = {s["name"]: s for s in data["shorthands"]}
    assert shorthands["int8_per_channel_weight_only"]["linear"] is None


def test_plugins_json():
    data = json.loads(run("plugins", "--json").stdout)
    by = {r["name"]: r for r in data}
    for name in ("fp8", "int8", "mxfp8", "mxfp4", "nvfp4"):  # each its own distribution
        assert (by[name]["distribution"], by[name]["status"]) == (f"oq-plugin-{name}", "loaded")


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
    lines = r.stdout.splitlines()
    assert "(BertModel)" in lines[0]
    assert lines[1] == 'config: {"linear": {"weight": "toy_int4"}, "moe": {"weight": "toy_int4"}, "ignore": ["re:.*pooler.*"]}'
    rows = {line.split()[0]: line.split() for line in lines[4:-1]}
    assert rows["encoder.layer.0.attention.self.query"][1:4] == ["linear", "[384,", "384]"]
    assert rows["encoder.layer.5.intermediate.dense"][1:] == ["linear", "[1536,", "384]", "toy_int4", "none", "torch", "toy-fast", "linear"]
    assert rows["pooler.dense"][-3:] == ["ignored", "by", "'re:.*pooler.*'"]
    assert lines[-1].startswith("Quantized 36 layers of types: attention.self.query: 6 (from linear: toy_int4);")


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
    assert r.exit_code == 1
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith(f"error: {tmp_path / 'nope'}")


@pytest.mark.parametrize("text", ["{not json", '{"model_type": "no_such_model_type"}'])
def test_explain_unbuildable_config(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    r = run("explain", "--model", str(tmp_path), "--config", "fp8_per_block")
    assert r.exit_code == 1
    assert len(r.stderr.splitlines()) == 1 and str(tmp_path / "config.json") in r.stderr


def test_quantize_main_job_on_the_bundled_model(tmp_path, monkeypatch):
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    r = run("quantize", "--json", str(tmp_path / "figures.json"), "--out", str(tmp_path / "q"))
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "Quantized 37 layers of types: attention.self.query: 6 (from linear: fp8_per_block_static);" in out
    assert ["linear", "fp8_per_block_static", "fp8_per_block_dynamic"] in [line.split()[:3] for line in out.splitlines()]
    assert "fidelity: mean embedding cosine vs bf16 on 32 sentences: 0.99" in out
    assert "peak memory:" in out and "saved:" in out
    data = json.loads((tmp_path / "figures.json").read_text())
    assert abs(data["fidelity"]["cosine"] - 0.9979) <= 0.0003
    assert data["report"]["rows"][0]["count"] == 37
    assert data["report"]["peak_rss"] > 0 and data["report"]["seconds_total"] > 0
    import oqcore

    back = oqcore.load(tmp_path / "q")
    assert oqcore.report(back).summary == data["report"]["summary"]


def test_quantize_bad_model_is_one_error_line(tmp_path):
    r = run("quantize", "--model", str(tmp_path), "--no-check")
    assert r.exit_code == 1
    assert r.stderr.strip() == f"error: {tmp_path / 'config.json'} does not exist: a model folder needs config.json (and safetensors weights)"


def test_make_model(tmp_path):
    r = run("make-model", "gpt_oss", str(tmp_path / "g"), "--layers", "1")
    assert r.exit_code == 0 and (tmp_path / "g" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]  # no temporary folder left beside it
    assert run("make-model", "llama", str(tmp_path / "x")).exit_code == 2
    assert not (tmp_path / "x").exists()


# ---- overrides on top of the default scheme, --config everywhere ------------------------------


def validate_lines(*args):
    r = run("validate", *args)
    assert r.exit_code == 0, r.output
    return r.stdout.splitlines()


def test_overrides_apply_on_top_of_the_default_scheme():
    assert validate_lines() == ["linear:", "  weight: fp8_per_block_static", "moe:", "  weight: fp8_per_block_static", "valid"]
    assert validate_lines("linear.activation=null") == [
        "linear:", "  weight: fp8_per_block_static", "  activation: null", "moe:", "  weight: fp8_per_block_static", "valid",
    ]
    # moe=X replaces moe only: the default linear spec stays
    assert validate_lines("moe=mxfp8") == ["linear:", "  weight: fp8_per_block_static", "moe:", "  weight: mxfp8", "valid"]
    # linear=X then linear.activation=null keeps X
    assert validate_lines("linear=fp8_per_channel", "linear.activation=null") == [
        "linear:", "  weight: fp8_per_channel_static", "  activation: null", "moe:", "  weight: fp8_per_block_static", "valid",
    ]


def test_config_is_a_shorthand_a_key_name_or_a_file(tmp_path):
    shorthand = validate_lines("--config", "fp8_per_channel")
    assert validate_lines("fp8_per_channel") == shorthand  # the first positional without '=' is the config
    assert shorthand[:2] == ["linear:", "  weight: fp8_per_channel_static"]
    assert validate_lines("--config", "mxfp8", "linear.activation=null")[:3] == ["linear:", "  weight: mxfp8", "  activation: null"]
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"moe": "int8_per_channel_weight_only"}))
    assert validate_lines("--config", str(f), "linear=mxfp8") == [
        "linear:", "  weight: mxfp8", "moe:", "  weight: int8_per_channel_static", "  activation: null", "valid",
    ]


def test_interpolation_only_with_the_flag(monkeypatch):
    monkeypatch.setenv("OQ_TEST_SCHEME", "mxfp8")
    assert validate_lines("--interpolate", "moe=${oc.env:OQ_TEST_SCHEME}")[2:4] == ["moe:", "  weight: mxfp8"]
    r = run("validate", "moe=${oc.env:OQ_TEST_SCHEME}")
    assert r.exit_code == 2 and "interpolation" in r.stderr


def test_explain_applies_overrides_to_the_default(tiny_moe):
    r = run("explain", "--model", str(tiny_moe("olmoe")), "linear.activation=null", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["config"] == {"linear": {"weight": "fp8_per_block_static", "activation": None}, "moe": {"weight": "fp8_per_block_static"}}
    assert data["saved"] is False
    kinds = {row["kind"]: row for row in data["layers"] if row.get("weight")}
    assert kinds["linear"]["activation"] == "none" and kinds["moe"]["activation"] == "fp8_per_block_dynamic"


# ---- quantize a tiny MoE, then explain / quantize its saved folder ---------------------------


@pytest.fixture(scope="module")
def saved_tiny(tiny_moe, tmp_path_factory):
    """`oq quantize` of a tiny OLMoE with a YAML config and overrides, saved with --out and --json."""
    tmp = tmp_path_factory.mktemp("cli-saved")
    cfg = tmp / "scheme.yaml"
    cfg.write_text("linear: fp8_per_block\nmoe: mxfp8\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OQ_DISABLE_TRITON", "1")
        r = run("quantize", "--model", str(tiny_moe("olmoe")), "--config", str(cfg), "moe=int8_per_channel_weight_only",
                "--out", str(tmp / "q"), "--json", str(tmp / "figures.json"))
    return r, tmp


def test_quantize_tiny_moe_causal_lm_with_overrides(saved_tiny):
    r, tmp = saved_tiny
    assert r.exit_code == 0, r.output
    rows = [line.split() for line in r.stdout.splitlines()]
    assert ["moe", "int8_per_channel_static", "none", "cpu", "cpu-int8", "2"] in [row[:6] for row in rows]
    assert ["linear", "fp8_per_block_static", "fp8_per_block_dynamic", "cpu", "cpu", "8"] in [row[:6] for row in rows]
    assert "fidelity: logits SQNR vs bf16: " in r.stdout and "top-1 agreement" in r.stdout
    data = json.loads((tmp / "figures.json").read_text())
    assert data["config"] == {"linear": {"weight": "fp8_per_block_static"}, "moe": {"weight": "int8_per_channel_static", "activation": None}}
    assert data["out"] == str(tmp / "q") and data["saved"] is False


def test_explain_a_saved_folder_shows_the_saved_config(saved_tiny):
    _, tmp = saved_tiny
    r = run("explain", "--model", str(tmp / "q"), "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["saved"] is True
    assert data["config"] == {"linear": {"weight": "fp8_per_block_static"}, "moe": {"weight": "int8_per_channel_static", "activation": None}}
    moe = [row for row in data["layers"] if row["kind"] == "moe"]
    assert moe and all(row["weight"] == "int8_per_channel_static" for row in moe)
    text = run("explain", "--model", str(tmp / "q")).stdout.splitlines()
    assert text[1].endswith("(saved with the model)")
    # the saved scheme itself, spelled another way, overlays nothing; another weight key for a
    # stored layer is a ConfigError naming both (vLLM's overlay rules, tests/test_overlay.py)
    same = run("explain", "--model", str(tmp / "q"), "linear=fp8_per_block_static")
    assert same.exit_code == 0, same.output
    other = run("explain", "--model", str(tmp / "q"), "--config", "fp8_per_block")
    assert other.exit_code == 2 and other.stderr.startswith(f"error: --config: {tmp / 'q'} is already quantized, and --config/overrides do not fit it: moe.weight: moe weight fp8_per_block_static conflicts with ")
    assert "already quantized as int8_per_channel_static" in other.stderr


def test_quantize_a_saved_folder_loads_it_back(saved_tiny):
    _, tmp = saved_tiny
    r = run("quantize", "--model", str(tmp / "q"), "--json", str(tmp / "again.json"))
    assert r.exit_code == 0, r.output
    assert "(saved with the model)" in r.stdout.splitlines()[1]
    assert "fidelity: not checked" in r.stdout
    first, again = json.loads((tmp / "figures.json").read_text()), json.loads((tmp / "again.json").read_text())
    assert again["saved"] is True and again["config"] == first["config"]
    assert again["report"]["summary"] == first["report"]["summary"]


def test_json_write_failure_keeps_the_figures(saved_tiny):
    """--json onto a full disk: the figures go to stdout, then one error line, exit 1."""
    _, tmp = saved_tiny
    r = run("quantize", "--model", str(tmp / "q"), "--no-check", "--json", "/dev/full")
    assert r.exit_code == 1
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error")] == ["error: --json /dev/full: cannot write the figures (No space left on device); they are printed above instead"]
    figures = json.loads(r.stdout[r.stdout.index("{\n"):])
    assert figures["saved"] is True and figures["report"]["rows"]


@pytest.mark.parametrize("json_target", ["figures.json", "/dev/full"])
def test_save_failure_after_the_work_keeps_the_figures(saved_tiny, monkeypatch, json_target):
    """A SaveError at the very end (disk full while saving): the figures are still written (or, if
    that fails too, printed), then one error line per failure, exit 1."""
    import oqcore

    _, tmp = saved_tiny

    def full_disk(model, out, **kwargs):
        raise oqcore.SaveError(f"cannot save to {out}: No space left on device")

    monkeypatch.setattr(oqcore, "save_quantized", full_disk)
    target = json_target if json_target.startswith("/") else str(tmp / json_target)
    r = run("quantize", "--model", str(tmp / "q"), "--no-check", "--out", str(tmp / "q2"), "--json", target)
    assert r.exit_code == 1
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    if target == "/dev/full":
        assert errors == [
            "error: --json /dev/full: cannot write the figures (No space left on device); they are printed above instead",
            f"error: cannot save to {tmp / 'q2'}: No space left on device",
        ]
        figures = json.loads(r.stdout[r.stdout.index("{\n"):])
    else:
        assert errors == [f"error: cannot save to {tmp / 'q2'}: No space left on device"]
        figures = json.loads(Path(target).read_text())
    assert figures["saved"] is True and "out" not in figures and figures["report"]["rows"]
    assert not (tmp / "q2").exists()


def test_warnings_are_one_line(monkeypatch):
    """A warning raised while a command runs prints as one `warning:` line, not file:line + source."""
    import warnings

    import oqcore.cli as cli

    def table(*a, **k):
        warnings.warn("3 layers kept in high precision\n(see oq explain)", UserWarning, stacklevel=1)
        return "table"

    monkeypatch.setattr(cli, "_table", table)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        r = run("keys")
    assert r.exit_code == 0
    assert r.stderr.splitlines() == ["warning: 3 layers kept in high precision; (see oq explain)"] * 2


def test_embedding_without_standalone_mode_propagates_the_error():
    """`main(..., standalone_mode=False)` leaves the exception to the caller (no exit, no printing)."""
    import typer

    import oqcore

    with pytest.raises(oqcore.ConfigError, match="fp8_per_blok"):
        typer.main.get_command(app).main(["validate", "fp8_per_blok"], standalone_mode=False)


# ---- a command leaves the process as it found it ----------------------------------------------


def _global_state() -> dict:
    """What a command may change for the whole process while it runs (and must put back)."""
    import logging
    import warnings

    import oqcore.cli as cli

    return {
        "levels": {n: logging.getLogger(n).level for n in cli.NOISY_LOGGERS},
        "showwarning": warnings.showwarning,
        "excepthook": sys.excepthook,
        "sys.path": list(sys.path),
    }


@pytest.fixture
def noisy_levels():
    """``noisy_levels(level)`` sets every logger of ``oqcore.cli.NOISY_LOGGERS`` to ``level`` (with
    ``setLevel``, which also clears logging's cache); the test's end puts the old levels back."""
    import logging

    import oqcore.cli as cli

    loggers = [logging.getLogger(n) for n in cli.NOISY_LOGGERS]
    old = [lg.level for lg in loggers]

    def set_all(level: int) -> None:
        for lg in loggers:
            lg.setLevel(level)

    yield set_all
    for lg, level in zip(loggers, old):
        lg.setLevel(level)


def _broken_table(*a, **k):
    raise RuntimeError("broken table")


@pytest.mark.parametrize(
    ("argv", "status", "table"),
    [
        (["keys"], 0, None),  # success
        (["keys", "surplus"], 2, None),  # usage error
        (["validate", "fp8_per_blok"], 2, None),  # ConfigError
        (["keys"], 1, _broken_table),  # an unexpected exception inside the command
    ],
    ids=["success", "usage-error", "config-error", "internal-error"],
)
@pytest.mark.parametrize("initial", [0, 10], ids=["levels-unset", "levels-debug"])  # NOTSET, DEBUG
def test_main_restores_logger_levels(noisy_levels, monkeypatch, capsys, argv, status, table, initial):
    """`oqcore.cli.main([...])` returns the exit status and leaves the noisy third-party loggers at
    the levels it found (quieted to ERROR only while the command runs), the warning printer and
    sys.excepthook as they were, whether the command succeeds or fails."""
    import logging

    import oqcore.cli as cli

    noisy_levels(initial)
    seen = {}
    real_table = cli._table

    def spy(*a, **k):
        seen.update({n: logging.getLogger(n).level for n in cli.NOISY_LOGGERS})
        return (table or real_table)(*a, **k)

    monkeypatch.setattr(cli, "_table", spy)
    before = _global_state()
    assert cli.main(argv) == status
    assert _global_state() == before
    assert {n: logging.getLogger(n).level for n in cli.NOISY_LOGGERS} == {n: initial for n in cli.NOISY_LOGGERS}
    if argv[0] == "keys" and len(argv) == 1:  # the command body ran: quieted meanwhile
        assert seen == {n: logging.ERROR for n in cli.NOISY_LOGGERS}
    errors = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("warning: ")]
    assert len(errors) == (status != 0) and all(ln.startswith("error: ") for ln in errors), errors


def test_embedding_without_standalone_mode_restores_logger_levels(noisy_levels):
    """The standalone_mode=False path (the exception propagates) restores the levels too."""
    import logging

    import typer

    import oqcore
    import oqcore.cli as cli

    noisy_levels(logging.INFO)
    with pytest.raises(oqcore.ConfigError, match="fp8_per_blok"):
        typer.main.get_command(app).main(["validate", "fp8_per_blok"], standalone_mode=False)
    assert {logging.getLogger(n).level for n in cli.NOISY_LOGGERS} == {logging.INFO}
