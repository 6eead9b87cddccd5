"""``report(model)``: what oqcore did to a model, in figures."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from oqcore.loading.state import get_state, tensor_bytes
from oqcore.plugins import get_registry


@dataclass
class SchemeRow:
    """Layers of one kind quantized one way (weight and activation keys, the quantizer
    implementation that quantized the weights and the forward backend that runs them): ``count``
    layers, ``bytes_before`` (high precision) and ``bytes_after`` (quantized data + scales), in bytes."""

    kind: str
    weight: str
    activation: str
    quantizer: str
    backend: str
    count: int = 0
    bytes_before: int = 0
    bytes_after: int = 0


@dataclass
class Report:
    """Per kind and scheme: layer counts and sizes; for the whole load: seconds and memory.

    Sizes in bytes, times in seconds. ``peak_rss_added`` is the peak resident memory of the load
    above the process's resident memory when it started.
    """

    rows: list[SchemeRow] = field(default_factory=list)
    skipped: int = 0
    model_bytes: int = 0
    seconds_total: float = 0.0
    seconds_build: float = 0.0
    seconds_read: float = 0.0
    seconds_quantize: float = 0.0
    baseline_rss: int = 0
    peak_rss: int = 0
    peak_rss_added: int = 0
    largest_layer_bytes: int = 0
    summary: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON."""
        return asdict(self)

    def __str__(self) -> str:
        lines = [self.summary, ""]
        header = ["kind", "weight", "activation", "quantizer", "backend", "layers", "before", "after", "ratio"]
        table = [header]
        for r in self.rows:
            ratio = f"{r.bytes_after / r.bytes_before:.2f}x" if r.bytes_before else "-"
            table.append(
                [r.kind, r.weight, r.activation, r.quantizer, r.backend, str(r.count), _mb(r.bytes_before), _mb(r.bytes_after), ratio]
            )
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for i, row in enumerate(table):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines += [
            "",
            f"model size now: {_mb(self.model_bytes)}",
            f"time: {self.seconds_total:.2f} s (building the model on meta {self.seconds_build:.2f} s, reading "
            f"{self.seconds_read:.2f} s, quantizing {self.seconds_quantize:.2f} s)",
            f"peak memory: {_mb(self.peak_rss)} resident, {_mb(self.peak_rss_added)} above the {_mb(self.baseline_rss)} "
            f"the process held before (largest layer in high precision: {_mb(self.largest_layer_bytes)})",
        ]
        return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def report(model: nn.Module) -> Report:
    """The :class:`Report` of a model made by :func:`oqcore.load` or :func:`oqcore.quantize_`.

    Raises :class:`oqcore.ConfigError` (field ``model``, a subclass of :class:`oqcore.OqError`) for
    anything oqcore did not produce.
    """
    state = get_state(model)
    reg = get_registry()
    rows: dict[tuple, SchemeRow] = {}
    before = defaultdict(int)
    for lp in state.plan.quantized:
        w = state.wrappers[lp.name]
        quantizer = lp.quantizer.name if lp.quantizer is not None else "-"
        key = (
            lp.kind,
            reg.name_of(lp.bound.spec.weight, "weight"),
            reg.name_of(lp.bound.activation_key, "activation"),
            quantizer,
            lp.backend.name,
        )
        row = rows.setdefault(key, SchemeRow(*key))
        row.count += 1
        row.bytes_after += tensor_bytes(w)
        before[key] += _hp_bytes(w, state.dtype.itemsize)
    for key, row in rows.items():
        row.bytes_before = before[key]
    s = state.stats
    return Report(
        rows=list(rows.values()),
        skipped=len(state.plan.skipped),
        model_bytes=tensor_bytes(model),
        seconds_total=s.seconds_total,
        seconds_build=s.seconds_build,
        seconds_read=s.seconds_read,
        seconds_quantize=s.seconds_quantize,
        baseline_rss=s.baseline_rss,
        peak_rss=s.peak_rss,
        peak_rss_added=s.peak_added,
        largest_layer_bytes=s.largest_layer_bytes,
        summary=state.plan.summary(),
    )


def _hp_bytes(wrapper: nn.Module, itemsize: int) -> int:
    from oqcore.modules import empty_like

    return sum(p.numel() for p in empty_like(wrapper).parameters(recurse=False)) * itemsize
