"""oqcore's benchmark suite: quantizer throughput, online loading (time and peak memory), CPU
forwards (every weight x activation the planner offers, against bf16) and MiniLM end to end,
against the peers (vLLM's and compressed-tensors' eager formulas, torchao, transformers), plus the
targets of issues 13 and 5 as ratios measured in the same run.

Run from the repository root of a source checkout (the suite is not installed):
``python -m bench [--quick] [--out DIR] [--only SECTION ...]``. Modules: :mod:`bench.quantizers`,
:mod:`bench.loading` (+ :mod:`bench.load_worker`, one fresh process per load), :mod:`bench.forward`,
:mod:`bench.minilm`, :mod:`bench.targets`, :mod:`bench.report`, :mod:`bench.plots`,
:mod:`bench.cli`. Not run by the test suite (``tests/test_bench_targets.py`` checks its
bookkeeping: paired timing, the planner matrix, the target verdicts).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run the suite with command-line arguments ``argv``; returns the exit code."""
    from bench.cli import main as _main

    return _main(argv)


__all__ = ["main"]
