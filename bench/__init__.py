"""oqcore's benchmark suite: quantizer throughput, online loading (time and peak memory) and CPU
forwards, against the peers (vLLM's and compressed-tensors' eager formulas, torchao, transformers),
plus the targets of issue 5 as ratios measured in the same run.

Run from the repository root of a source checkout (the suite is not installed):
``python -m bench [--quick] [--out DIR]``. Modules: :mod:`bench.quantizers`, :mod:`bench.loading` (+ :mod:`bench.load_worker`, one fresh
process per load), :mod:`bench.forward`, :mod:`bench.targets`, :mod:`bench.report`,
:mod:`bench.plots`, :mod:`bench.cli`. Never part of the test suite.
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run the suite with command-line arguments ``argv``; returns the exit code."""
    from bench.cli import main as _main

    return _main(argv)


__all__ = ["main"]
