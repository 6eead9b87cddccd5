"""One load measurement in a fresh process: ``python -m bench.load_worker '<json spec>'``.

Spec keys: ``path`` (model folder), ``method`` (``bf16`` | ``torchao`` | ``oqcore``), ``auto``
(``causal_lm`` or ``model``: the transformers auto class of the bf16 paths), ``torchao`` (``int8wo``
| ``fp8wo``) and ``torchao_targets`` (``linears`` | ``experts`` | ``all``), ``oq_config`` (anything
``oqcore.load`` accepts), ``sample_s`` (RSS sampling period, seconds).

Everything the load needs is imported before the baseline is taken, so the figures are the load's
own: ``wall_s`` (seconds), ``baseline_rss``, ``peak_rss`` (the kernel's high-water mark ``VmHWM``,
reset at the start, or the sampled maximum if larger) and ``peak_added = peak_rss - baseline_rss``,
``model_bytes`` (storage of the resulting parameters and buffers), all in bytes; ``timeline`` is
``[[seconds since start, RSS bytes], ...]``. The result is one JSON line after ``RESULT_MARK``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

RESULT_MARK = "@@BENCH_RESULT@@"


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Resident set size now (``VmRSS``), bytes; psutil where /proc is missing."""
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    import os

    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


class Sampler:
    """Background thread sampling RSS every ``period_s`` seconds into ``timeline``."""

    def __init__(self, period_s: float):
        self.period_s = period_s
        self.timeline: list[list[float]] = []
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.timeline.append([time.perf_counter() - self._t0, rss_bytes()])
            if self._stop.wait(self.period_s):
                break

    def start(self) -> Sampler:
        """Start sampling RSS in the background."""
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling and record a last sample."""
        self._stop.set()
        self._thread.join()
        self.timeline.append([time.perf_counter() - self._t0, rss_bytes()])

    @property
    def peak(self) -> int:
        """Largest sampled RSS, in bytes."""
        return max((int(r) for _, r in self.timeline), default=0)


def _torchao_config(name: str):
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return {"int8wo": Int8WeightOnlyConfig, "fp8wo": Float8WeightOnlyConfig}[name]()


def torchao_quantize(model, config_name: str, targets: str) -> None:
    """torchao ``quantize_`` of ``model`` in place: ``linears`` (nn.Linear, torchao's default
    filter), ``experts`` (the fused 3D expert parameters, through ``FqnToConfig`` regexes) or
    ``all`` (both)."""
    from torchao.quantization import FqnToConfig, quantize_

    cfg = _torchao_config(config_name)
    if targets in ("linears", "all"):
        quantize_(model, cfg)
    if targets in ("experts", "all"):
        experts = {r"re:.*experts\.(gate_up_proj|down_proj)$": _torchao_config(config_name)}
        quantize_(model, FqnToConfig(experts), filter_fn=None)


def _storage_bytes(model) -> int:
    """Bytes of parameters and buffers, unwrapping tensor subclasses (torchao) into their parts."""
    seen, total = set(), 0

    def add(t) -> None:
        """Count ``t``'s storage once (recursing into tensor-subclass parts)."""
        nonlocal total
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            for n in names:
                add(getattr(t, n))
            return
        if t.is_meta:
            return
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if key not in seen:
            seen.add(key)
            total += st.nbytes()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t.data if hasattr(t, "data") and type(t).__name__ == "Parameter" else t)
    return total


def run(spec: dict) -> dict:
    """Do the load ``spec`` describes and return its figures (see the module docstring)."""
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    method = spec["method"]
    if method == "torchao":
        import torchao.quantization  # noqa: F401  (import cost is not load cost)
    if method == "oqcore":
        import oqcore
        from oqcore.loading.meta import build_meta_model

        build_meta_model(spec["path"], torch.bfloat16)  # import the modeling code, as the bf16 paths do below
        oqcore.get_registry()  # discover and import the plugins (import cost, like the modeling code's)
    auto = transformers.AutoModelForCausalLM if spec.get("auto", "causal_lm") == "causal_lm" else transformers.AutoModel
    if method != "oqcore":
        # The same warm-up as oqcore's meta build: modeling code imported, a meta-device model built.
        config = transformers.AutoConfig.from_pretrained(spec["path"])
        with torch.device("meta"):
            auto.from_config(config, dtype=torch.bfloat16)
    sampler = Sampler(spec.get("sample_s", 0.01)).start()
    base = rss_bytes()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    t0 = time.perf_counter()
    stages = {}
    if method == "oqcore":
        model = oqcore.load(spec["path"], spec["oq_config"])
    else:
        model = auto.from_pretrained(spec["path"], dtype=torch.bfloat16)
        stages["bf16_load_s"] = time.perf_counter() - t0
        if method == "torchao":
            torchao_quantize(model, spec["torchao"], spec.get("torchao_targets", "all"))
    wall = time.perf_counter() - t0
    hwm = (_status_kb("VmHWM") or 0) * 1024
    sampler.stop()
    peak = max(hwm, sampler.peak)
    if method == "oqcore":
        st = model.oq_state.stats
        stages.update(oq_read_s=st.seconds_read, oq_quantize_s=st.seconds_quantize)
    return {
        "wall_s": wall,
        **stages,
        "baseline_rss": base,
        "peak_rss": peak,
        "peak_added": max(peak - base, 0),
        "end_rss": rss_bytes(),
        "model_bytes": _storage_bytes(model),
        "timeline": sampler.timeline,
    }


def main() -> None:
    """Run one load described by the JSON in ``argv[1]`` and print its figures as JSON."""
    spec = json.loads(sys.argv[1])
    try:
        out = run(spec)
    except Exception as e:  # report, do not crash the parent's parsing
        out = {"error": f"{type(e).__name__}: {e}"}
    print(RESULT_MARK + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
