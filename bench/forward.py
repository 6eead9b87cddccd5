"""Section 3: CPU forward latency (seconds per call) of quantized layers against bf16.

What a user gets is the row that matters: for every (weight key, activation key) the planner can
choose (:func:`planner_matrix`: each weight key a plugin registers for the layer kind, with each
activation key its method supports, ``None`` = weight-only), the layer is quantized with
``oqcore.quantize_`` and NO backend pin, and the backend the planner chose is recorded in the row
(``backend``: ``layer.method.backend.name``). Static activation keys need calibrated input scales,
which online quantization cannot produce: they are listed as not applicable, never timed.

- Linear 4096x4096 (bias), batches :data:`BATCHES`: bf16 ``F.linear`` (bf16 weights, bf16 input;
  timed before and after the others, the better of the two), the planner's choice per (weight,
  activation), every other backend candidate pinned with ``backend: {linear: NAME}`` (the reason
  when ``is_supported`` is false on the CPU; the slow ``torch`` reference only in full mode and
  at :data:`REFERENCE_POINTS`),
  torchao's weight-only and dynamic-int8 configs.
- MoE: a Mixtral sparse-MoE block (8 experts, H=1024, I=2048, top-2; router included, left in
  bf16) at :data:`MOE_TOKENS` tokens: the bf16 block (transformers' eager loop over experts), the
  same matrix, the bf16 block on transformers' ``grouped_mm`` experts (its default for a
  ``from_pretrained`` model; information), torchao fp8/int8 weight-only on the fused expert
  parameters.

Every quantized row is timed alternately with its bf16 baseline (:func:`bench.common.measure_pair`):
the ratios use that paired baseline, so a drift of the shared machine hits both sides alike.

Row fields: ``layer, impl, weight, activation, backend, pinned, online, <batch|tokens>, median_s,
min_s, reps, status`` and, on paired rows, ``bf16_min_s, bf16_median_s`` (seconds per call;
``impl`` ``"oqcore"`` for the planner's rows, ``"oqcore NAME (pinned)"`` for pinned candidates).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bench.common import Budget, log, measure, measure_pair, not_available

LINEAR_N = LINEAR_K = 4096
BATCHES = (1, 4, 16, 256)
QUICK_BATCHES = (1, 4, 16, 256)
MOE = {"hidden": 1024, "intermediate": 2048, "experts": 8, "top_k": 2}
MOE_TOKENS = (1, 4, 16, 256)
QUICK_MOE_TOKENS = (1, 4, 16, 256)
REFERENCE_BUDGET = Budget(min_time_s=0.3, min_reps=2)
"""Timing of the pinned ``torch`` reference rows (full mode only): 10-100x slower than bf16, far
from any target, so a short best-of keeps the full run within its time."""
TORCHAO_FP8_QUICK = (
    "skipped in quick mode (torchao's fp8 weight-only runs a dequantize-then-matmul at 0.01-0.03x bf16 on "
    "the CPU; timed in full mode)"
)
REFERENCE_POINTS = (1, 16)
"""Token counts the pinned ``torch`` reference is timed at (full mode): it is 10-100x slower than
bf16, and at 256 tokens its calls cost seconds each."""
REFERENCE_NOT_TIMED = f"the torch reference is timed at {', '.join(map(str, REFERENCE_POINTS))} tokens only"
PLANNER_IMPL = "oqcore"
"""``impl`` of the rows built without a backend pin (the planner's choice: what a user gets)."""
STATIC_NOT_ONLINE = (
    "not applicable online: a static activation key needs calibrated input scales (from a "
    "checkpoint), which online quantization cannot produce"
)


def _key_name(reg, key) -> str | None:
    return None if key is None else reg.name_of(key, "activation")


def planner_matrix(kind: str) -> list[dict[str, Any]]:
    """Every (weight key, activation key) the planner can be asked for on ``kind``: each weight key
    a plugin registered a ``kind`` method for, with each activation key of the method's
    ``supported_activation_keys`` (``None`` = weight-only). Entries ``{"weight", "activation"
    (name or None), "weight_key", "activation_key", "online" (False for a static activation key)}``."""
    import oqcore

    reg = oqcore.get_registry()
    out = []
    entries = sorted(((k, e) for (kd, k), e in reg.methods.items() if kd == kind), key=lambda t: reg.key_name(t[0]))
    for key, entry in entries:
        for act in entry.cls.supported_activation_keys:
            fmt = reg.format(act) if act is not None else None
            out.append(
                {
                    "weight": reg.key_name(key),
                    "activation": _key_name(reg, act),
                    "weight_key": key,
                    "activation_key": act,
                    "online": not (fmt is not None and fmt.is_static_activation),
                }
            )
    return out


def oq_variants(kind: str, weight_only: bool = False) -> list[dict[str, Any]]:
    """Every (weight key, backend, activation key) an oqcore plugin offers for ``kind``, as
    ``{"weight", "backend", "activation", "candidate"}`` (activation ``None`` = weight-only);
    only the weight-only ones when ``weight_only``."""
    import oqcore

    reg = oqcore.get_registry()
    pm = oqcore.get_plugin_manager()
    out, seen = [], set()
    weight_keys = sorted({k for (kd, k) in reg.methods if kd == kind}, key=reg.key_name)
    for key in weight_keys:
        for b in pm.backend_candidates(kind, key):
            ident = (reg.key_name(key), b.name, _key_name(reg, b.activation_key))
            if ident in seen or (weight_only and b.activation_key is not None):
                continue
            seen.add(ident)
            out.append({"weight": ident[0], "backend": b.name, "activation": ident[2], "candidate": b})
    return out


def _supported(candidate, layer: nn.Module) -> tuple[bool, str]:
    try:
        return candidate.is_supported(layer, torch.device("cpu"))
    except Exception as e:
        return False, f"is_supported raised {type(e).__name__}: {e}"


def _oq_config(kind: str, weight: str, activation: str | None, backend: str | None = None) -> dict[str, Any]:
    """The ``quantize_`` config of one variant: activation ``None`` = weight-only (said explicitly:
    an omitted activation means the scheme's default); ``backend`` pins the forward backend."""
    cfg: dict[str, Any] = {kind: {"weight": weight, "activation": activation}}
    if backend is not None:
        cfg["backend"] = {kind: backend}
    return cfg


def _backends(model: nn.Module, kind: str) -> str:
    """The forward backend(s) the quantized ``kind`` layers of ``model`` run (``method.backend.name``),
    comma-separated when they differ."""
    names = []
    for mod in model.modules():
        method = getattr(mod, "method", None)
        backend = getattr(method, "backend", None)
        if backend is not None and getattr(method, "kind", kind) == kind:
            names.append(backend.name)
    return ",".join(dict.fromkeys(names)) or "?"


def _time_matrix(
    kind, layer, base, target, inputs, budget, points, axis, quick, ref, ref_best=None
) -> list[dict[str, Any]]:
    """Time ``base`` quantized for every entry of :func:`planner_matrix` (``kind``): once as the
    planner builds it (no pin: the row a user gets, its backend recorded), then each other
    backend candidate for the same (weight, activation) pinned. ``target`` is the module
    ``is_supported`` is asked about. Unusable variants become rows saying why; in quick mode the
    pinned ``torch`` reference is not timed. Every variant is timed alternately with ``ref`` (the
    bf16 baseline, :func:`_time_module`)."""
    import oqcore

    pm = oqcore.get_plugin_manager()
    rows: list[dict[str, Any]] = []
    for v in planner_matrix(kind):
        w, a = v["weight"], v["activation"]
        meta = {"weight": w, "activation": a, "online": v["online"]}
        if not v["online"]:
            rows += _skip_rows(layer, PLANNER_IMPL, points, STATIC_NOT_ONLINE, axis, **meta, pinned=False, backend="")
            continue
        log(f"forward {layer}: {w} act={a} (planner)")
        chosen = None
        try:
            model = oqcore.quantize_(copy.deepcopy(base), _oq_config(kind, w, a))
        except Exception as e:
            rows += _skip_rows(layer, PLANNER_IMPL, points, not_available(e), axis, **meta, pinned=False, backend="")
        else:
            chosen = _backends(model, kind)
            got = _time_module(model, inputs, budget, ref, ref_best)
            rows += _rows(layer, PLANNER_IMPL, got, axis, **meta, pinned=False, backend=chosen)
            del model
        for b in pm.backend_candidates(kind, v["weight_key"]):
            if b.activation_key != v["activation_key"] or b.name == chosen:
                continue
            impl = f"oqcore {b.name} (pinned)"
            ok, why = _supported(b, target)
            skip = None if ok else not_available(f"is_supported: {why}")
            if skip is None and quick and b.name == "torch":
                skip = "skipped in quick mode (the torch reference is timed in full mode)"
            timed = points
            if skip is None and b.name == "torch":
                timed = tuple(m for m in points if m in REFERENCE_POINTS)
            if skip is None:
                log(f"forward {layer}: {w} act={a} {impl}")
                try:
                    model = oqcore.quantize_(copy.deepcopy(base), _oq_config(kind, w, a, b.name))
                except Exception as e:
                    skip = not_available(e)
            if skip is not None:
                rows += _skip_rows(layer, impl, points, skip, axis, **meta, pinned=True, backend=b.name)
                continue
            rb = REFERENCE_BUDGET if b.name == "torch" else budget
            got = _time_module(model, {m: inputs[m] for m in timed}, rb, ref, ref_best)
            got |= {m: {"status": REFERENCE_NOT_TIMED} for m in points if m not in timed}
            rows += _rows(layer, impl, dict(sorted(got.items())), axis, **meta, pinned=True, backend=b.name)
            del model
    return rows


def _torchao_linear_configs() -> dict[str, Callable[[], Any]]:
    def cfg(name: str) -> Callable[[], Any]:
        """Factory of torchao config ``name`` (imported lazily)."""
        def make():
            """A fresh torchao config object."""
            import torchao.quantization as tq

            return getattr(tq, name)()

        return make

    return {
        "torchao Int8WeightOnlyConfig": cfg("Int8WeightOnlyConfig"),
        "torchao Float8WeightOnlyConfig": cfg("Float8WeightOnlyConfig"),
        "torchao Int8DynamicActivationInt8WeightConfig": cfg("Int8DynamicActivationInt8WeightConfig"),
    }


RETRIES = 2
"""Extra paired measurements of a point whose bf16 ran over :data:`bench.targets.DISTURBED` times
its own best beside it (a burst of other processes); the least disturbed attempt is kept."""


def _time_module(
    module: Callable,
    inputs: dict[int, torch.Tensor],
    budget: Budget,
    ref: Callable | None = None,
    ref_best: dict[int, float] | None = None,
) -> dict[int, dict[str, Any]]:
    """Per batch: the measurement dict, or ``{"status": "not available: ..."}``. With ``ref`` (the
    bf16 baseline) the two are timed alternately (:func:`bench.common.measure_pair`) and the
    baseline's figures are kept beside the row's as ``bf16_min_s`` / ``bf16_median_s``: the
    "x bf16" ratios and the targets use that paired baseline. With ``ref_best`` (``{batch: the
    baseline's own best, seconds}``, lowered in place as faster paired bf16 calls are seen) a pair
    whose bf16 ran over ``DISTURBED`` times that is timed again, up to :data:`RETRIES` times, and the
    attempt with the least slowed bf16 is kept (``attempts`` says how many were made)."""
    from bench.targets import DISTURBED

    out = {}
    for m, x in inputs.items():
        try:
            with torch.no_grad():
                if ref is None:
                    out[m] = {**measure(lambda x=x: module(x), budget), "status": "ok"}
                    continue
                best = None
                for attempt in range(1 + RETRIES):
                    mine, base = measure_pair(lambda x=x: module(x), lambda x=x: ref(x), budget)
                    got = {**mine, "bf16_min_s": base["min_s"], "bf16_median_s": base["median_s"], "status": "ok"}
                    if best is None or got["bf16_min_s"] < best["bf16_min_s"]:
                        best = got
                    own = (ref_best or {}).get(m)
                    if not own or best["bf16_min_s"] <= DISTURBED * own:
                        break
                best["attempts"] = attempt + 1
                out[m] = best
                if ref_best is not None:  # the fastest bf16 seen so far is the yardstick of later pairs
                    ref_best[m] = min(ref_best.get(m, best["bf16_min_s"]), best["bf16_min_s"])
        except Exception as e:
            out[m] = {"status": not_available(e)}
    return out


def _recheck(
    rows: list[dict[str, Any]],
    kind: str,
    base: nn.Module,
    inputs: dict[int, torch.Tensor],
    budget: Budget,
    axis: str,
    point: int,
    ref: Callable,
    ref_best: dict[int, float] | None = None,
) -> None:
    """Time the planner's rows at ``point`` a second time, minutes after the first (a neighbour's
    burst can double one measurement on this shared VM), keeping the better of the two in place.
    Rows on the slow ``torch`` reference are left alone (far from any target, and costly)."""
    import oqcore

    if point not in inputs:
        return
    for r in rows:
        if r.get(axis) != point or r.get("status") != "ok" or r["impl"] != PLANNER_IMPL or r["backend"] == "torch":
            continue
        log(f"forward recheck {axis} {point}: {r['weight']} act={r['activation']}")
        act = None if r["activation"] == "none" else r["activation"]
        try:
            model = oqcore.quantize_(copy.deepcopy(base), _oq_config(kind, r["weight"], act))
        except Exception as e:  # it built the first time: keep that figure, say why not again
            r["recheck"] = not_available(e)
            continue
        again = _time_module(model, {point: inputs[point]}, budget, ref, ref_best)[point]
        keep = ("median_s", "min_s", "reps", "status", "bf16_min_s", "bf16_median_s")
        r.update(_better({point: {k: r[k] for k in keep if k in r}}, {point: again})[point])
        del model


def _with_paired_best(
    timings: dict[int, dict[str, Any]], rows: list[dict[str, Any]], axis: str
) -> dict[int, dict[str, Any]]:
    """The bf16 row's timings with ``min_s`` lowered to the fastest bf16 call of the whole section
    (its own timing before and after the others, and every paired one): all are calls of the same
    op on the same input, and the fastest is the least disturbed. ``own_min_s`` keeps the row's
    own best."""
    out = {}
    for m, t in timings.items():
        paired = [r["bf16_min_s"] for r in rows if r.get(axis) == m and r.get("bf16_min_s")]
        if t.get("status") == "ok" and paired:
            t = {**t, "own_min_s": t["min_s"], "min_s": min([t["min_s"], *paired])}
        out[m] = t
    return out


def _bests(timings: dict[int, dict[str, Any]]) -> dict[int, float]:
    """``{batch: best seconds}`` of the measured points of a baseline's timings."""
    return {m: t["min_s"] for m, t in timings.items() if t.get("status") == "ok"}


def _better(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per batch, the measurement with the lower median (the less disturbed one), its ``min_s``
    lowered to the best of both."""
    out = {}
    for m in a:
        x, y = a[m], b.get(m, {})
        if x.get("status") != "ok" or y.get("status") != "ok":
            out[m] = x if x.get("status") == "ok" else y
            continue
        best = dict(min(x, y, key=lambda t: t["median_s"]))
        best["min_s"] = min(x["min_s"], y["min_s"])
        if "bf16_min_s" in x and "bf16_min_s" in y:
            best["bf16_min_s"] = min(x["bf16_min_s"], y["bf16_min_s"])
        best["runs"] = 2
        out[m] = best
    return out


def _rows(layer: str, impl: str, timings: dict[int, dict[str, Any]], batch_key: str, **meta) -> list[dict[str, Any]]:
    """One row per batch: ``layer, impl``, ``meta`` (weight, activation, backend, ...) and the timing."""
    meta["activation"] = meta.get("activation") or "none"
    return [{"layer": layer, "impl": impl, **meta, batch_key: m, **t} for m, t in timings.items()]


def _skip_rows(layer: str, impl: str, batches, status: str, batch_key: str, **meta) -> list[dict[str, Any]]:
    """One row per batch saying why ``impl`` was not timed (``status``)."""
    return _rows(layer, impl, {m: {"status": status} for m in batches}, batch_key, **meta)


BASELINE = {"backend": "", "pinned": False, "online": True}


def run_linear(
    budget: Budget,
    batches: tuple[int, ...] = BATCHES,
    quick: bool = False,
    shape: tuple[int, int] = (LINEAR_N, LINEAR_K),
    torchao: bool = True,
) -> list[dict[str, Any]]:
    """Rows (see the module docstring) of the ``shape`` = (N, K) linear (4096x4096): bf16 first,
    then the planner's and the pinned oqcore variants, then torchao (unless ``torchao`` is false)."""
    n, k = shape
    layer = f"linear {n}x{k}"
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(k, n)).to(torch.bfloat16).eval()
    inputs = {m: torch.randn(m, k, dtype=torch.bfloat16) for m in batches}
    log(f"forward {layer}: bf16 F.linear")
    w, b = base[0].weight.detach(), base[0].bias.detach()

    def f(x: torch.Tensor) -> torch.Tensor:
        """The bf16 baseline."""
        return torch.nn.functional.linear(x, w, b)

    first = _time_module(f, inputs, budget)
    own = _bests(first)
    rows = _time_matrix("linear", layer, base, base[0], inputs, budget, batches, "batch", quick, f, own)
    _recheck(rows, "linear", base, inputs, budget, "batch", 1, f, own)
    # The baseline again after the variants: on a shared VM the memory bandwidth a GEMV gets drifts
    # by up to 2x within minutes; the better of the two keeps the ratios conservative.
    again = _time_module(f, inputs, budget)
    bf16 = _with_paired_best(_better(first, again), rows, "batch")
    rows = _rows(layer, "bf16 F.linear", bf16, "batch", weight="bf16", activation=None, **BASELINE) + rows
    for impl, make in _torchao_linear_configs().items() if torchao else ():
        meta = {"weight": "torchao", "activation": None, **BASELINE}
        if quick and "Float8" in impl:
            rows += _skip_rows(layer, impl, batches, TORCHAO_FP8_QUICK, "batch", **meta)
            continue
        log(f"forward {layer}: {impl}")
        try:
            from torchao.quantization import quantize_

            model = copy.deepcopy(base)
            quantize_(model, make())
        except Exception as e:
            rows += _skip_rows(layer, impl, batches, not_available(e), "batch", **meta)
            continue
        rows += _rows(layer, impl, _time_module(model, inputs, budget, f, own), "batch", **meta)
    return rows


def moe_block() -> nn.Module:
    """A bf16 Mixtral sparse-MoE block (router + fused experts) of size :data:`MOE`, seed 0."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=MOE["hidden"],
        intermediate_size=MOE["intermediate"],
        num_local_experts=MOE["experts"],
        num_experts_per_tok=MOE["top_k"],
    )
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(cfg)
    # transformers v5 allocates expert parameters uninitialized (a model's _init_weights fills them)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, cfg.initializer_range)
    return block.to(torch.bfloat16).eval()


def _torchao_experts(config_name: str) -> nn.Module:
    import torchao.quantization as tq

    block = moe_block()
    experts = {r"re:.*experts\.(gate_up_proj|down_proj)$": getattr(tq, config_name)()}
    tq.quantize_(block, tq.FqnToConfig(experts), filter_fn=None)
    return block


def run_moe(budget: Budget, tokens: tuple[int, ...] = MOE_TOKENS, quick: bool = False) -> list[dict[str, Any]]:
    """Rows (see the module docstring) of the Mixtral MoE block, axis ``tokens``: bf16 first, then
    the planner's and the pinned oqcore variants, then torchao."""
    m = MOE
    layer = f"mixtral moe E{m['experts']} H{m['hidden']} I{m['intermediate']} top{m['top_k']}"
    bf16_meta = {"weight": "bf16", "activation": None, **BASELINE}
    try:
        base = moe_block()
    except Exception as e:
        return _skip_rows(layer, "bf16 (transformers)", tokens, not_available(e), "tokens", **bf16_meta)
    torch.manual_seed(0)
    inputs = {t: torch.randn(1, t, m["hidden"], dtype=torch.bfloat16) for t in tokens}
    log(f"forward {layer}: bf16")
    first = _time_module(base, inputs, budget)
    own = _bests(first)
    rows = _time_matrix("moe", layer, base, base.experts, inputs, budget, tokens, "tokens", quick, base, own)
    _recheck(rows, "moe", base, inputs, budget, "tokens", 1, base, own)
    again = _time_module(base, inputs, budget)  # as for the linear: the better of two baselines
    bf16 = _with_paired_best(_better(first, again), rows, "tokens")
    rows = _rows(layer, "bf16 (transformers)", bf16, "tokens", **bf16_meta) + rows
    # transformers' default for a model loaded with from_pretrained is grouped_mm (the baseline
    # above is the eager loop over experts, as in earlier runs): timed against it for information.
    impl = "bf16 (transformers grouped_mm)"
    meta = {"weight": "bf16 (grouped_mm)", "activation": None, **BASELINE}
    log(f"forward {layer}: {impl}")
    try:
        grouped = copy.deepcopy(base)
        grouped.experts.config._experts_implementation = "grouped_mm"
        rows += _rows(layer, impl, _time_module(grouped, inputs, budget, base, own), "tokens", **meta)
        del grouped
    except Exception as e:
        rows += _skip_rows(layer, impl, tokens, not_available(e), "tokens", **meta)
    for name in ("Int8WeightOnlyConfig", "Float8WeightOnlyConfig"):
        impl = f"torchao {name}"
        meta = {"weight": "torchao", "activation": None, **BASELINE}
        if quick and "Float8" in name:
            rows += _skip_rows(layer, impl, tokens, TORCHAO_FP8_QUICK, "tokens", **meta)
            continue
        log(f"forward {layer}: {impl}")
        try:
            block = _torchao_experts(name)
        except Exception as e:
            rows += _skip_rows(layer, impl, tokens, not_available(e), "tokens", **meta)
            continue
        rows += _rows(layer, impl, _time_module(block, inputs, budget, base, own), "tokens", **meta)
    return rows
