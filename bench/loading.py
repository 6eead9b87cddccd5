"""Section 2: online load, wall time (seconds) and peak resident memory (bytes), each in a fresh
subprocess (:mod:`bench.load_worker`).

Models: synthetic Mixtral MoE checkpoints (built once with ``oqcore.synthetic.make_tiny_moe`` in a
subprocess and cached under ``<out>/checkpoints``) at several sizes, and the bundled
all-MiniLM-L6-v2. Paths per model: a plain transformers bf16 ``from_pretrained``; the same followed
by torchao ``quantize_`` (int8 and fp8 weight-only, on the layers the oqcore scheme covers); and
``oqcore.load`` for each 8-bit scheme.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import log, not_available

REPO = Path(__file__).resolve().parent.parent
WORKER_TIMEOUT_S = 900


@dataclass(frozen=True)
class MoESize:
    """A synthetic Mixtral: ``layers`` decoder layers of ``experts`` experts, hidden ``hidden``,
    expert intermediate ``intermediate`` (elements). ``approx_bytes`` is its bf16 size."""

    layers: int
    hidden: int = 1024
    intermediate: int = 2048
    experts: int = 8

    @property
    def name(self) -> str:
        """Short label, e.g. ``mixtral L10 H1024 I2048 E8``."""
        return f"mixtral L{self.layers} H{self.hidden} I{self.intermediate} E{self.experts}"

    @property
    def approx_bytes(self) -> int:
        """Approximate checkpoint size in bytes (bf16), from the shapes."""
        h, i, e = self.hidden, self.intermediate, self.experts
        attn = 2 * h * h + 2 * h * (h // 2)  # q, o and k, v with 2 of 4 heads
        return 2 * self.layers * (3 * e * h * i + attn + e * h)


@dataclass(frozen=True)
class Path_:
    """One way to load: ``label`` for tables, ``scheme`` the 8-bit scheme it stands for (``bf16``
    for the plain load) and the worker spec fields."""

    label: str
    scheme: str
    spec: dict[str, Any] = field(default_factory=dict)


def moe_paths(quick: bool, largest: bool) -> list[Path_]:
    """Load paths for the MoE checkpoints. torchao quantizes the fused 3D expert parameters
    through ``FqnToConfig``; for the int8 MoE-only scheme it covers only the experts (as oqcore's
    ``int8_per_channel_weight_only`` does), for fp8 the experts and the linears. Quick mode runs
    every path but oqcore mxfp8 on its largest size, and bf16 + oqcore fp8_per_block on the smaller."""
    paths = [
        Path_("transformers bf16", "bf16", {"method": "bf16"}),
        Path_(
            "bf16 + torchao int8 weight-only",
            "int8",
            {"method": "torchao", "torchao": "int8wo", "torchao_targets": "experts"},
        ),
        Path_(
            "bf16 + torchao fp8 weight-only", "fp8", {"method": "torchao", "torchao": "fp8wo", "torchao_targets": "all"}
        ),
        Path_("oqcore fp8_per_block", "fp8", {"method": "oqcore", "oq_config": "fp8_per_block"}),
        Path_("oqcore mxfp8", "fp8", {"method": "oqcore", "oq_config": "mxfp8"}),
        Path_(
            "oqcore int8_per_channel_weight_only",
            "int8",
            {"method": "oqcore", "oq_config": "int8_per_channel_weight_only"},
        ),
    ]
    if quick and not largest:
        paths = [p for p in paths if p.label in ("transformers bf16", "oqcore fp8_per_block")]
    elif quick:
        paths = [p for p in paths if p.label != "oqcore mxfp8"]
    return paths


def minilm_paths(quick: bool) -> list[Path_]:
    """Load paths for all-MiniLM-L6-v2 (a BERT encoder: linears only)."""
    int8_linear = {"linear": {"weight": "int8_per_channel_static", "activation": None}}
    paths = [
        Path_("transformers bf16", "bf16", {"method": "bf16", "auto": "model"}),
        Path_(
            "bf16 + torchao int8 weight-only",
            "int8",
            {"method": "torchao", "auto": "model", "torchao": "int8wo", "torchao_targets": "linears"},
        ),
        Path_(
            "bf16 + torchao fp8 weight-only",
            "fp8",
            {"method": "torchao", "auto": "model", "torchao": "fp8wo", "torchao_targets": "linears"},
        ),
        Path_("oqcore fp8_per_block", "fp8", {"method": "oqcore", "oq_config": "fp8_per_block"}),
        Path_("oqcore mxfp8", "fp8", {"method": "oqcore", "oq_config": "mxfp8"}),
        Path_("oqcore int8 linear (weight-only)", "int8", {"method": "oqcore", "oq_config": int8_linear}),
    ]
    if quick:
        paths = [p for p in paths if p.label in ("transformers bf16", "oqcore int8 linear (weight-only)")]
    return paths


def worker_env() -> dict[str, str]:
    """Environment of a worker: the repo importable, ``TRITON_INTERPRET=0``, quiet transformers."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["TRITON_INTERPRET"] = "0"
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_worker(module: str, arg: str, timeout_s: float = WORKER_TIMEOUT_S) -> dict[str, Any]:
    """Run ``python -m <module> <arg>`` and parse the JSON after the result marker. On failure the
    dict holds ``error`` (the worker's exception, or its stderr tail)."""
    from bench.load_worker import RESULT_MARK

    try:
        p = subprocess.run(
            [sys.executable, "-m", module, arg],
            check=False,
            cwd=REPO,
            env=worker_env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in p.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    tail = " | ".join(p.stderr.strip().splitlines()[-3:])
    return {"error": f"worker exited {p.returncode}: {tail}"}


def ensure_moe_checkpoint(size: MoESize, root: Path) -> Path:
    """The cached checkpoint for ``size`` under ``root``, built in a subprocess if missing
    (a partial folder from an interrupted build is rebuilt)."""
    folder = root / size.name.replace(" ", "_")
    done = folder / ".complete"
    if done.exists():
        return folder
    log(f"building checkpoint {size.name} (~{size.approx_bytes / 1e9:.2f} GB) in {folder}")
    code = (
        "import sys, torch; from oqcore.synthetic import make_tiny_moe; "
        f"make_tiny_moe('mixtral', sys.argv[1], hidden_size={size.hidden}, intermediate_size={size.intermediate}, "
        f"num_layers={size.layers}, num_experts={size.experts})"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(folder)], cwd=REPO, env=worker_env(), check=True, capture_output=True
    )
    done.write_text("ok\n")
    return folder


def checkpoint_bytes(folder: Path) -> int:
    """Bytes of the ``*.safetensors`` files in ``folder``."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def warm_page_cache(folder: Path) -> None:
    """Read every file once so that each measured path reads from the page cache alike."""
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def repeats_for(p: Path_, quick: bool, judged: bool = True) -> int:
    """Fresh-process loads per path: 3 (quick: 2, and 1 on a size no target is judged on), the
    torchao paths once (they take 5-8x longer, and the figure that matters for them, peak memory,
    does not depend on luck)."""
    if p.spec.get("method") == "torchao" or (quick and not judged):
        return 1
    return 2 if quick else 3


def measure_model(
    model: str,
    folder: Path,
    paths: list[Path_],
    size_bytes: int,
    keep_timeline: bool,
    quick: bool = False,
    judged: bool = True,
) -> list[dict[str, Any]]:
    """One row per load path for one checkpoint; ``timeline`` is kept only when ``keep_timeline``.

    Each path loads :func:`repeats_for` times, rounds interleaved across paths, the page cache
    warmed before every load (this VM's DAMON reclaims file pages unused for ~30 s, so without it
    later loads would read from disk). The row keeps the fastest load's figures (``wall_s``, stages,
    timeline), ``wall_runs`` (every wall time, seconds) and the largest ``peak_added`` of all runs.
    """
    runs: dict[str, list[dict[str, Any]]] = {p.label: [] for p in paths}
    for rnd in range(max(repeats_for(p, quick, judged) for p in paths)):
        for p in paths:
            if rnd >= repeats_for(p, quick, judged) or (runs[p.label] and "error" in runs[p.label][-1]):
                continue
            log(f"load {model}: {p.label} (run {rnd + 1})")
            warm_page_cache(folder)
            spec = {"path": str(folder), "sample_s": 0.01, **p.spec}
            runs[p.label].append(run_worker("bench.load_worker", json.dumps(spec)))
    rows = []
    for p in paths:
        row = {"model": model, "checkpoint_bytes": size_bytes, "path": p.label, "scheme": p.scheme}
        good = [r for r in runs[p.label] if "error" not in r]
        if not good:
            row["status"] = not_available(runs[p.label][-1]["error"])
        else:
            best = dict(min(good, key=lambda r: r["wall_s"]))
            best["wall_runs"] = [r["wall_s"] for r in good]
            for k in ("peak_added", "peak_rss"):
                best[k] = max(r[k] for r in good)
            if not keep_timeline:
                best.pop("timeline", None)
            row["status"] = "ok"
            row.update(best)
        rows.append(row)
    return rows


def sizes(quick: bool) -> list[MoESize]:
    """MoE sizes: quick 2 small ones (~0.1 and ~0.2 GB), full 4 up to ~1.07 GB."""
    return [MoESize(1), MoESize(2)] if quick else [MoESize(1), MoESize(2), MoESize(5), MoESize(10)]


def run(out: Path, quick: bool) -> list[dict[str, Any]]:
    """All rows of section 2: per model and path ``wall_s``, ``peak_rss``, ``peak_added``,
    ``baseline_rss``, ``model_bytes`` (bytes), ``checkpoint_bytes``; the largest MoE size keeps
    its RSS ``timeline``."""
    rows: list[dict[str, Any]] = []
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    all_sizes = sizes(quick)
    for size in all_sizes:
        try:
            folder = ensure_moe_checkpoint(size, root)
        except Exception as e:
            rows.append({"model": size.name, "path": "(build)", "scheme": "-", "status": not_available(e)})
            continue
        largest = size == all_sizes[-1]
        rows += measure_model(
            size.name,
            folder,
            moe_paths(quick, largest),
            checkpoint_bytes(folder),
            keep_timeline=largest,
            quick=quick,
            judged=largest,  # the targets use the largest MoE size
        )
    try:
        from oqcore.loading import bundled_model_dir

        folder = bundled_model_dir()
    except Exception as e:
        rows.append({"model": "all-MiniLM-L6-v2", "path": "(locate)", "scheme": "-", "status": not_available(e)})
        return rows
    rows += measure_model(
        "all-MiniLM-L6-v2", folder, minilm_paths(quick), checkpoint_bytes(folder), keep_timeline=False, quick=quick
    )
    return rows
