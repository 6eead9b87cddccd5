"""Fused siblings: layers a serving engine runs as one GEMM share their outermost scale.

vLLM loads ``q_proj``/``k_proj``/``v_proj`` into one ``qkv_proj`` and ``gate_proj``/``up_proj`` into
one ``gate_up_proj`` (its ``packed_modules_mapping``), and for a two-level format such as NVFP4 it
serves the fused weight with *one* global scale (the max of the stored ones), without
re-quantizing: siblings quantized with different global scales would be served wrong.
llm-compressor therefore quantizes them with one global scale
(``update_fused_layer_weight_global_scales``: "treated as one tensor"). A key format declaring
:attr:`oqcore.KeyFormat.fused_outer_scale` gets the same here: the siblings wait for each other, and
each is quantized with the max over the group of its outermost-level amax (per tensor), passed to
its quantizer as an external amax (:attr:`oqcore.QuantizerImpl.takes_amax`; no scheme math here).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from oqcore.formats import check_finite
from oqcore.groups import amax_grid, outer_level

FUSED_SIBLINGS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))
"""Children of one module that vLLM fuses into one GEMM (``qkv_proj``, ``gate_up_proj``; BERT's
``query``/``key``/``value``)."""


def _fused_outer(wrapper: nn.Module) -> bool:
    method = getattr(wrapper, "method", None)
    fmt = None if method is None or method.formats is None else method.formats.weight
    return bool(
        fmt is not None
        and fmt.fused_outer_scale
        and outer_level(fmt.key).group_shape.is_per_tensor
        and any(i.takes_amax for i in fmt.implementations)
    )


def sibling_groups(wrappers: dict[str, nn.Module]) -> dict[str, tuple[str, ...]]:
    """``{layer: its fused group (in FUSED_SIBLINGS order, itself included)}`` for every quantized
    linear of a group whose members are all quantized with one weight key whose format declares
    ``fused_outer_scale``. Layers outside such a group are not listed."""
    out: dict[str, tuple[str, ...]] = {}
    for name, w in wrappers.items():
        if not _fused_outer(w) or name in out:
            continue
        parent, _, child = name.rpartition(".")
        for names in FUSED_SIBLINGS:
            if child not in names:
                continue
            members = tuple(f"{parent}.{c}" if parent else c for c in names)
            if all(m in wrappers and _fused_outer(wrappers[m]) for m in members) and len(
                {wrappers[m].method.weight_key for m in members}
            ) == 1:
                for m in members:
                    out[m] = members
    return out


def shared_outer_amax(layers: list[nn.Module]) -> torch.Tensor:
    """The max over ``layers`` (loaded, not yet quantized linears of one fused group) of their
    weights' outermost-level amax (per tensor: ``[1, 1]`` float32)."""
    level = outer_level(layers[0].method.weight_key).group_shape
    return torch.stack([amax_grid(layer.weight.data, level) for layer in layers]).amax(dim=0)


class SiblingQueue:
    """Quantizes each quantized layer once it is complete, a fused group once all its members
    are (``groups``: :func:`sibling_groups` of the model's wrappers). :meth:`complete` returns the
    names processed now, in group order; each member of a group is processed with
    ``oq_outer_amax`` set to the group's :func:`shared_outer_amax` (removed after, whatever
    happens). ``process(layer)`` quantizes one layer (the loaders' ``process_layer``)."""

    def __init__(self, groups: dict[str, tuple[str, ...]], process: Callable[[nn.Module], None]):
        self.groups, self.process = groups, process
        self.waiting: dict[str, nn.Module] = {}
        self.unprocessed: list[nn.Module] = []  # members of a group that raised, never started

    def complete(self, name: str, layer: nn.Module, *, dry: Callable[[nn.Module], None] | None = None) -> list[str]:
        """Layer ``name`` (the module ``layer`` to quantize: the live wrapper, or a reload's
        scratch copy) has all its weights: process it, or its group when it completes it.
        ``dry`` replaces the processing (no amax is computed): a failed rank of a parallel load
        joining, in the same order, the collectives the others run."""
        group = self.groups.get(name)
        if group is None:
            (dry or self.process)(layer)
            return [name]
        self.waiting[name] = layer
        if not all(m in self.waiting for m in group):
            return []
        layers = [self.waiting.pop(m) for m in group]
        if dry is not None:
            for member in layers:
                dry(member)
        else:
            started: list[nn.Module] = []

            def process(member: nn.Module) -> None:
                """Quantize one member, remembering it began (its collectives are then its own)."""
                started.append(member)
                self.process(member)

            try:
                process_together(layers, process)
            except BaseException:
                self.unprocessed = [m for m in layers if all(m is not s for s in started)]
                raise
        return list(group)

    def incomplete(self) -> list[str]:
        """Layers complete but still waiting for a sibling."""
        return sorted(self.waiting)


def process_together(layers: list[nn.Module], process: Callable[[nn.Module], None]) -> None:
    """``process`` each of ``layers`` (one fused group) with their shared outermost amax. A
    NaN / Inf in any member is reported by that member's own check (naming it), before any is
    processed."""
    amax = shared_outer_amax(layers)
    if not bool(torch.isfinite(amax).all()):
        for layer in layers:
            check_finite(layer.weight.data, layer.layer_name)
    try:
        for layer in layers:
            layer.oq_outer_amax = amax
            process(layer)
    finally:
        for layer in layers:
            layer.__dict__.pop("oq_outer_amax", None)
