"""Section 4: the targets of issue 5, as ratios of figures measured in the same run.

Ratios use ``min_s`` (the fastest of the timed repetitions): on a shared machine other processes
only ever add time, so the minimum is the least disturbed estimate; medians are in the tables.
Every row: ``target``, ``what`` (the two figures compared), ``measured`` (the ratio), ``goal``,
``op`` (``>=`` or ``<=``), ``met`` (bool, or ``None`` when a figure is missing) and ``verdict``.
"""

from __future__ import annotations

import math
from typing import Any

QUANT_SPEEDUP = 20.0
QUANT_COPY_FRACTION = 0.4
LOAD_PEAK_RATIO = 0.6
LOAD_TIME_RATIO = 1.3
INT8_SPEEDUP = 3.0
FP8_SPEEDUP = 0.8

REFERENCE_IMPL = "oqcore torch"
"""The eager torch reference (the formulas that define the bytes, as vLLM and compressed-tensors
write them): the quantizer target is measured against it."""
PEER_EAGER_IMPLS = ("vllm eager", "compressed-tensors", "torchao to_mx")


def verdict(measured: float | None, goal: float, op: str) -> tuple[bool | None, str]:
    """``(met, text)``: met with its margin, or missed with how far off (share of the goal reached
    and the factor still needed)."""
    if measured is None or math.isnan(measured):
        return None, "not measured"
    if op == ">=":
        if measured >= goal:
            return True, f"met ({measured / goal:.2f}x the goal)"
        return False, f"missed: {measured / goal:.0%} of the goal, needs {goal / measured:.3g}x more"
    if measured <= goal:
        return True, f"met ({goal / measured:.2f}x under the limit)" if measured > 0 else "met"
    return False, f"missed: {measured / goal:.2f}x the limit, needs {measured / goal:.3g}x less"


def _row(target: str, what: str, measured: float | None, goal: float, op: str) -> dict[str, Any]:
    met, text = verdict(measured, goal, op)
    return {"target": target, "what": what, "measured": measured, "goal": goal, "op": op, "met": met, "verdict": text}


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok"]


def quantizer_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (shape, key): the fastest oqcore backend against the eager torch reference (the target),
    against the fastest peer's own eager code (reported beside it, ``info``: vLLM quantizes an
    expert stack expert by expert, each slice cache-resident, which no whole-tensor formula is),
    and against bf16 ``copy_`` of the same tensor."""
    out = []
    ok = _ok(rows)
    for shape in dict.fromkeys(r["shape"] for r in rows):
        copy = [r for r in ok if r["shape"] == shape and r["impl"] == "bf16 copy_"]
        for key in dict.fromkeys(r["key"] for r in rows if r["shape"] == shape and r["key"] != "-"):
            mine = [r for r in ok if r["shape"] == shape and r["key"] == key and r["impl"].startswith("oqcore ")]
            ref = [r for r in ok if r["shape"] == shape and r["key"] == key and r["impl"] == REFERENCE_IMPL]
            peers = [r for r in ok if r["shape"] == shape and r["key"] == key and r["impl"] in PEER_EAGER_IMPLS]
            mine = [r for r in mine if r["impl"] != REFERENCE_IMPL]
            if not mine:
                continue
            best = min(mine, key=lambda r: r["min_s"])
            out.append(
                _row(
                    f"quantizer {key} [{shape}] vs eager reference",
                    f"{best['impl']} vs {REFERENCE_IMPL} (eager torch reference)",
                    ref[0]["min_s"] / best["min_s"] if ref else None,
                    QUANT_SPEEDUP,
                    ">=",
                )
            )
            if peers:
                e = min(peers, key=lambda r: r["min_s"])
                row = _row(
                    f"quantizer {key} [{shape}] vs fastest peer eager (info)",
                    f"{best['impl']} vs {e['impl']}",
                    e["min_s"] / best["min_s"],
                    QUANT_SPEEDUP,
                    ">=",
                )
                row["info"] = True
                out.append(row)
            out.append(
                _row(
                    f"quantizer {key} [{shape}] vs copy_",
                    f"{best['impl']} GB/s / bf16 copy_ GB/s",
                    copy[0]["min_s"] / best["min_s"] if copy else None,
                    QUANT_COPY_FRACTION,
                    ">=",
                )
            )
    return out


TORCHAO_FOR = {"fp8": "bf16 + torchao fp8 weight-only", "int8": "bf16 + torchao int8 weight-only"}


def load_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model (the largest MoE and MiniLM) and oqcore scheme: peak RSS added by the load against
    the bf16-then-torchao path of the same kind (fp8 or int8), and wall time against plain bf16."""
    out = []
    ok = _ok(rows)
    moe = [r for r in ok if r["model"].startswith("mixtral")]
    models = []
    if moe:
        models.append(max(moe, key=lambda r: r["checkpoint_bytes"])["model"])
    models += [m for m in dict.fromkeys(r["model"] for r in ok) if not m.startswith("mixtral")]
    for model in models:
        mine = {r["path"]: r for r in ok if r["model"] == model}
        bf16 = mine.get("transformers bf16")
        for label, r in mine.items():
            if not label.startswith("oqcore"):
                continue
            ref = mine.get(TORCHAO_FOR.get(r["scheme"], ""))
            out.append(
                _row(
                    f"load peak RSS {label} [{model}]",
                    f"peak added vs {ref['path'] if ref else TORCHAO_FOR.get(r['scheme'], 'torchao')}",
                    r["peak_added"] / ref["peak_added"] if ref and ref["peak_added"] else None,
                    LOAD_PEAK_RATIO,
                    "<=",
                )
            )
            out.append(
                _row(
                    f"load time {label} [{model}]",
                    "wall time vs transformers bf16",
                    r["wall_s"] / bf16["wall_s"] if bf16 else None,
                    LOAD_TIME_RATIO,
                    "<=",
                )
            )
    return out


def forward_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Batch-1 linear forward: bf16 time / best weight-only oqcore backend time, for int8 (>= 3x)
    and every fp8-family key (>= 0.8x)."""
    ok = [r for r in _ok(rows) if r.get("batch") == 1 and r["layer"].startswith("linear")]
    bf16 = [r for r in ok if r["impl"] == "bf16 F.linear"]
    out = []
    keys = dict.fromkeys(r["weight"] for r in rows if r["impl"].startswith("oqcore") and r.get("activation") == "none")
    for key in keys:
        mine = [r for r in ok if r["weight"] == key and r["activation"] == "none" and r["impl"].startswith("oqcore")]
        goal = INT8_SPEEDUP if key.startswith("int8") else FP8_SPEEDUP
        best = min(mine, key=lambda r: r["min_s"]) if mine else None
        out.append(
            _row(
                f"CPU batch-1 forward {key} weight-only",
                f"bf16 F.linear time / {best['impl'] if best else 'oqcore'} time (4096x4096)",
                bf16[0]["min_s"] / best["min_s"] if best and bf16 else None,
                goal,
                ">=",
            )
        )
    return out


def run(results: dict[str, Any]) -> list[dict[str, Any]]:
    """All target rows from the other sections' results (missing sections give no rows)."""
    return (
        quantizer_targets(results.get("quantizers", []))
        + load_targets(results.get("loading", []))
        + forward_targets(results.get("forward_linear", []))
    )
