"""Folder-level crash test: a save over an earlier export killed at any point leaves the earlier
export (loadable, bit-identical) or the new one, or, only in the two-rename fallback's window, a
folder ``oqcore.load`` refuses with a :class:`oqcore.CheckpointError`. A later save then succeeds
and cleans up the leftovers.

One child Python process loads the model once, then forks a saver per case: killed with
``os._exit`` at each named stage of the write (through the ``oqcore.atomic._STAGE_HOOK`` test hook),
with and without ``RENAME_EXCHANGE``; ``SIGKILL``ed at random moments of a save; and run with a real
file-size limit (``RLIMIT_FSIZE``, ``SIGXFSZ`` ignored: writes fail with ``EFBIG`` as on a full disk).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import oqcore
from oqcore.errors import CheckpointError

STAGES = ["temp_created", "tensors_half", "tensors_written", "files_copied", "config_written", "synced", "swapped"]
# the two-rename fallback differs only in the swap: its stages around it
FALLBACK_STAGES = ["synced", "old_moved", "swapped"]
AFTER_SWAP = {"swapped"}
RANDOM_KILLS = 4


@pytest.fixture(autouse=True)
def _cpu_backends(monkeypatch):
    """Saving and loading do not depend on the backend; the CPU backends keep these tests fast
    (conftest turns Triton's interpreter on, which would otherwise be chosen and is slow)."""
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")

CHILD = textwrap.dedent(
    r"""
    import json, os, random, resource, shutil, signal, sys, time
    from pathlib import Path
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)  # forked savers must not inherit a busy OpenMP pool
    import oqcore
    import oqcore.atomic as atomic

    src, pristine_a, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    stages, fallback_stages, kills = json.loads(sys.argv[4]), json.loads(sys.argv[5]), int(sys.argv[6])
    model = oqcore.load(src, "mxfp8")
    results = []

    def run(case, stage=None, exchange=True, kill_after=None, fsize=None):
        d = work / case
        d.mkdir()
        shutil.copytree(pristine_a, d / "out")
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                if not exchange:
                    atomic.exchange = lambda a, b: False
                if stage is not None:
                    atomic._STAGE_HOOK = lambda s: os._exit(77) if s == stage else None
                if fsize is not None:
                    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
                oqcore.save_quantized(model, d / "out")
            except oqcore.OqError as e:
                (d / "error.txt").write_text(f"{type(e).__name__}: {e}")
                code = 3
            except BaseException as e:
                (d / "error.txt").write_text(f"{type(e).__name__}: {e}")
                code = 4
            os._exit(code)
        if kill_after is not None:
            time.sleep(kill_after)
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        results.append({"case": case, "stage": stage, "exchange": exchange, "status": os.waitstatus_to_exitcode(status),
                        "seconds": time.perf_counter() - t0, "random": kill_after is not None, "fsize": fsize})

    run("clean")
    for exchange, names in ((True, stages), (False, fallback_stages)):
        for s in names:
            run(f"{s}-{'x' if exchange else 'r'}", stage=s, exchange=exchange)
    duration = results[0]["seconds"]
    rng = random.Random(1234)
    for i in range(kills):
        run(f"random{i}", kill_after=rng.uniform(0, 1.5 * duration), exchange=bool(i % 2))
    size = (Path(pristine_a) / "model.safetensors").stat().st_size
    run("fsize", fsize=size // 2)
    (work / "results.json").write_text(json.dumps(results))
    """
)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().reshape(-1).view(torch.uint8).clone() for k, v in model.state_dict().items() if v.numel()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_killed_saves_leave_the_earlier_export_or_the_new_one(tiny_moe, tmp_path):
    src = tiny_moe("mixtral")
    old = oqcore.load(src, "fp8_per_channel")
    new = oqcore.load(src, "mxfp8")
    pristine_a = oqcore.save_quantized(old, tmp_path / "pristine_a")
    pristine_b = oqcore.save_quantized(new, tmp_path / "pristine_b")
    a_files, b_files = _tree(pristine_a), _tree(pristine_b)
    state_a, state_b = _state(oqcore.load(pristine_a)), _state(oqcore.load(pristine_b))
    assert not _same(state_a, state_b)
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, OQ_DISABLE_TRITON="1", PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(pristine_a), str(work), json.dumps(STAGES), json.dumps(FALLBACK_STAGES), str(RANDOM_KILLS)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    print(f"child: {time.perf_counter() - t0:.1f} s")
    results = json.loads((work / "results.json").read_text())
    assert len(results) == 1 + len(STAGES) + len(FALLBACK_STAGES) + RANDOM_KILLS + 1

    seen = {"a": 0, "b": 0, "refused": 0}
    for res in results:
        case, out = res["case"], work / res["case"] / "out"
        if res["case"] == "clean":
            assert res["status"] == 0
        elif res["fsize"]:
            # a real write failure (EFBIG past RLIMIT_FSIZE): a typed SaveError naming the destination,
            # and the earlier export byte for byte as it was
            err = (work / case / "error.txt").read_text()
            assert res["status"] == 3 and err.startswith("SaveError") and str(out) in err, err
            assert _tree(out) == a_files
        elif res["stage"] is not None:
            assert res["status"] == 77, f"{case}: the save did not reach stage {res['stage']} ({res})"
        try:
            got = _state(oqcore.load(out))
        except CheckpointError as e:
            # only the two-rename fallback has a window without a destination folder
            assert res["stage"] == "old_moved" or (res["random"] and not res["exchange"]), f"{case}: {e}"
            assert "config.json" in str(e)
            seen["refused"] += 1
        else:
            if _same(got, state_a):
                which = "a"
            else:
                assert _same(got, state_b), f"{case}: the folder loads but is neither export"
                which = "b"
            seen[which] += 1
            if res["stage"] is not None:
                expected = "b" if res["stage"] in AFTER_SWAP else "a"
                assert which == expected, f"{case}: found export {which}, expected {expected}"
            if res["case"] == "clean":
                assert which == "b"
        # whatever the crash left, the next save succeeds, cleans up and gives the new export
        # (saves are deterministic: the same bytes as the pristine one)
        oqcore.save_quantized(new, out)
        assert _tree(out) == b_files
        leftovers = [p.name for p in out.parent.iterdir() if p.name != "out" and p.name != "error.txt"]
        assert leftovers == [], f"{case}: leftovers after the next save: {leftovers}"
    assert seen["a"] and seen["b"] and seen["refused"], seen
