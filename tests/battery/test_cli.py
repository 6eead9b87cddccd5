"""Bad-input battery of the `oq` command: each case asserts the exit status (2 usage/config, 1 any
other error, 130 Ctrl-C), exactly one ``error:`` line per error on stderr naming the culprit, and
no traceback unless ``--debug`` / ``OQ_DEBUG=1`` asks for one.

Cases run in-process through typer's CliRunner (the error handling lives in the ``oq`` group's
``main``, which the console script calls too); a few run the installed ``oq`` script itself.
No case reads model weights: models are config.json-only folders, which is all ``oq explain``
and the early checks of ``oq quantize`` need.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

import oqcore
import oqcore.cli as cli
from oqcore.cli import app

runner = CliRunner()


def invoke(args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def error_lines(stderr: str) -> list[str]:
    """The stderr lines, asserting every one is an ``error:`` line (``warning:`` lines aside):
    no traceback, no usage box, no stray text."""
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("warning: ")]
    assert all(ln.startswith("error: ") for ln in lines), f"not only error lines:\n{stderr}"
    return lines


def check(r, code: int, culprits: tuple[str, ...], n_errors: int = 1) -> list[str]:
    """Exit status ``code``, exactly ``n_errors`` error lines, each culprit named on one of them
    (ignoring case: click versions spell a missing argument 'arch' or 'ARCH')."""
    assert r.exit_code == code, f"exit {r.exit_code}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    errs = error_lines(r.stderr)
    assert len(errs) == n_errors, r.stderr
    assert "Traceback" not in r.stderr and "╭" not in r.stderr
    for c in culprits:
        assert any(c.lower() in e.lower() for e in errs), f"no error line names {c!r}:\n{r.stderr}"
    return errs


# ---- folders (config.json only: nothing here reads weights) ------------------------------------


def _mixtral_config(folder: Path, hidden: int = 64) -> Path:
    from transformers import AutoConfig

    AutoConfig.for_model(
        "mixtral", hidden_size=hidden, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, vocab_size=128,
    ).save_pretrained(folder)
    return folder


def _with_quantization_config(src: Path, dst: Path, qc) -> Path:
    dst.mkdir()
    raw = json.loads((src / "config.json").read_text())
    raw["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


SAVED = {"linear": {"weight": "fp8_per_block_static"}, "moe": {"weight": "mxfp8"}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Named folders and files the cases point at."""
    root = tmp_path_factory.mktemp("cli-battery")
    hp = _mixtral_config(root / "hp")
    f = {
        "root": root,
        "hp": hp,
        "k48": _mixtral_config(root / "k48", hidden=48),
        "saved": _with_quantization_config(hp, root / "saved", {"quant_method": "oqcore", "format_version": 1, "config": SAVED}),
        "ct": _with_quantization_config(hp, root / "ct", {"quant_method": "compressed-tensors", "config_groups": {}}),
        "saved_bad": _with_quantization_config(hp, root / "saved_bad", {"quant_method": "oqcore", "format_version": 1, "config": {"linear": "nope_key"}}),
        "notjson": root / "notjson",
        "full": root / "full",
        "file": root / "a_file.txt",
        "yaml_bad": root / "bad.yaml",
        "yaml_list": root / "list.yaml",
    }
    f["notjson"].mkdir()
    (f["notjson"] / "config.json").write_text("{not json")
    f["full"].mkdir()
    (f["full"] / "keep.txt").write_text("mine")
    f["file"].write_text("a file")
    f["yaml_bad"].write_text("linear: [unclosed\n")
    f["yaml_list"].write_text("- fp8_per_block\n")
    return f


# (id, argv with {name} placeholders for folders, exit status, culprits, error lines)
CASES = [
    # usage errors: typer/click's own, as one plain line
    ("unknown-command", ["quantise"], 2, ("quantise", "quantize"), 1),
    # `oq bench` was dropped (it edited sys.path to import bench/ from a checkout): `python -m bench`
    ("bench-is-not-a-command", ["bench", "--quick"], 2, ("'bench'",), 1),
    ("unknown-option", ["validate", "--bogus"], 2, ("--bogus", "oq validate --help"), 1),
    ("extra-argument", ["keys", "surplus"], 2, ("surplus",), 1),
    ("missing-argument", ["make-model"], 2, ("ARCH",), 1),
    ("bad-int-option", ["make-model", "mixtral", "{root}/m", "--layers", "two"], 2, ("--layers",), 1),
    ("debug-after-command", ["validate", "--debug"], 2, ("--debug",), 1),
    # config errors
    ("unknown-shorthand", ["validate", "fp8_per_blok"], 2, ("fp8_per_blok", "did you mean 'fp8_per_block'"), 1),
    ("unknown-config-option", ["explain", "--model", "{hp}", "--config", "mxfp9"], 2, ("mxfp9",), 1),
    ("two-bad-fields", ["validate", "linear.weigth=mxfp8", "moe.activation=bogus"], 2, ("linear.weigth", "moe.activation"), 2),
    ("override-without-equals", ["validate", "fp8_per_block", "moe.activation"], 2, ("moe.activation",), 1),
    ("override-into-a-scalar", ["validate", "ignore=lm_head", "ignore.x=1"], 2, ("ignore",), 1),
    ("config-file-missing", ["validate", "--config", "{root}/nope.yaml"], 2, ("nope.yaml",), 1),
    ("config-file-bad-yaml", ["validate", "{yaml_bad}"], 2, ("bad.yaml",), 1),
    ("config-file-not-mapping", ["explain", "--config", "{yaml_list}", "--model", "{hp}"], 2, ("list.yaml",), 1),
    ("config-given-twice", ["validate", "--config", "fp8_per_block", "mxfp8"], 2, ("--config", "mxfp8"), 1),
    ("interpolation-off", ["validate", "linear.weight=${{oc.env:OQ_BATTERY_UNSET}}"], 2, ("linear.weight", "interpolat"), 1),
    ("interpolation-unset-env", ["validate", "--interpolate", "linear.weight=${{oc.env:OQ_BATTERY_UNSET}}"], 2, ("OQ_BATTERY_UNSET",), 1),
    ("device-missing", ["explain", "--model", "{hp}", "--device", "cuda:7"], 2, ("--device", "cuda:7"), 1),
    ("device-garbage", ["quantize", "--model", "{hp}", "--device", "gpu0"], 2, ("--device", "gpu0"), 1),
    ("saved-folder-other-config", ["explain", "--model", "{saved}", "--config", "mxfp8"], 2, ("--config", "already quantized", "saved"), 1),
    ("saved-folder-override", ["quantize", "--model", "{saved}", "linear.activation=null"], 2, ("--config", "already quantized"), 1),
    ("make-model-arch", ["make-model", "llama", "{root}/m"], 2, ("llama", "mixtral"), 1),
    ("make-model-zero-size", ["make-model", "mixtral", "{root}/m", "--hidden-size", "0"], 2, ("--hidden-size",), 1),
    ("make-model-odd-hidden", ["make-model", "olmoe", "{root}/m", "--hidden-size", "12"], 2, ("--hidden-size", "olmoe"), 1),
    ("make-model-one-expert", ["make-model", "qwen3_moe", "{root}/m", "--experts", "1"], 2, ("--experts",), 1),
    # checkpoint errors
    ("model-folder-missing", ["explain", "--model", "{root}/nowhere"], 1, ("nowhere",), 1),
    ("config-json-not-json", ["explain", "--model", "{notjson}", "--config", "fp8_per_block"], 1, ("notjson/config.json",), 1),
    ("already-quantized-elsewhere", ["explain", "--model", "{ct}"], 1, ("ct/config.json", "compressed-tensors"), 1),
    ("saved-config-invalid", ["explain", "--model", "{saved_bad}"], 1, ("saved_bad/config.json", "quantization_config.config"), 1),
    ("quantize-missing-model", ["quantize", "--model", "{root}/nowhere", "--no-check"], 1, ("nowhere",), 1),
    # layer errors
    ("layer-k-not-32", ["explain", "--model", "{k48}", "--config", "mxfp8"], 1, ("self_attn.q_proj", "32"), 1),
    # save errors (all found before any weight is read)
    ("json-is-a-folder", ["quantize", "--model", "{hp}", "--json", "{root}"], 1, ("--json",), 1),
    ("json-under-a-file", ["quantize", "--model", "{hp}", "--json", "{file}/x.json"], 1, ("--json", "a_file.txt"), 1),
    ("out-is-a-file", ["quantize", "--model", "{hp}", "--out", "{file}"], 1, ("--out", "a_file.txt"), 1),
    ("out-is-the-source", ["quantize", "--model", "{hp}", "--out", "{hp}"], 1, ("source",), 1),
    ("out-inside-the-source", ["quantize", "--model", "{hp}", "--out", "{hp}/q"], 1, ("inside",), 1),
    ("out-foreign-folder", ["quantize", "--model", "{hp}", "--out", "{full}"], 1, ("full", "not an earlier oqcore export"), 1),
    ("make-model-non-empty", ["make-model", "mixtral", "{full}"], 1, ("full", "not empty"), 1),
    ("make-model-under-a-file", ["make-model", "mixtral", "{file}/m"], 1, ("a_file.txt",), 1),
]


@pytest.mark.parametrize(("argv", "code", "culprits", "n"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error(folders, argv, code, culprits, n):
    args = [a.format(**folders) for a in argv]
    before = {p: sorted(os.listdir(p)) for p in (folders["root"], folders["hp"], folders["full"])}
    r = invoke(args)
    check(r, code, tuple(c.format(**folders) for c in culprits), n)
    # nothing was written or removed anywhere (make-model and quantize failed before writing)
    assert {p: sorted(os.listdir(p)) for p in before} == before
    assert (folders["full"] / "keep.txt").read_text() == "mine"


def test_no_backend_is_one_line(folders, monkeypatch):
    """A pinned backend that cannot run here: NoBackendError, exit 1, one line listing the candidates."""
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    r = invoke(["explain", "--model", folders["hp"], "--config", "fp8_per_block", "backend.linear=triton"])
    (line,) = check(r, 1, ("model.layers.0.self_attn.q_proj", "triton", "Candidates"))
    assert "- torch (fp8)" in line


EVIL_PLUGIN = """
from oqcore import hookimpl

@hookimpl
def oq_register_quant_keys(register):
    pass
"""


@pytest.mark.parametrize("command", ["plugins", "keys", "validate"])
def test_plugin_conflict_is_one_line(tmp_path, monkeypatch, command):
    """A third-party entry point named like a built-in (PluginConflictError): exit 1, one line
    naming both distributions; `oq plugins` still prints its table first."""
    from fakedist import install_fake_dist

    install_fake_dist(tmp_path, monkeypatch, "evil-fp8", {"fp8": "oq_evil_cli"}, {"oq_evil_cli.py": EVIL_PLUGIN})
    r = invoke([command])
    check(r, 1, ("evil-fp8", "oq-plugin-fp8"))
    if command == "plugins":
        rows = [line.split()[:4] for line in r.stdout.splitlines()[2:]]
        assert ["fp8", "evil-fp8", "0.1.0", "conflict"] in rows and ["int8", "oq-plugin-int8"] in [row[:2] for row in rows]


def _boom(*a, **k):
    raise ZeroDivisionError("boom\nsecond line")


def test_unexpected_exception_is_an_internal_error_line(monkeypatch):
    monkeypatch.setattr(cli, "_table", _boom)
    (line,) = check(invoke(["keys"]), 1, ("internal error: ZeroDivisionError: boom; second line", "rerun with --debug"))
    assert line == "error: internal error: ZeroDivisionError: boom; second line (rerun with --debug for the traceback)"


def test_internal_error_from_the_api_is_one_line(folders, monkeypatch):
    """A bug inside the public API arrives as an InternalError (chained); the CLI prints it as one line."""

    def plan(*a, **k):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(oqcore, "plan", oqcore.errors.public_api(plan))
    (line,) = check(invoke(["explain", "--model", folders["hp"]]), 1, ("oqcore.plan", "ZeroDivisionError: boom"))
    assert line.endswith("(rerun with --debug for the traceback)")


def test_keyboard_interrupt_exits_130(monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_table", interrupted)
    r = invoke(["keys"])
    assert r.exit_code == 130
    assert error_lines(r.stderr) == ["error: interrupted"]


# ---- --debug and OQ_DEBUG ----------------------------------------------------------------------


def test_debug_flag_prints_the_traceback_then_the_error(monkeypatch):
    monkeypatch.setattr(cli, "_table", _boom)
    r = invoke(["--debug", "keys"])
    assert r.exit_code == 1
    assert "Traceback (most recent call last)" in r.stderr and "ZeroDivisionError: boom" in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last == "error: internal error: ZeroDivisionError: boom; second line"


def test_debug_flag_on_a_config_error():
    r = invoke(["--debug", "validate", "fp8_per_blok"])
    assert r.exit_code == 2
    assert "Traceback (most recent call last)" in r.stderr and "Error: config 'fp8_per_blok'" in r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")] == [r.stderr.strip().splitlines()[-1]]


def test_oq_debug_env_prints_the_traceback(monkeypatch):
    monkeypatch.setattr(cli, "_table", _boom)
    r = invoke(["keys"], env={"OQ_DEBUG": "1"})
    assert r.exit_code == 1 and "Traceback (most recent call last)" in r.stderr
    r = invoke(["keys"], env={"OQ_DEBUG": "0"})
    assert r.exit_code == 1 and "Traceback" not in r.stderr


def test_debug_does_not_decorate_usage_errors():
    r = invoke(["--debug", "validate", "--bogus"])
    check(r, 2, ("--bogus",))


# ---- the installed console script (how main() really exits) ------------------------------------


def _oq(*args, env=None):
    return subprocess.run(["oq", *map(str, args)], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


def test_script_config_error_exit_2():
    p = _oq("validate", "linear.weigth=mxfp8", "moe.activation=bogus")
    assert p.returncode == 2
    assert error_lines(p.stderr) == [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(error_lines(p.stderr)) == 2 and "Traceback" not in p.stderr
    assert p.stdout == ""


def test_script_usage_error_is_plain(folders):
    p = _oq("make-model", "mixtral")
    assert p.returncode == 2
    assert p.stderr.strip().lower() == "error: missing argument 'out'. try 'oq make-model --help'."


def test_script_save_error_exit_1_and_debug_traceback(folders):
    """A SaveError: exit 1, one line; with OQ_DEBUG=1 the traceback first, the error line last."""
    target = folders["file"] / "m"
    p = _oq("make-model", "mixtral", target)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [f"error: OUT {target}: {folders['file']} is a file, not a folder"]
    p = _oq("make-model", "mixtral", target, env={"OQ_DEBUG": "1"})
    assert p.returncode == 1
    assert p.stderr.startswith("Traceback (most recent call last)") and "oqcore.errors.SaveError" in p.stderr
    assert p.stderr.strip().splitlines()[-1] == f"error: OUT {target}: {folders['file']} is a file, not a folder"
