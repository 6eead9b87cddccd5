"""More bad-input battery of the `oq` command (adversarial pass on issue 9): destinations that
cannot be written are refused before the model is loaded, config/override mistakes exit 2 with one
error line each, case-only typos get a did-you-mean. In-process via typer's CliRunner; no case
reads model weights (models are config.json-only folders, or none at all)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_cli import _mixtral_config, check, invoke


@pytest.fixture
def cfg_only(tmp_path: Path) -> Path:
    return _mixtral_config(tmp_path / "m")


def test_json_in_missing_folder_is_refused_before_loading(cfg_only, tmp_path):
    # the folder holds no weights: a refusal naming --json proves the check ran before the load
    dest = tmp_path / "nope" / "x.json"
    r = invoke(["quantize", "--model", cfg_only, "-c", "fp8_per_tensor", "--json", dest, "--no-check"])
    check(r, 1, ("--json", str(dest), "does not exist"))
    assert not dest.parent.exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs procfs")
@pytest.mark.parametrize("option", ["--json", "--out"])
def test_unwritable_virtual_fs_is_refused_before_loading(cfg_only, option):
    dest = "/proc/oq-battery-x.json" if option == "--json" else "/proc/oq-battery-out"
    r = invoke(["quantize", "--model", cfg_only, "-c", "fp8_per_tensor", option, dest, "--no-check"])
    check(r, 1, (option, dest, "cannot write in folder /proc"))


def test_probe_leaves_nothing_behind(cfg_only, tmp_path):
    out = tmp_path / "out"
    r = invoke(["quantize", "--model", cfg_only, "-c", "fp8_per_tensor", "--out", out, "--json",
                tmp_path / "f.json", "--no-check"])
    assert r.exit_code == 1  # no weights in the folder: fails at the load, after the checks
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".oq-probe-")]


@pytest.mark.parametrize("cmd", ["validate", "explain"])
@pytest.mark.parametrize("config, culprit", [
    ("FP8_PER_BLOCK", "did you mean 'fp8_per_block'"),
    ("MXFP8", "did you mean 'mxfp8'"),
    ("x" * 3000, "neither a file"),
])
def test_config_name_typos(cfg_only, cmd, config, culprit):
    args = [cmd, "-c", config] + (["--model", cfg_only] if cmd == "explain" else [])
    errs = check(invoke(args), 2, (culprit,))
    assert len(errs[0]) < 1000  # a 3,000-character name is cut, not echoed whole


@pytest.mark.parametrize("overrides, culprits, n", [
    (["linear.weight=nope", "moe.weight=nope2"], ("linear.weight", "moe.weight"), 2),
    (["targets.re:(=mxfp8"], ("re:(",), 1),
    (["linear.activation[0]=x"], ("brackets",), 1),
    (["linear=!!python/object:os.system {}"], ("python/object",), 1),
    (["ignore=[1, 2]"], ("ignore[0]", "ignore[1]"), 2),
])
def test_override_errors_one_line_each(overrides, culprits, n):
    check(invoke(["validate", "-c", "fp8_per_tensor", *overrides]), 2, culprits, n_errors=n)


def test_targets_override_with_dotted_pattern_validates():
    r = invoke(["validate", "-c", "online", "targets.re:.*mlp.down_proj.*=mxfp8"])
    assert r.exit_code == 0, r.stderr
    assert "re:.*mlp.down_proj.*" in r.stdout


@pytest.mark.parametrize("name, text, culprit", [
    ("c.yaml", "linear: x\nlinear: y\n", "duplicate key"),
    ("c.yaml", "linear: !!python/object:os.system {}\n", "python/object"),
    ("c.json", '{"linear": "mxfp8" // no comments in JSON\n}', "not valid JSON"),
    ("c.yaml", "- a\n", "mapping at the top"),
])
def test_bad_config_file(tmp_path, name, text, culprit):
    p = tmp_path / name
    p.write_text(text)
    check(invoke(["validate", "-c", p]), 2, (culprit, str(p)))


def test_config_file_bytes_not_utf8(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"linear: \xff\n")
    check(invoke(["validate", "-c", p]), 2, ("not UTF-8", str(p)))


def test_model_folder_and_its_config_json_as_config(cfg_only):
    check(invoke(["validate", "-c", cfg_only]), 2, ("is a folder", "--model"))
    # one line, not one 'unknown field' line per model setting
    check(invoke(["validate", "-c", cfg_only / "config.json"]), 2, ("model's config.json", "model_type"))
