"""Shared helpers of the benchmark suite: timing, machine description, optional imports.

Units everywhere in this package: seconds (``*_s``), bytes (``*_bytes`` / RSS figures), GB/s with
GB = 1e9 bytes, MiB = 2**20 bytes in human-readable tables.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

GB = 1e9
MIB = 2**20


@dataclass(frozen=True)
class Budget:
    """How long each timed measurement runs: at least ``min_reps`` timed calls and at least
    ``min_time_s`` seconds of timed calls (after ``warmup`` untimed calls), at most ``max_reps``."""

    min_time_s: float
    min_reps: int
    max_reps: int = 2000
    warmup: int = 1


QUICK = Budget(min_time_s=0.2, min_reps=1)
FULL = Budget(min_time_s=1.0, min_reps=5)
FORWARD_FULL = Budget(min_time_s=0.5, min_reps=5)
"""The forward sections' full-mode budget: each of their ~250 figures is a paired best-of (the
variant and bf16 alternately, :func:`measure_pair`), so half the time per figure of :data:`FULL`
keeps the full run within ~15 minutes."""


def measure(fn: Callable[[], Any], budget: Budget) -> dict[str, float]:
    """Time ``fn()`` under ``budget``. Returns ``median_s``, ``min_s`` (seconds per call) and ``reps``.

    The warm-up calls are timed too (``warmup_s``, the first one): when a single call already takes
    longer than the budget, ``min_reps`` timed calls are all that run.
    """
    t = time.perf_counter()
    fn()
    warm = time.perf_counter() - t
    for _ in range(budget.warmup - 1):
        fn()
    reps = max(budget.min_reps, min(budget.max_reps, math.ceil(budget.min_time_s / max(warm, 1e-6))))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "reps": reps, "warmup_s": warm}


def measure_pair(
    fn: Callable[[], Any],
    ref: Callable[[], Any],
    budget: Budget,
    min_reps: int = 2,
    slow_s: float = 0.25,
    far_ratio: float = 4.0,
    block_s: float = 0.01,
    max_block: int = 5,
) -> tuple[dict[str, float], dict[str, float]]:
    """Time ``fn()`` and a reference ``ref()`` in alternating blocks (``fn ref | ref x k, fn x k |
    fn x k, ref x k | ...``), so both see the same machine: on a shared VM the cores and memory
    bandwidth a call gets drift by 2-10x within seconds, and a ratio of two figures taken apart
    carries that drift. Within a block the calls repeat back to back, as a layer's calls do
    (alternating every single call measured bf16 up to ~1.5x slower at batch 1 than back to
    back). Returns ``(stats of fn, stats of ref)`` as :func:`measure` does (``median_s``,
    ``min_s``, ``reps``, ``warmup_s``: seconds per call; ``warmup_s`` is the first call, which may
    build a kernel, and is never one of the timed calls).

    Sizes come from the first timed pair, not from the warm-up: blocks of ``k`` calls, ``k`` the
    number of calls of the slower of the two in ``block_s`` seconds, between 2 and ``max_block``;
    at least ``max(budget.min_reps, min_reps)`` timed calls of each and ``budget.min_time_s`` of
    both together, at most about ``budget.max_reps``. A ``fn`` far from its reference (over
    ``slow_s`` seconds a call and over ``far_ratio`` times ``ref``) is timed once (the first pair):
    more calls would not change a verdict, and such rows would otherwise dominate the run's time."""
    warm = []
    for f in (fn, ref):
        t = time.perf_counter()
        f()
        warm.append(time.perf_counter() - t)
    for _ in range(budget.warmup - 1):
        fn()
        ref()
    times: tuple[list[float], list[float]] = ([], [])

    def timed(j: int, f: Callable[[], Any], k: int) -> None:
        """``k`` back-to-back timed calls of ``f`` into ``times[j]``."""
        for _ in range(k):
            t = time.perf_counter()
            f()
            times[j].append(time.perf_counter() - t)

    timed(0, fn, 1)
    timed(1, ref, 1)
    mine, base = times[0][0], times[1][0]
    if not (mine > slow_s and mine > far_ratio * base):
        k = max(2, min(max_block, math.ceil(block_s / max(mine, base, 1e-6))))
        floor = max(budget.min_reps, min_reps) - 1
        want = min(budget.max_reps, math.ceil(budget.min_time_s / max(mine + base, 1e-6)))
        rounds = max(1, math.ceil(floor / k), math.ceil(want / k))
        for r in range(rounds):
            order = ((1, ref), (0, fn)) if r % 2 == 0 else ((0, fn), (1, ref))
            for j, f in order:
                timed(j, f, k)
    return tuple(  # type: ignore[return-value]
        {"median_s": statistics.median(ts), "min_s": min(ts), "reps": len(ts), "warmup_s": w}
        for ts, w in zip(times, warm)
    )


def not_available(exc: BaseException | str) -> str:
    """The status string of a measurement that could not run: ``"not available: <reason>"``."""
    reason = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    reason = " ".join(str(reason).split())
    return f"not available: {reason[:300]}"


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (or ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
"""CPU features the forwards depend on (``/proc/cpuinfo`` flag names): bf16 ``F.linear`` runs on
AMX tiles where ``amx_bf16`` is present, which moves the bf16 baseline a lot."""


def cpu_flags() -> list[str]:
    """Which of :data:`ISA_FLAGS` the CPU reports (``/proc/cpuinfo``; empty when unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [x for x in ISA_FLAGS if x in have]
    except OSError:
        pass
    return []


def l3_cache() -> str | None:
    """The L3 cache size as sysfs names it (``"480M"``...), or ``None``."""
    import glob

    for d in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(f"{d}/level") as f:
                if f.read().strip() != "3":
                    continue
            with open(f"{d}/size") as f:
                return f.read().strip()
        except OSError:
            continue
    return None


def total_memory_bytes() -> int | None:
    """``MemTotal`` from ``/proc/meminfo``, in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def versions() -> dict[str, str]:
    """Versions of the libraries the suite compares (``"not installed"`` when missing)."""
    import importlib.metadata as md

    out = {}
    for dist in ("torch", "oqcore", "torchao", "compressed-tensors", "transformers", "triton", "matplotlib"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def machine() -> dict[str, Any]:
    """Where the run happened: CPU model, logical cores, torch threads, memory (bytes), Python, versions."""
    import torch

    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": total_memory_bytes(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
        "cpu_flags": cpu_flags(),
        "l3_cache": l3_cache(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "versions": versions(),
    }


def gbps(nbytes: int, seconds: float) -> float:
    """Throughput in GB/s (1e9 bytes per second)."""
    return nbytes / seconds / GB if seconds > 0 else float("nan")


_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress line on stderr with seconds since import (results go to files, not stdout)."""
    import sys

    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)
