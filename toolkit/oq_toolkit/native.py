"""Small native C kernels for plugins: compile once per machine, cache, load through ctypes.

A plugin that ships a C kernel keeps its source as a file in its package (package data) and
describes it with a :class:`NativeLibrary`; it calls :meth:`NativeLibrary.load` when it first
needs it::

    from importlib.resources import files

    LIB = NativeLibrary("oq_myscheme_cpu", files("oq_plugin_myscheme") / "csrc" / "myscheme_cpu.c",
                        bind=_declare_argtypes)
    lib = LIB.load()            # ctypes.CDLL, or None -> run the eager torch path
    ok, reason = LIB.status()   # for backend reasons and reports

A source includes the shared helpers with ``#include "oq_kernels.h"`` (:data:`INCLUDE_DIR`, always
on the include path: exact fp16/bf16 -> float32 loads, AVX-512 masked loads, prefetch, the
``OQ_AVX512`` switch) and any header of its own ``include_dirs``.

The source is compiled with the system C compiler (``$CC``, default ``cc``; ``-O3 -march=native
-fopenmp -shared -fPIC``, ``-I`` per include directory, plus ``extra_flags``) into
``$OQ_CPU_KERNEL_CACHE/cpu_kernels`` (default ``~/.cache/oqcore/cpu_kernels``). The file name
carries a hash of the source, every header (``*.h``) in the include directories, the compiler,
the flags and the CPU's feature flags, so an edited kernel or header, another compiler or another
CPU (``-march=native`` code is only valid where every feature it used exists) gets its own build
and a cached library is never stale. ``OQ_COMPILE=0`` disables compiling and loading (``load()``
returns ``None``).

Failures (no compiler, compile error, missing source file, read-only cache, ...) are not errors:
``load()`` returns ``None``, :meth:`NativeLibrary.status` gives the reason, and one warning is
issued per library so the caller's eager fallback is not silent. Nothing here knows what the
kernels compute.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Protocol, Union

BASE_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
"""Always passed to the compiler. No ``-ffast-math``: linking it would set flush-to-zero for the
whole process, and bit-exact kernels need IEEE division and rounding."""

_STDERR_TAIL = 2000
"""Characters of compiler output kept in a failure reason (the end is where the errors are)."""

INCLUDE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")
"""The toolkit's C headers (``oq_kernels.h``): first on every :class:`NativeLibrary`'s include path."""

C_HELPERS = '#include "oq_kernels.h"\n'
"""Kept for sources written before ``oq_kernels.h``: prepending it to a source includes the shared
helpers (``OQ_INLINE``, the exact ``half_to_f32``, ``load1``, ...). New sources include the header."""


class _Readable(Protocol):
    """Anything with ``read_text`` (an ``importlib.resources`` traversable)."""

    def read_text(self, encoding: str | None = ...) -> str:
        """The file's text."""
        ...


Source = Union[str, "os.PathLike[str]", _Readable]
"""A C translation unit: its text (``str``), or a file holding it (a path, or an
``importlib.resources`` file such as ``files("pkg") / "csrc" / "k.c"``), read on first use."""


SMALL_WORK = 1 << 16
"""Elements below which a streaming kernel runs on one thread (:func:`threads_for`)."""


def threads_for(numel: int) -> int:
    """OpenMP threads for a streaming pass over ``numel`` elements: ``torch.get_num_threads()``, or 1
    below :data:`SMALL_WORK` (64 Ki elements, ~30 us on one thread). A parallel region's fork/join
    costs a few microseconds when both cores are idle, but on a shared machine a descheduled worker
    stalls the region for a scheduler tick (4 ms measured here), which per-token activation
    quantizers, called once per layer per forward, cannot afford."""
    import torch

    return 1 if numel < SMALL_WORK else torch.get_num_threads()


def compile_disabled() -> bool:
    """``True`` when ``OQ_COMPILE=0`` is set (checked on every call: tests and users may flip it)."""
    return os.environ.get("OQ_COMPILE", "1") == "0"


def cache_dir() -> str:
    """Directory of compiled libraries: ``$OQ_CPU_KERNEL_CACHE/cpu_kernels`` or ``~/.cache/oqcore/cpu_kernels``."""
    base = os.environ.get("OQ_CPU_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "oqcore")
    return os.path.join(base, "cpu_kernels")


def cpu_identity() -> str:
    """The CPU's feature flags: ``-march=native`` code is only valid on a CPU that has them all, so
    they are part of the cache key (a home directory may outlive or travel between machines)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return os.uname().machine


def headers_of(include_dirs: Sequence[str]) -> list[tuple[str, str]]:
    """``(name, text)`` of every ``*.h`` file under each directory (recursively, sorted; ``name`` is
    ``"<dir index>/<path relative to the dir>"``): what a build may include, for the cache key."""
    out = []
    for i, d in enumerate(include_dirs):
        found = []
        for root, dirs, files in os.walk(d):
            dirs.sort()
            for f in files:
                if f.endswith(".h"):
                    path = os.path.join(root, f)
                    found.append((f"{i}/{os.path.relpath(path, d)}", path))
        for name, path in sorted(found):
            with open(path, encoding="utf-8") as fh:
                out.append((name, fh.read()))
    return out


def compile_shared(
    c_source: str,
    path: str,
    cc: str = "cc",
    extra_flags: Sequence[str] = (),
    stem: str = "kernel",
    include_dirs: Sequence[str] = (INCLUDE_DIR,),
) -> None:
    """Compile ``c_source`` (the text) into the shared library ``path``, with ``-I`` for each of
    ``include_dirs`` (default: the toolkit's headers); raises ``RuntimeError`` with the command and
    the compiler's output on failure.

    The library is written next to ``path`` under a unique name and renamed into place, so a
    concurrent process never loads a half-written file (``os.replace`` is atomic within a
    directory, which a temporary directory elsewhere would not guarantee).
    """
    out_dir = os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, f"{stem}.c")
        with open(src, "w") as f:
            f.write(c_source)
        fd, tmp_out = tempfile.mkstemp(prefix=f".{stem}-", suffix=".so.tmp", dir=out_dir)
        os.close(fd)
        try:
            includes = [f"-I{d}" for d in include_dirs]
            cmd = [cc, *BASE_FLAGS, *includes, *extra_flags, src, "-o", tmp_out]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()[-_STDERR_TAIL:]}")
            os.replace(tmp_out, path)
        finally:
            if os.path.exists(tmp_out):
                os.unlink(tmp_out)


class NativeLibrary:
    """One C source compiled on first use into a cached shared library and loaded with ctypes.

    - ``name``: file-name stem of the cached library (e.g. ``"oq_fp8_cpu"``) and label in messages.
    - ``c_source``: the complete C translation unit: its text, or the file holding it (a path or
      an ``importlib.resources`` file, e.g. ``files("oq_plugin_fp8") / "csrc" / "fp8_cpu.c"``;
      read once, on first use, so constructing a library at import time costs nothing).
    - ``extra_flags``: compiler flags after :data:`BASE_FLAGS` (part of the cache key).
    - ``bind``: called once with the freshly loaded ``ctypes.CDLL`` to declare ``argtypes`` /
      ``restype``; an exception there counts as a load failure.
    - ``include_dirs``: header directories after :data:`INCLUDE_DIR` (paths, or
      ``importlib.resources`` directories on the file system), e.g. another plugin's ``csrc``;
      every ``*.h`` in them is part of the cache key.

    Thread-safe: the first ``load()`` compiles under a lock, later calls return the cached result.
    A failure is remembered (no retry per call); ``OQ_COMPILE=0`` is honoured on every call.
    """

    def __init__(
        self,
        name: str,
        c_source: Source,
        extra_flags: Sequence[str] = (),
        bind: Callable[[ctypes.CDLL], None] | None = None,
        include_dirs: Sequence[str | os.PathLike[str]] = (),
    ) -> None:
        self.name = name
        self._source = c_source
        self._text: str | None = c_source if isinstance(c_source, str) else None
        self.extra_flags = tuple(extra_flags)
        self._include_dirs = tuple(include_dirs)
        self.bind = bind
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._error: str | None = None

    @property
    def include_dirs(self) -> tuple[str, ...]:
        """:data:`INCLUDE_DIR`, then the ``include_dirs`` given, as file-system paths (``TypeError``
        for a directory that is not on the file system, e.g. inside a zip: a load failure)."""
        return (INCLUDE_DIR, *(os.fspath(d) for d in self._include_dirs))

    @property
    def c_source(self) -> str:
        """The C source text (read from its file on first access; raises ``OSError`` if missing)."""
        if self._text is None:
            src = self._source
            if hasattr(src, "read_text"):
                self._text = src.read_text(encoding="utf-8")
            else:
                with open(os.fspath(src), encoding="utf-8") as f:
                    self._text = f.read()
        return self._text

    def cache_key(self, cc: str | None = None) -> str:
        """Hash of everything the compiled code depends on: source, headers, compiler, flags, CPU."""
        cc = cc or os.environ.get("CC", "cc")
        headers = [part for h in headers_of(self.include_dirs) for part in h]
        ident = "\0".join((self.c_source, *headers, cc, *BASE_FLAGS, *self.extra_flags, os.uname().machine, cpu_identity()))
        return hashlib.sha256(ident.encode()).hexdigest()[:16]

    def path(self, cc: str | None = None) -> str:
        """Where the compiled library for the current compiler and CPU lives (may not exist yet)."""
        return os.path.join(cache_dir(), f"{self.name}_{self.cache_key(cc)}.so")

    def build(self, path: str, cc: str | None = None, extra_flags: Sequence[str] | None = None) -> None:
        """Compile this source to ``path`` unconditionally (no cache, no binding): for tests that
        want a variant build, e.g. ``extra_flags=("-DOQ_GENERIC",)``. Raises on failure."""
        flags = self.extra_flags if extra_flags is None else tuple(extra_flags)
        compile_shared(self.c_source, path, cc or os.environ.get("CC", "cc"), flags, stem=self.name, include_dirs=self.include_dirs)

    def load(self) -> ctypes.CDLL | None:
        """The loaded library, compiling it into the cache first if needed; ``None`` when
        ``OQ_COMPILE=0`` is set or building/loading failed (see :meth:`status`)."""
        if compile_disabled():
            return None
        if self._lib is not None or self._error is not None:
            return self._lib
        with self._lock:
            if self._lib is not None or self._error is not None:
                return self._lib
            cc = os.environ.get("CC", "cc")
            try:
                path = self.path(cc)
                if not os.path.exists(path):
                    compile_shared(self.c_source, path, cc, self.extra_flags, stem=self.name, include_dirs=self.include_dirs)
                lib = ctypes.CDLL(path)
                if self.bind is not None:
                    self.bind(lib)
            except Exception as e:  # no compiler, read-only home, ...: callers fall back to eager torch
                self._error = f"{type(e).__name__}: {e}"
                warnings.warn(f"oqcore native library {self.name} unavailable, using the eager fallback: {self._error}", stacklevel=2)
                return None
            self._lib = lib
            return lib

    def status(self) -> tuple[bool, str]:
        """``(available, reason)``: loads (compiles) if needed; the reason names ``OQ_COMPILE=0``
        or carries the build/load error."""
        if compile_disabled():
            return False, "OQ_COMPILE=0"
        if self.load() is not None:
            return True, f"compiled ({self.name})"
        return False, f"unavailable ({self._error})"

    def describe(self, available: str, fallback: str) -> tuple[bool, str]:
        """``(available, text)`` for a backend's reason or a report: ``available`` when the library
        loads, else what runs instead (``fallback``) and why (``OQ_COMPILE=0``, or the build or load
        error). Loads (compiles) if needed."""
        ok, reason = self.status()
        if ok:
            return True, available
        if compile_disabled():
            return False, f"OQ_COMPILE=0: {fallback}"
        return False, f"C kernel {reason}: {fallback}"

    def reset(self) -> None:
        """Forget the loaded library and any remembered failure (the next ``load()`` retries)."""
        with self._lock:
            self._lib = None
            self._error = None
