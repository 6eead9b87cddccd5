"""Per-rank time, bytes read and peak memory of a tensor-parallel load at 1, 2 and 4 ranks.

    python bench/parallel_scaling.py [--out DIR] [--ranks 1 2 4] [--configs fp8_per_block fp8_per_tensor mxfp8]

Builds (once, into ``DIR/checkpoints/``) an 818 MiB bf16 Mixtral (``oq make-model mixtral
--hidden-size 1024 --intermediate-size 2048 --layers 8 --experts 8``), warms the page cache, then
runs ``oq quantize --tp N`` under ``torchrun --nproc-per-node N`` (plain ``oq quantize`` for one
rank) for each configuration and prints the table of docs/performance.md's scaling section (rank
0's times; every rank's bytes and peak memory, which agree within 0.5 %). Gloo ranks on the CPU;
results go to ``DIR/parallel_scaling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

MIB = 2**20


def _checkpoint(out: Path) -> Path:
    path = out / "checkpoints" / "mixtral-818m"
    if not (path / "config.json").exists():
        cmd = [sys.executable, "-m", "oqcore.cli", "make-model", "mixtral", str(path), "--hidden-size", "1024",
               "--intermediate-size", "2048", "--layers", "8", "--experts", "8"]
        subprocess.run(cmd, check=True, capture_output=True)
    for f in path.glob("*.safetensors"):  # warm the page cache: the rows compare reads, not the disk
        f.read_bytes()
    return path


def _run(path: Path, ranks: int, config: str, out: Path) -> dict:
    figures = out / f"scaling-{ranks}-{config}.json"
    quantize = ["-m", "oqcore.cli", "quantize", "--model", str(path), "--no-check", "--json", str(figures), config]
    if ranks == 1:
        cmd = [sys.executable, *quantize]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), *quantize, "--tp", str(ranks)]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OQ_DISABLE_TRITON": "1"})
    data = json.loads(figures.read_text())
    rep = data["report"]
    per_rank = data.get("ranks") or [{"seconds": rep["seconds_total"], "peak_added": rep["peak_rss_added"], "model_bytes": rep["model_bytes"],
                                      "bytes_read": sum(f.stat().st_size for f in path.glob("*.safetensors"))}]
    return {
        "ranks": ranks,
        "config": config,
        "build": rep["seconds_build"],
        "read": rep["seconds_read"],
        "quantize": rep["seconds_quantize"],
        "total": max(r["seconds"] for r in per_rank),
        "read_per_rank": per_rank[0]["bytes_read"],
        "peak_per_rank": max(r["peak_added"] for r in per_rank),
        "model_shard": per_rank[0]["model_bytes"],
    }


def main() -> None:
    """Build the checkpoint, run every (ranks, config) load, write the JSON and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--configs", nargs="+", default=["fp8_per_block", "fp8_per_tensor", "mxfp8"])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = _checkpoint(args.out)
    rows = [_run(path, n, c, args.out) for c in args.configs for n in args.ranks]
    (args.out / "parallel_scaling.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| ranks | config | build s | read s | quantize s | total s | read / rank | peak added / rank | model shard |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['ranks']} | {r['config']} | {r['build']:.2f} | {r['read']:.2f} | {r['quantize']:.2f} | {r['total']:.2f} | "
            f"{r['read_per_rank'] / MIB:.0f} MiB | {r['peak_per_rank'] / MIB:.0f} MiB | {r['model_shard'] / MIB:.0f} MiB |"
        )


if __name__ == "__main__":
    main()
