"""oq_toolkit.native: build once, cache by content, honour OQ_COMPILE=0, report failures."""

import ctypes
import os
import shutil
import warnings

import pytest

from oq_toolkit import native
from oq_toolkit.native import NativeLibrary

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


HEADER_SOURCE = '#include "oq_kernels.h"\n#include "oq_test_extra.h"\nfloat oq_test_half(unsigned h) { return half_to_f32(h) + OQ_TEST_OFFSET; }\n'


def _bind_half(lib):
    lib.oq_test_half.argtypes = [ctypes.c_uint]
    lib.oq_test_half.restype = ctypes.c_float


def test_source_file_and_headers(tmp_path):
    """A source given as a file is read on first use; it includes the toolkit's oq_kernels.h (always on
    the include path) and a header of its own include dir; editing that header changes the cache key
    (a rebuild) while the same content keeps it."""
    inc = tmp_path / "inc"
    inc.mkdir()
    (inc / "oq_test_extra.h").write_text("#define OQ_TEST_OFFSET 1.0f\n")
    src = tmp_path / "k.c"
    src.write_text(HEADER_SOURCE)
    lib = NativeLibrary("oq_test_hdr", src, bind=_bind_half, include_dirs=(inc,))
    assert lib.include_dirs == (native.INCLUDE_DIR, str(inc))
    assert lib.load().oq_test_half(0x3C00) == 2.0  # fp16 1.0 + 1.0
    first = lib.path()
    (inc / "oq_test_extra.h").write_text("#define OQ_TEST_OFFSET 2.0f\n")
    fresh = NativeLibrary("oq_test_hdr", src, bind=_bind_half, include_dirs=(inc,))
    assert fresh.path() != first
    assert fresh.load().oq_test_half(0x3C00) == 3.0
    (inc / "oq_test_extra.h").write_text("#define OQ_TEST_OFFSET 1.0f\n")
    assert NativeLibrary("oq_test_hdr", src, include_dirs=(inc,)).path() == first


def test_toolkit_header_is_in_the_key(monkeypatch, tmp_path):
    """oq_kernels.h is part of every library's key: an edited toolkit header rebuilds all kernels."""
    key = NativeLibrary("x", SOURCE).cache_key()
    inc = tmp_path / "inc"
    inc.mkdir()
    (inc / "oq_kernels.h").write_text(open(os.path.join(native.INCLUDE_DIR, "oq_kernels.h")).read() + "\n/* edited */\n")
    monkeypatch.setattr(native, "INCLUDE_DIR", str(inc))
    assert NativeLibrary("x", SOURCE).cache_key() != key


def test_missing_source_file_is_a_load_failure(tmp_path):
    lib = NativeLibrary("oq_test_missing", tmp_path / "nope.c")
    with pytest.warns(UserWarning, match="nope.c"):
        assert lib.load() is None
    ok, reason = lib.status()
    assert not ok and "FileNotFoundError" in reason and "nope.c" in reason


def test_legacy_helpers_prefix_still_compiles():
    """``C_HELPERS`` (prepended by sources written before oq_kernels.h) now just includes the header."""
    lib = NativeLibrary("oq_test_legacy", native.C_HELPERS + "OQ_INLINE int one(void) { return 1; }\nint oq_test_add(int a, int b) { return a + b + one() - 1; }\n", bind=_bind)
    assert lib.load().oq_test_add(2, 3) == 5


def test_describe_says_what_runs_instead_and_why(monkeypatch):
    from oq_toolkit import native

    lib = native.NativeLibrary("oq_describe_probe", "int probe(void) { return 1; }")
    monkeypatch.setenv("OQ_COMPILE", "0")
    assert lib.describe("kernel", "the reference") == (False, "OQ_COMPILE=0: the reference")
    monkeypatch.setattr(lib, "status", lambda: (False, "unavailable (no cc)"))
    monkeypatch.delenv("OQ_COMPILE")
    assert lib.describe("kernel", "the reference") == (False, "C kernel unavailable (no cc): the reference")
    monkeypatch.setattr(lib, "status", lambda: (True, "compiled (oq_describe_probe)"))
    assert lib.describe("kernel", "the reference") == (True, "kernel")
