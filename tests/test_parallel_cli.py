"""``oq quantize --tp N`` under torchrun: every rank loads its shard, rank 0 reports every rank's
figures and writes the same --out folder an unsharded run writes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from oqcore.cli import main


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    from oqcore.synthetic import make_tiny_moe

    return make_tiny_moe("mixtral", tmp_path_factory.mktemp("cli-tp"), hidden_size=256, intermediate_size=256,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=64)


@pytest.mark.parametrize("parallel", ["tp", "ep"])
def test_quantize_under_torchrun_writes_the_unsharded_folder(mixtral, tmp_path, parallel):
    env = {**os.environ, "OQ_DISABLE_TRITON": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "oqcore.cli", "quantize",
           "--model", str(mixtral), "--tp", "2", "--parallel", parallel, "--no-check", "--out", str(tmp_path / "tp"), "fp8_per_block"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    # rank 0 alone prints the report, with a line per rank
    assert run.stdout.count("model size now:") == 1, run.stdout
    assert "per rank:" in run.stdout and "rank 0:" in run.stdout and "rank 1:" in run.stdout, run.stdout
    assert main(["quantize", "--model", str(mixtral), "--no-check", "--out", str(tmp_path / "one"), "fp8_per_block"]) == 0
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert sorted(p.name for p in (tmp_path / "tp").iterdir()) == names
    for name in names:
        assert (tmp_path / "tp" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_tp_without_torchrun_says_how_to_start_it(mixtral, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["quantize", "--model", str(mixtral), "--tp", "2", "--no-check", "fp8_per_block"]) != 0
    err = capsys.readouterr().err
    assert "--tp" in err and "torchrun --nproc-per-node 2 -m oqcore.cli quantize --tp 2" in err, err


@pytest.mark.parametrize("args,field,text", [(["--tp", "0"], "--tp", "at least 1"), (["--tp", "2", "--parallel", "dp"], "--parallel", "tp or ep")])
def test_bad_mesh_options_are_config_errors(mixtral, capsys, args, field, text):
    assert main(["quantize", "--model", str(mixtral), "--no-check", *args, "fp8_per_block"]) != 0
    err = capsys.readouterr().err
    assert field in err and text in err, err


def test_tp_size_must_match_torchrun(mixtral, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["quantize", "--model", str(mixtral), "--tp", "2", "--no-check", "fp8_per_block"]) != 0
    err = capsys.readouterr().err
    assert "--tp 2 but torchrun started 4 processes" in err, err
