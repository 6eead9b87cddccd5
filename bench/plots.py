"""PNG plots of the results (matplotlib, Agg backend). Each function returns the file it wrote, or
``None`` when there is nothing to plot; :func:`write_all` records a missing matplotlib instead of
failing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import MIB


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def quantizer_throughput(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """Grouped bars: GB/s (best, log scale) per weight key and implementation, one panel per
    shape; dashed lines at bf16 ``copy_`` and at 0.4x of it (the target)."""
    ok = [r for r in rows if r["status"] == "ok"]
    shapes = list(dict.fromkeys(r["shape"] for r in ok))
    if not shapes:
        return None
    plt = _plt()
    impls = list(dict.fromkeys(r["impl"] for r in ok if r["impl"] != "bf16 copy_"))
    fig, axes = plt.subplots(len(shapes), 1, figsize=(11, 4.2 * len(shapes)), squeeze=False)
    for ax, shape in zip(axes[:, 0], shapes):
        mine = [r for r in ok if r["shape"] == shape]
        keys = list(dict.fromkeys(r["key"] for r in mine if r["key"] != "-"))
        width = 0.8 / max(len(impls), 1)
        for i, impl in enumerate(impls):
            vals = []
            for k in keys:
                r = next((r for r in mine if r["key"] == k and r["impl"] == impl), None)
                vals.append(r["bytes"] / r["min_s"] / 1e9 if r else 0)
            ax.bar([j + i * width for j in range(len(keys))], vals, width, label=impl)
        copy = next((r for r in mine if r["impl"] == "bf16 copy_"), None)
        if copy:
            c = copy["bytes"] / copy["min_s"] / 1e9
            ax.axhline(c, color="k", ls="--", lw=1, label=f"bf16 copy_ {c:.1f} GB/s")
            ax.axhline(0.4 * c, color="gray", ls=":", lw=1, label="0.4x copy_ (target)")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys, rotation=10)
        ax.set_yscale("log")
        ax.set_ylabel("GB/s of bf16 read (best)")
        ax.set_title(f"Quantizer throughput, {shape}")
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    path = out / "quantizer_throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _moe_ok(rows):
    return [r for r in rows if r.get("status") == "ok" and r["model"].startswith("mixtral")]


def load_vs_size(
    rows: list[dict[str, Any]], out: Path, field: str, ylabel: str, name: str, scale: float
) -> Path | None:
    """Lines per load path: ``field`` (scaled by ``1/scale``) against checkpoint size (GB)."""
    ok = _moe_ok(rows)
    if not ok:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    for path in dict.fromkeys(r["path"] for r in ok):
        pts = sorted((r["checkpoint_bytes"] / 1e9, r[field] / scale) for r in ok if r["path"] == path)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=path)
    ax.set_xlabel("checkpoint size (GB, bf16)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} vs model size (synthetic Mixtral)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out / name
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def memory_timeline(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """RSS above the pre-load baseline (MiB) over time for every path measured with a timeline."""
    ok = [r for r in _moe_ok(rows) if r.get("timeline")]
    if not ok:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 5))
    for r in ok:
        t = [p[0] for p in r["timeline"]]
        m = [(p[1] - r["baseline_rss"]) / MIB for p in r["timeline"]]
        ax.plot(t, m, label=r["path"], lw=1.2)
    ax.set_xlabel("seconds since the load started")
    ax.set_ylabel("RSS above baseline (MiB)")
    ax.set_title(f"Memory during one load: {ok[0]['model']} ({ok[0]['checkpoint_bytes'] / 1e9:.2f} GB bf16)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out / "load_memory_timeline.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def forward_batch1(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """Horizontal bars: batch-1 latency (best, ms, log scale) of the 4096x4096 linear per
    implementation, weight and activation."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("batch") == 1]
    if not ok:
        return None
    plt = _plt()
    ok.sort(key=lambda r: r["min_s"])
    labels = [f"{r['impl']} | {r['weight']} | act {r['activation']}" for r in ok]
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(ok) + 1.5))
    colors = [
        "tab:red" if r["weight"] == "bf16" else "tab:blue" if r["impl"].startswith("oqcore") else "tab:green"
        for r in ok
    ]
    ax.barh(range(len(ok)), [r["min_s"] * 1e3 for r in ok], color=colors)
    ax.set_yticks(range(len(ok)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    # ticks at 1-2-5 steps, labelled plainly (the default minor labels of a short log axis overlap)
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("ms per call (best), batch 1 (red: bf16, blue: oqcore, green: torchao)")
    ax.set_title("Linear 4096x4096 forward on CPU, batch 1")
    fig.tight_layout()
    p = out / "forward_batch1.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def forward_vs_bf16(linear: list[dict[str, Any]], moe: list[dict[str, Any]], out: Path) -> Path | None:
    """Heat map of what a user gets: bf16 time / oqcore time (best over best, against the paired
    bf16 baseline) per planner (weight, activation) row and token count, linear and MoE side by
    side; cells under the issue-13 goal (1.0x, 0.8x at 256 tokens) are red, the rest green."""
    from bench.targets import FORWARD_GOALS, PLANNER_IMPL, _ratio

    panels = []
    for title, rows, axis, baseline in (
        ("linear 4096x4096", linear, "batch", "bf16 F.linear"),
        ("MoE block", moe, "tokens", "bf16 (transformers)"),
    ):
        mine = [r for r in rows if r["impl"] == PLANNER_IMPL and r.get("online", True)]
        if mine:
            base = {r[axis]: r for r in rows if r["impl"] == baseline and r.get("status") == "ok"}
            panels.append((title, mine, axis, base))
    if not panels:
        return None
    plt = _plt()
    import numpy as np
    from matplotlib.colors import ListedColormap

    height = 0.45 * max(len({(r["weight"], r["activation"]) for r in p[1]}) for p in panels) + 2
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), height), squeeze=False)
    for ax, (title, mine, axis, base) in zip(axes[0], panels):
        labels = list(dict.fromkeys(f"{r['weight']} | act {r['activation']}" for r in mine))
        points = list(dict.fromkeys(r[axis] for r in mine))
        vals = np.full((len(labels), len(points)), np.nan)
        for r in mine:
            if r.get("status") == "ok":
                ratio = _ratio(r, base.get(r[axis]))
                if ratio is not None:
                    vals[labels.index(f"{r['weight']} | act {r['activation']}"), points.index(r[axis])] = ratio
        goals = np.array([FORWARD_GOALS.get(m, 1.0) for m in points])
        colors = ListedColormap(["tab:red", "lightgray", "tab:green"])
        ax.imshow(np.where(np.isnan(vals), 0.5, vals >= goals), cmap=colors, vmin=0, vmax=1, aspect="auto")
        for i in range(len(labels)):
            for j in range(len(points)):
                ax.text(j, i, "-" if np.isnan(vals[i, j]) else f"{vals[i, j]:.2f}x", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(points)), [str(m) for m in points])
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel(f"{axis} (goal: 1.0x; 0.8x at 256)")
        ax.set_title(f"{title}: x bf16, no backend pin", fontsize=10)
    fig.tight_layout()
    path = out / "forward_vs_bf16.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(results: dict[str, Any], out: Path) -> dict[str, str]:
    """Every plot the results allow: ``{name: path}``, or ``{"error": "not available: ..."}``."""
    try:
        _plt()
    except Exception as e:
        from bench.common import not_available

        return {"error": not_available(e)}
    made = {}
    loading = results.get("loading", [])
    for name, fn in (
        ("quantizer_throughput", lambda: quantizer_throughput(results.get("quantizers", []), out)),
        (
            "load_time_vs_size",
            lambda: load_vs_size(loading, out, "wall_s", "load wall time (s)", "load_time_vs_size.png", 1.0),
        ),
        (
            "load_peak_vs_size",
            lambda: load_vs_size(loading, out, "peak_added", "peak RSS added (MiB)", "load_peak_vs_size.png", MIB),
        ),
        ("load_memory_timeline", lambda: memory_timeline(loading, out)),
        ("forward_batch1", lambda: forward_batch1(results.get("forward_linear", []), out)),
        ("forward_vs_bf16", lambda: forward_vs_bf16(results.get("forward_linear", []), results.get("forward_moe", []), out)),
    ):
        try:
            p = fn()
        except Exception as e:  # a plot never costs the numbers
            from bench.common import not_available

            made[name] = not_available(e)
            continue
        if p is not None:
            made[name] = p.name
    return made
