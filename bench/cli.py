"""``python -m bench [--quick] [--out DIR] [--only SECTION ...]``: run the suite, write
``results.json``, ``results.md`` and PNG plots into ``--out`` (default ``bench/results``)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import Any

from bench.common import FORWARD_FULL, FULL, QUICK, log, machine

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
SECTIONS = ("quantizers", "loading", "forward", "moe", "minilm")


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The suite's command line (``--quick``, ``--out``, ``--only``, ``--render-only``)."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller and fewer measurements (under 4 minutes on 2 cores)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: bench/results)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections (targets use what ran)")
    p.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: rebuild results.md, the targets and the plots from --out/results.json",
    )
    return p.parse_args(argv)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def write(results: dict[str, Any], out: Path) -> None:
    """Write ``results.json`` and ``results.md`` (called after every section: partial runs keep
    what they measured)."""
    from bench.report import markdown

    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "results.md").write_text(markdown(results) + "\n")


def render(out: Path) -> int:
    """Recompute targets, plots and ``results.md`` from an existing ``results.json``."""
    from bench import plots, targets

    path = out / "results.json"
    if not path.is_file():
        log(f"no {path} to render")
        return 2
    results = json.loads(path.read_text())
    results["targets"] = targets.run(results)
    results["plots"] = plots.write_all(results, out)
    write(results, out)
    log(f"rendered {out / 'results.md'}")
    return 0


def _sections(budget, out: Path, quick: bool):
    """``(section name, results key, thunk)`` in run order; modules are imported when run."""
    fwd = budget if quick else FORWARD_FULL

    def quantizers():
        """Run the quantizer throughput section."""
        from bench import quantizers

        return quantizers.run(budget, quick=quick)

    def loading():
        """Run the online loads section."""
        from bench import loading

        return loading.run(out, quick)

    def linear():
        """Run the linear forwards section."""
        from bench import forward

        return forward.run_linear(fwd, forward.QUICK_BATCHES if quick else forward.BATCHES, quick=quick)

    def moe():
        """Run the MoE forwards section."""
        from bench import forward

        return forward.run_moe(fwd, forward.QUICK_MOE_TOKENS if quick else forward.MOE_TOKENS, quick=quick)

    def minilm():
        """Run the MiniLM end-to-end section."""
        from bench import minilm

        return minilm.run(fwd, quick=quick)

    return [
        ("quantizers", "quantizers", quantizers),
        ("loading", "loading", loading),
        ("forward", "forward_linear", linear),
        ("moe", "forward_moe", moe),
        ("minilm", "minilm", minilm),
    ]


def plugin_status() -> list[dict[str, Any]]:
    """The oqcore plugins this process loaded (name, distribution, version, status, error): a
    plugin that failed takes its schemes out of the forward matrix and its targets, and
    ``results.md`` says so instead of silently showing fewer rows."""
    try:
        import oqcore

        return [
            {k: getattr(rec, k, None) for k in ("name", "distribution", "version", "status", "error")}
            for rec in oqcore.get_plugin_manager().plugin_records()
        ]
    except Exception as e:  # the report says it could not tell
        return [{"name": "?", "status": "unknown", "error": f"{type(e).__name__}: {e}"}]


def main(argv: list[str] | None = None) -> int:
    """Run the suite; returns the process exit code (0, also when targets are missed: they are
    findings, reported in the files)."""
    os.environ.setdefault("TRITON_INTERPRET", "0")
    args = parse(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        return render(out)
    sections = set(args.only or SECTIONS)
    budget = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    previous: dict[str, Any] = {}
    if args.only and (out / "results.json").is_file():
        # re-running some sections: the others' results stay (the file records which were re-run)
        previous = json.loads((out / "results.json").read_text())
        previous.setdefault("rerun", []).append({"sections": sorted(sections), "started": dt.datetime.now().isoformat(timespec="seconds")})
    results: dict[str, Any] = previous | {
        "mode": previous.get("mode") or ("quick" if args.quick else "full"),
        "started": previous.get("started") or dt.datetime.now().isoformat(timespec="seconds"),
        "loadavg_start": _loadavg(),
        "machine": machine(),
        "units": {"*_s": "seconds", "*_bytes / *_rss / peak_added": "bytes", "gbps": "GB/s (1e9 bytes/s) of bf16 read"},
    }
    import torch

    torch.manual_seed(0)
    results["section_seconds"] = previous.get("section_seconds", {})
    for name, key, fn in _sections(budget, out, args.quick):
        if name not in sections:
            continue
        t = time.perf_counter()
        log(f"section {name}")
        results[key] = fn()
        results["section_seconds"][name] = time.perf_counter() - t
        write(results, out)
    from bench import plots, targets

    results["plugins"] = plugin_status()
    results["targets"] = targets.run(results)
    results["seconds"] = time.perf_counter() - t0
    results["loadavg_end"] = _loadavg()
    results["plots"] = plots.write_all(results, out)
    write(results, out)
    log(f"done in {results['seconds']:.0f} s: {out / 'results.md'}")
    return 0
