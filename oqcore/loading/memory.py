"""Peak resident memory (RSS) of this process over a block of code, in bytes.

On Linux the kernel keeps the high-water mark (``VmHWM`` in ``/proc/self/status``) and lets a
process reset it (writing ``5`` to ``/proc/self/clear_refs``), which measures the true peak with no
sampling. Elsewhere a background thread samples RSS through psutil every 5 ms.
"""

from __future__ import annotations

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


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_frees_to_os() -> None:
    """Make glibc serve every allocation of 1 MiB or more with its own mmap, so freeing it returns
    the memory to the OS at once.

    glibc's default raises this threshold after each large free (up to 32 MiB), after which a
    streamed load's freed high-precision tensors and quantizer temporaries stay resident in the heap:
    measured on a 300 MB MoE checkpoint, 40-50 MB of peak resident memory with no tensor behind it.
    Setting the threshold is process-wide and stays set (glibc cannot go back to its dynamic
    threshold); the cost is a page fault per fresh page of large temporaries. A no-op without glibc.
    """
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def release_free_memory() -> None:
    """Give memory the allocator holds but no tensor uses back to the OS (glibc ``malloc_trim``).

    glibc raises its mmap threshold after large frees, so a layer's freed high-precision weights
    can stay in the heap, resident, and a streamed load would grow as if it kept them all. Called
    after each layer is quantized; a no-op where glibc is absent.
    """
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
