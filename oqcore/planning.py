"""Planning: config + model -> a :class:`QuantPlan` saying, for every quantizable layer, what
happens to it and why.

For each ``nn.Linear`` and fused-experts module (see :mod:`oqcore.layers`), in module order:

1. ``ignore`` match -> skipped ("ignored by pattern ...").
2. ``targets`` match -> that target's spec, bound to the layer's kind.
3. MoE routers and the output embedding (``lm_head``) -> skipped unless a target names them.
4. Otherwise the kind-wide spec (``linear`` / ``moe``), or skipped when the config has none.

Then the method checks the layer's shapes (:meth:`OnlineMethodBase.check_layer`) and the oracle picks
a backend. A layer matched by ``ignore`` and a target, or by two targets, is a
:class:`oqcore.ConfigError` naming the layer and both patterns; so is a target matching a module
that cannot be quantized (a leaf module with parameters that is neither ``nn.Linear`` nor fused
experts: an embedding, a norm). Containers a pattern matches (``model.layers.0.mlp``) are fine.
Patterns are matched as in vLLM (see :mod:`oqcore.matching`: ``re:`` from the start of the name).
Nothing is read from the weights: planning works on a meta-device model.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from oqcore.config import BoundSpec, QuantizationConfig, resolve, spec_str
from oqcore.devices import resolve_device
from oqcore.errors import ConfigError
from oqcore.formats import QuantizerImpl
from oqcore.layers import is_router, layer_kind, layer_shape
from oqcore.matching import matches
from oqcore.oracle import Backend, Candidate, QuantizerCandidate, select_backend, select_quantizer
from oqcore.plugins import get_plugin_manager


@dataclass(frozen=True)
class LayerPlan:
    """The plan for one quantizable layer.

    ``action`` is ``"quantize"`` or ``"skip"``; ``reason`` says which rule decided (``"linear"``,
    ``"targets['re:.*q_proj']"``, ``"ignored by 'lm_head'"``, ``"MoE router: kept in high precision"``).
    For quantized layers ``bound`` holds the method class, activation key, options and formats,
    ``backend`` the oracle's forward backend and ``candidates`` every backend considered with its
    verdict, ``quantizer`` the quantizer implementation the oracle chose for the layer's weights
    and ``quantizer_candidates`` every implementation with its verdict; ``target`` is the
    ``targets`` pattern that chose the spec (``None`` for the kind-wide spec).
    """

    name: str
    kind: str
    module_type: str
    shape: str
    action: str
    reason: str
    bound: BoundSpec | None = None
    backend: Backend | None = None
    candidates: tuple[Candidate, ...] = ()
    target: str | None = None
    quantizer: QuantizerImpl | None = None
    quantizer_candidates: tuple[QuantizerCandidate, ...] = ()

    @property
    def quantized(self) -> bool:
        """True when the layer will be quantized."""
        return self.action == "quantize"

    def make_method(self):
        """A fresh method instance for this quantized layer: its class, activation key, options and
        formats, the chosen forward backend and quantizer implementation."""
        assert self.bound is not None and self.backend is not None
        return self.bound.make_method(self.backend, quantizer=self.quantizer)


@dataclass
class QuantPlan:
    """Per-layer decisions for one model and config, on one device.

    ``layers`` is in module order; ``unmatched`` lists ``ignore`` / ``targets`` patterns that matched
    no quantizable layer (often a typo).
    """

    config: QuantizationConfig
    device: torch.device
    layers: list[LayerPlan]
    unmatched: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> LayerPlan:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(name)

    @property
    def quantized(self) -> list[LayerPlan]:
        """The layers that will be quantized."""
        return [lp for lp in self.layers if lp.quantized]

    @property
    def skipped(self) -> list[LayerPlan]:
        """The quantizable layers left in high precision, each with its reason."""
        return [lp for lp in self.layers if not lp.quantized]

    def _names(self, lp: LayerPlan) -> tuple[str, str]:
        reg = get_plugin_manager().registry
        assert lp.bound is not None
        return reg.name_of(lp.bound.spec.weight, "weight"), reg.name_of(lp.bound.activation_key, "activation")

    def source(self, lp: LayerPlan) -> str:
        """Where a quantized layer's spec came from, as vLLM prints it: ``from linear: fp8_per_block_static``
        or ``from targets: re:.*qkv_proj.*, {"weight":"mxfp8","activation":null}`` (the spec as the
        config gives it, see :func:`oqcore.config.spec_str`)."""
        if lp.target is not None:
            return f"from targets: {lp.target}, {spec_str(self.config.targets[lp.target])}"
        return f"from {lp.kind}: {spec_str(self.config.spec_for(lp.kind))}"

    def summary(self) -> str:
        """vLLM's one-liner, grouped by layer type (the name after its last numeric index, see
        :func:`layer_type`) and source, in module order::

            Quantized 3 layers of types: mlp.down_proj: 2 (from linear: fp8_per_tensor_static); self_attn.qkv_proj: 1 (from targets: re:.*qkv_proj.*, mxfp8)

        ``Quantized 0 layers`` when nothing is quantized."""
        counts: Counter[tuple[str, str]] = Counter()
        for lp in self.quantized:
            counts[(layer_type(lp.name), self.source(lp))] += 1
        n = len(self.quantized)
        if not counts:
            return f"Quantized {n} layers"
        parts = "; ".join(f"{t}: {c} ({src})" for (t, src), c in counts.items())
        return f"Quantized {n} layers of types: {parts}"

    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per layer (JSON-ready): name, kind, shape, action, weight, activation,
        method, quantizer (implementation), backend (forward), reason, and the rejected backends
        and quantizer implementations with their reasons."""
        out = []
        for lp in self.layers:
            row: dict[str, Any] = {
                "name": lp.name,
                "kind": lp.kind,
                "type": lp.module_type,
                "shape": lp.shape,
                "action": lp.action,
                "reason": lp.reason,
            }
            if lp.quantized:
                w, a = self._names(lp)
                assert lp.bound is not None and lp.backend is not None
                row.update(
                    weight=w,
                    activation=a,
                    options=lp.bound.options.model_dump(),
                    method=lp.bound.method_cls.__name__,
                    quantizer=lp.quantizer.name if lp.quantizer is not None else None,
                    backend=lp.backend.name,
                    rejected={c.backend.name: c.reason for c in lp.candidates if c.reason is not None},
                    rejected_quantizers={c.impl.name: c.reason for c in lp.quantizer_candidates if c.reason is not None},
                )
            out.append(row)
        return out

    def explain(self, verbose: bool = False) -> str:
        """A per-layer table (the quantizer implementation that quantizes each layer's weights and the
        forward backend that runs it) and the summary line. ``verbose`` adds every rejected
        quantizer implementation's and backend's reason."""
        header = ("layer", "kind", "shape", "weight", "activation", "quantizer", "backend", "why")
        table = [header]
        for row in self.rows():
            q = row["action"] == "quantize"
            table.append(
                (
                    row["name"],
                    row["kind"],
                    row["shape"],
                    row.get("weight", "-") if q else "-",
                    row.get("activation", "-") if q else "-",
                    (row.get("quantizer") or "-") if q else "-",
                    row.get("backend", "-") if q else "-",
                    row["reason"],
                )
            )
        widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if verbose:
            for lp in self.quantized:
                for qc in lp.quantizer_candidates:
                    if qc.reason is not None:
                        lines.append(f"  {lp.name}: quantizer {qc.impl.name} rejected: {qc.reason}")
                for c in lp.candidates:
                    if c.reason is not None:
                        lines.append(f"  {lp.name}: backend {c.backend.name} rejected: {c.reason}")
        if self.unmatched:
            lines.append("Patterns that matched no quantizable layer: " + ", ".join(self.unmatched))
        lines.append(self.summary())
        return "\n".join(lines)


def layer_type(name: str) -> str:
    """The layer type vLLM groups its summary by: the part of ``name`` after its last numeric
    component (``model.layers.11.mlp.down_proj`` -> ``mlp.down_proj``); a name without one is
    its own type (``lm_head``), and so is a name ending in a number (``0`` in a Sequential),
    where vLLM would print an empty type."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[i + 1 :]) or name
    return name


def _default_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def plan(
    model: nn.Module,
    config: QuantizationConfig | dict | str,
    *,
    device: torch.device | str | None = None,
) -> QuantPlan:
    """Plan the quantization of ``model`` (materialized or on the meta device) under ``config``.

    ``config`` is anything :meth:`QuantizationConfig.from_any` takes. ``device`` is where the
    layers will run (default: the model's device, else CUDA if available, else CPU); it decides
    which backends are supported. Raises :class:`oqcore.ConfigError` for overlapping patterns, a
    target that cannot serve the layer it matches or that matches a module that cannot be
    quantized, a device that does not exist, a ``model`` that is not an ``nn.Module``,
    :class:`oqcore.UnsupportedLayerError` for shapes a method cannot handle, and
    :class:`oqcore.NoBackendError` when no backend can run a layer.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module to plan, got {type(model).__name__}", "model")
    config = QuantizationConfig.from_any(config)
    dev = resolve_device(device) if device is not None else _default_device(model)
    assert dev is not None
    pm = get_plugin_manager()
    reg = pm.registry
    resolved = resolve(config, reg)  # every spec bound once, not once per layer
    modules = dict(model.named_modules())
    output_embedding = _output_embedding(model)
    used: set[str] = set()
    layers: list[LayerPlan] = []

    _check_targets_hit_quantizable(config, modules)

    for name, module in modules.items():
        kind = layer_kind(module)
        if kind is None:
            continue
        base = dict(name=name, kind=kind, module_type=type(module).__name__, shape=layer_shape(module))
        ignored = [p for p in config.ignore if matches(p, name)]
        hits = [p for p in config.targets if matches(p, name)]
        used.update(ignored, hits)
        if ignored and hits:
            raise ConfigError(
                f"layer {name!r} is matched by ignore pattern {ignored[0]!r} and by target {hits[0]!r}; "
                "remove it from one of them",
                "targets",
            )
        if len(hits) > 1:
            raise ConfigError(
                f"layer {name!r} is matched by two targets, {hits[0]!r} and {hits[1]!r}; make the patterns disjoint",
                "targets",
            )
        if ignored:
            layers.append(LayerPlan(**base, action="skip", reason=f"ignored by {ignored[0]!r}"))
            continue
        if hits:
            where = f"targets[{hits[0]!r}]"
            try:
                bound = resolved.target(hits[0], kind)
            except ConfigError as e:
                raise ConfigError(f"cannot apply to {kind} layer {name!r}: {e.reason}", f"{where}.{e.field}" if e.field else where) from None
            reason = where
            target = hits[0]
        else:
            target = None
            parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else model
            if is_router(name, module, parent):
                layers.append(LayerPlan(**base, action="skip", reason="MoE router: kept in high precision"))
                continue
            if module is output_embedding:
                layers.append(LayerPlan(**base, action="skip", reason="output embedding: kept in high precision"))
                continue
            kind_bound = resolved.kind(kind)
            if kind_bound is None:
                layers.append(LayerPlan(**base, action="skip", reason=f"no {kind} spec in the config"))
                continue
            bound = kind_bound
            reason = kind
        bound.method_cls.check_layer(name, module)
        choice = select_backend(
            name,
            module,
            pm.backend_candidates(kind, bound.spec.weight),
            bound.activation_key,
            dev,
            pinned=config.backend.get(kind),
            name_of=lambda k: reg.name_of(k, "activation"),
            kind=kind,
            weight_name=reg.name_of(bound.spec.weight, "weight"),
            method=bound.method_cls.__name__,
            plugin=bound.method_plugin,
        )
        quantizer, quantizer_candidates = None, ()
        if bound.formats is not None:
            qchoice = select_quantizer(
                bound.formats.weight.implementations,
                dev,
                bound.method_cls.weight_shapes(module),
                _weight_dtype(module),
                what=name,
            )
            quantizer, quantizer_candidates = qchoice.impl, qchoice.candidates
        layers.append(
            LayerPlan(
                **base,
                action="quantize",
                reason=reason,
                bound=bound,
                backend=choice.backend,
                candidates=choice.candidates,
                target=target,
                quantizer=quantizer,
                quantizer_candidates=quantizer_candidates,
            )
        )

    unmatched = [p for p in (*config.ignore, *config.targets) if p not in used]
    return QuantPlan(config, dev, layers, unmatched)


def _weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the layer's weights arrive in (its first floating parameter's; bf16 if none yet)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.bfloat16


def _output_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            return get()
        except (AttributeError, NotImplementedError):
            return None
    return None


def _check_targets_hit_quantizable(config: QuantizationConfig, modules: dict[str, nn.Module]) -> None:
    """A ConfigError (every offending pattern listed) when a target matches a module that cannot be
    quantized: a leaf with parameters of its own that is neither nn.Linear nor fused experts."""
    problems: list[tuple[str, str]] = []
    for pattern in config.targets:
        for name, module in modules.items():
            if not name or layer_kind(module) is not None or not matches(pattern, name):
                continue
            if next(module.children(), None) is None and next(module.parameters(recurse=False), None) is not None:
                problems.append(
                    (
                        f"targets[{pattern!r}]",
                        f"matches layer {name!r} of type {type(module).__name__}, which cannot be quantized (only "
                        "nn.Linear and fused-experts modules can); narrow the pattern (anchor a re: pattern with $)",
                    )
                )
                break
    if problems:
        field, msg = problems[0]
        raise ConfigError(msg, field, errors=problems if len(problems) > 1 else None)
