"""oqcore.native: build once, cache by content, honour OQ_COMPILE=0, report failures."""

import ctypes
import os
import shutil
import warnings

import pytest

from oqcore import native
from oqcore.native import NativeLibrary

SOURCE = "int oq_test_add(int a, int b) { return a + b; }\n"

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")


def _bind(lib):
    lib.oq_test_add.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.oq_test_add.restype = ctypes.c_int


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OQ_CPU_KERNEL_CACHE", str(tmp_path))
    monkeypatch.delenv("OQ_COMPILE", raising=False)
    return tmp_path


def test_builds_binds_and_reports():
    lib = NativeLibrary("oq_test_native", SOURCE, bind=_bind)
    handle = lib.load()
    assert handle is not None and handle.oq_test_add(2, 40) == 42
    assert lib.load() is handle  # loaded once per process
    ok, reason = lib.status()
    assert ok and "oq_test_native" in reason
    assert os.path.exists(lib.path()) and os.path.dirname(lib.path()) == native.cache_dir()
    # the atomic write leaves no temporary file behind
    assert os.listdir(native.cache_dir()) == [os.path.basename(lib.path())]


def test_second_load_uses_the_cache(monkeypatch):
    NativeLibrary("oq_test_native", SOURCE, bind=_bind).load()

    def no_compiler(*a, **k):
        raise AssertionError("recompiled despite a cached library")

    monkeypatch.setattr(native.subprocess, "run", no_compiler)
    fresh = NativeLibrary("oq_test_native", SOURCE, bind=_bind)  # as in a new process
    assert fresh.load().oq_test_add(1, 2) == 3


def test_key_depends_on_source_and_flags():
    a = NativeLibrary("x", SOURCE)
    assert a.path() != NativeLibrary("x", SOURCE + "\n").path()
    assert a.path() != NativeLibrary("x", SOURCE, extra_flags=("-DFOO",)).path()
    assert a.path() == NativeLibrary("x", SOURCE).path()


def test_compile_disabled(monkeypatch, cache):
    monkeypatch.setenv("OQ_COMPILE", "0")
    lib = NativeLibrary("oq_test_native", SOURCE, bind=_bind)
    assert lib.load() is None
    ok, reason = lib.status()
    assert not ok and "OQ_COMPILE=0" in reason
    assert not os.path.exists(native.cache_dir())  # nothing was built


def test_broken_source_reports_compiler_error():
    lib = NativeLibrary("oq_test_broken", "int f(void) { return oq_undeclared_symbol; }\n")
    with pytest.warns(UserWarning, match="oq_test_broken"):
        assert lib.load() is None
    ok, reason = lib.status()
    assert not ok and "oq_undeclared_symbol" in reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not on every call
        assert lib.load() is None
    assert not os.path.exists(lib.path())


def test_bind_failure_is_a_load_failure():
    def bad_bind(lib):
        lib.oq_missing_function.restype = None

    lib = NativeLibrary("oq_test_native", SOURCE, bind=bad_bind)
    with pytest.warns(UserWarning):
        assert lib.load() is None
    assert "oq_missing_function" in lib.status()[1]
