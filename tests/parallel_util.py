"""Spawn gloo ranks on the CPU for the parallel tests, and the test-side view of a rank's piece.

:func:`run_ranks` starts ``world`` fresh Python processes (``parallel_worker.py``), each one rank
of a gloo group on a file store, runs every case on every rank and returns each case's per-rank
results. :func:`expected_piece` cuts a tensor of the unsharded result the way the test expects
(independently of oqcore's own cutting code): along the cut weight dim, a tensor with one entry
is replicated (a per-tensor scale, a per-channel scale of a row-split weight), any other is cut
at the weight's boundaries divided by its group size along that dim (a 128x128 scale grid, packed
nibbles, e8m0 1x32 scales).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("parallel_worker.py")


def run_ranks(world: int, cases: list[dict], tmp: Path, timeout: float = 900) -> dict[str, list[dict]]:
    """Run ``cases`` on ``world`` gloo ranks; ``{case id: [rank 0 result, rank 1 result, ...]}``.
    Raises ``AssertionError`` with the ranks' stderr when a rank exits non-zero or the group hangs
    past ``timeout`` seconds (a collective some rank never joined)."""
    tmp.mkdir(parents=True, exist_ok=True)
    job = {"world": world, "store": str(tmp / "store"), "out": str(tmp), "cases": cases}
    (tmp / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "OQ_DISABLE_TRITON": "1", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), str(tmp / "job.json"), str(r)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(world)
    ]
    errs = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            errs.append(err)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise AssertionError(f"{world} ranks did not finish in {timeout} s (a hung collective?)") from None
    bad = [(r, p.returncode, e[-3000:]) for r, (p, e) in enumerate(zip(procs, errs)) if p.returncode]
    assert not bad, f"rank(s) failed: {bad}"
    return {c["id"]: [torch.load(tmp / f"{c['id']}.rank{r}.pt", weights_only=False) for r in range(world)] for c in cases}


def expected_piece(full: torch.Tensor, weight_shape: tuple[int, ...], cut: tuple) -> torch.Tensor:
    """The piece of ``full`` (one tensor of a quantized weight of logical ``weight_shape``) that a
    rank holding the weight's index ``ranges`` along ``dim`` must hold (see the module docstring)."""
    dim, ranges, n = cut
    d = dim
    if full.dim() < len(weight_shape):
        # per tensor ([1]) or per expert ([E], [E, 1]): cut only with the experts
        if not (dim == 0 and len(weight_shape) == 3 and full.shape[0] == weight_shape[0]):
            return full
    elif full.shape[d] == 1:
        return full
    size = full.shape[d]
    parts = []
    for a, b in ranges:
        lo, hi = a * size // n, -(-b * size // n)
        parts.append(full.narrow(d, lo, hi - lo))
    return torch.cat(parts, dim=d)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as raw bytes (so fp8 / e8m0 / -0.0 / NaN compare bit for bit)."""
    return t.contiguous().view(torch.uint8)
