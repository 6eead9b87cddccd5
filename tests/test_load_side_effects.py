"""A load leaves the C allocator as it found it (issue 10, item 6).

oqcore once set glibc's M_MMAP_THRESHOLD with ``mallopt`` for every load; glibc can neither report
that setting nor go back to its dynamic default, so it stayed set for the rest of the process. Now
a load only calls ``malloc_trim`` (which returns free pages and changes no setting), and the C
library is looked up on first use, not at import. Checked two ways: with a recording stand-in for
libc (every call a load makes, on success and on error), and in a fresh process with glibc's own
behaviour (a setting left behind would show as a 31 MiB allocation served by mmap again after a
31 MiB free, where the dynamic threshold, raised by that free, serves it from the heap).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import oqcore
import oqcore.loading.memory as memory
from oqcore.errors import UnsupportedLayerError

NAN_WEIGHT = "model.layers.1.self_attn.o_proj.weight"


@pytest.fixture(autouse=True)
def _cpu_backends(monkeypatch):
    """The allocator does not depend on the backend; the CPU backends keep these loads fast."""
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")


@pytest.fixture(scope="module")
def folders(tiny_moe, tmp_path_factory) -> tuple[Path, Path]:
    """``(good, bad)``: a tiny Mixtral, and a copy whose second layer's o_proj holds a NaN, so its
    load fails half-way through the stream (after earlier layers were quantized and trimmed)."""
    good = tiny_moe("mixtral")
    bad = tmp_path_factory.mktemp("nan") / "mixtral"
    shutil.copytree(good, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors[NAN_WEIGHT].view(-1)[3] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    return good, bad


class _RecordingLibc:
    """Stands in for the C library: every function called is recorded with its arguments."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append((name, *args))
            return 0

        return call


@pytest.mark.parametrize("case", ["ok", "error"])
def test_a_load_only_trims_and_sets_nothing(folders, monkeypatch, case):
    """Every libc call of a load, successful or failing half-way, is ``malloc_trim(0)`` (one per
    quantized layer done): no ``mallopt`` or other setting that would outlive the load."""
    fake = _RecordingLibc()
    monkeypatch.setattr(memory, "_libc", lambda: fake)
    good, bad = folders
    if case == "ok":
        model = oqcore.load(good, "fp8_per_tensor")
        layers = len(model.oq_state.wrappers)
    else:
        with pytest.raises(UnsupportedLayerError, match=NAN_WEIGHT.rpartition(".")[0]):
            oqcore.load(bad, "fp8_per_tensor")
    names = [c[0] for c in fake.calls]
    assert set(names) == {"malloc_trim"}, fake.calls
    assert all(c == ("malloc_trim", 0) for c in fake.calls)
    if case == "ok":
        assert layers > 0 and len(names) == layers  # once per quantized layer, after it is quantized
    else:
        assert len(names) > 0  # the layers quantized before the NaN one were trimmed


PROBE = r"""
import ctypes, json, sys

libc = ctypes.CDLL(None)


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.malloc_trim.argtypes = [ctypes.c_size_t]
libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]


def threshold_fixed():
    # glibc's dynamic threshold rises to the size of a freed mmapped chunk (up to 32 MiB): after a
    # 31 MiB malloc/free, the next 31 MiB malloc comes from the heap. A fixed threshold (mallopt,
    # or the MALLOC_MMAP_THRESHOLD_ environment) never rises: it is served by mmap again.
    # malloc_trim first, so no free top of the heap from an earlier probe can serve the request.
    libc.malloc_trim(0)
    libc.free(libc.malloc(31 << 20))
    before = libc.mallinfo2().hblks
    p = libc.malloc(31 << 20)
    mmapped = libc.mallinfo2().hblks > before
    libc.free(p)
    return mmapped


import oqcore
import oqcore.loading.memory as memory

out = {"libc_at_import": memory._libc.cache_info().currsize, "before": threshold_fixed()}
oqcore.load(sys.argv[1], "fp8_per_tensor")
out["after_load"] = threshold_fixed()
out["libc_after_load"] = memory._libc.cache_info().currsize
try:
    oqcore.load(sys.argv[2], "fp8_per_tensor")
    out["error"] = None
except oqcore.OqError as e:
    out["error"] = type(e).__name__
out["after_error"] = threshold_fixed()
libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: what loads used to leave behind (the probe's control)
out["control"] = threshold_fixed()
print(json.dumps(out))
"""


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL(None), "mallinfo2")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_glibc_threshold_after_a_load_is_as_before(folders, tmp_path):
    """In a fresh process: libc is not looked up at import, and glibc's mmap threshold behaves the
    same after a load and after a failed load as before them (still dynamic), while the control, a
    ``mallopt`` like the one loads used to make, is seen by the same probe."""
    good, bad = folders
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env["OQ_DISABLE_TRITON"] = "1"
    p = subprocess.run(
        [sys.executable, "-c", PROBE, str(good), str(bad)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["libc_at_import"] == 0  # looked up on first use only
    assert out["libc_after_load"] == 1
    assert out["error"] == "UnsupportedLayerError"
    assert out["before"] is False  # glibc's default: a dynamic threshold
    assert out["after_load"] is False
    assert out["after_error"] is False
    assert out["control"] is True  # the probe does see a threshold left set
