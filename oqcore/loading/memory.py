"""Peak resident memory (RSS) of this process over a block of code, in bytes.

On Linux the kernel keeps the high-water mark (``VmHWM`` in ``/proc/self/status``) and lets a
process reset it (writing ``5`` to ``/proc/self/clear_refs``), which measures the true peak with no
sampling. Elsewhere a background thread samples RSS through psutil every 5 ms.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident set size now, in bytes."""
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


class PeakRSS:
    """Context manager: ``baseline`` (RSS at entry) and ``peak`` (max RSS inside), in bytes.

    ``peak - baseline`` is the memory the block added at its worst moment.
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.baseline = 0
        self.peak = 0
        self._hwm = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        self.baseline = current_rss()
        try:
            _CLEAR_REFS.write_text("5")
            self._hwm = _status_kb("VmHWM") is not None
        except OSError:
            self._hwm = False
        if not self._hwm:
            self.peak = self.baseline
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, current_rss())

    def read(self) -> int:
        """The peak so far, in bytes."""
        if self._hwm:
            return max((_status_kb("VmHWM") or 0) * 1024, self.baseline)
        return max(self.peak, current_rss())

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.peak = self.read()

    @property
    def added(self) -> int:
        """Peak minus baseline, in bytes."""
        return max(self.peak - self.baseline, 0)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library's symbols, looked up on first use (never at import) and kept; ``None`` where
    there are none. ``CDLL(None)`` is the running process itself (libc is already mapped in it):
    no file is opened and no ``ldconfig`` is run; the library by name is the fallback."""
    for name in (None, ctypes.util.find_library("c") or "libc.so.6"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


# No allocator setting is changed here. An earlier version set glibc's M_MMAP_THRESHOLD to 1 MiB
# with mallopt for every load (so each large free went straight back to the OS); glibc has no way
# to read that setting back or to return to its default dynamic threshold once it is set, so the
# process kept it after the load. Measured once the staging pool (oqcore.loading.staging) reused
# the high-precision buffers and malloc_trim ran after each layer, it no longer lowered the peak:
# on synthetic Mixtrals of 300 MB and 510 MB (fp8_per_block, mxfp8, fp8_per_tensor, int8
# weight-only), fresh or after a 30 MiB free had raised glibc's threshold, peak resident memory
# with and without it was within 2 MiB (180 vs 182 MiB, 357 vs 357 MiB). So a load leaves the
# allocator's settings exactly as it found them.


def release_free_memory() -> None:
    """Give memory the allocator holds but no tensor uses back to the OS (glibc ``malloc_trim``).

    glibc raises its mmap threshold after large frees (up to 32 MiB), so a layer's freed
    high-precision weights and its quantizer's temporaries can stay in the heap, resident, and a
    streamed load would grow as if it kept them all. Called after each layer is quantized. Changes
    no allocator setting (it only returns free pages); a no-op where glibc is absent.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
