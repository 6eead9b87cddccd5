"""Checkpoint names -> model parameter names, with transformers' own conversion rules.

transformers v5 describes how a model's checkpoint keys map to its parameters as a list of
``WeightRenaming`` (renames such as ``block_sparse_moe`` -> ``mlp``) and ``WeightConverter`` (many to
one, such as per-expert ``experts.{e}.w1/w3.weight`` stacked and concatenated into the fused
``experts.gate_up_proj``), returned by ``transformers.conversion_mapping.get_model_conversion_mapping``.
We use exactly those, the way ``transformers.core_model_loading`` applies them, so no architecture
needs a table of ours.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from oqcore.errors import CheckpointError, OqError


@dataclass
class TargetGroup:
    """The checkpoint tensors that produce one model parameter (or several, for one-to-many rules).

    ``target`` is the first target parameter name, ``sources`` the checkpoint keys in checkpoint
    order, ``rule`` the transformers transform that converts them (``None``: a plain copy).
    """

    target: str
    sources: list[str] = field(default_factory=list)
    rule: Any = None
    source_patterns: list[str] = field(default_factory=list)

    def convert(
        self,
        model: nn.Module,
        load: Callable[[str], torch.Tensor],
        load_into: Callable[[str, torch.Tensor], bool] | None = None,
        alloc: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
        source_info: Callable[[str], tuple[tuple[int, ...], torch.dtype]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Read the sources with ``load(key)`` and return ``{parameter name: tensor}``.

        ``load_into(key, out)``, when given, may read a source straight into a slice of the
        result (returning ``False`` when it cannot, e.g. the dtypes differ). ``alloc(shape,
        dtype)`` allocates a fused result (default ``torch.empty``; the loader lends reused
        buffers); ``source_info(key) -> (shape, dtype)`` (from the checkpoint header) lets a fused
        result be allocated before anything is read, so every source goes straight into it.
        """
        if self.rule is None:
            return {self.target: load(self.sources[0])}
        if is_expert_fusion(self.rule):
            return {self.target: self._fuse_in_place(load, load_into, alloc, source_info)}
        rule = deepcopy(self.rule)
        for key, pattern in zip(self.sources, self.source_patterns):
            rule.add_tensor(self.target, key, pattern, (lambda k=key: load(k)))
        try:
            out = rule.convert(self.target, model=model, config=getattr(model, "config", None))
        except OqError:
            raise
        except Exception as e:  # transformers' conversion ops on tensors they cannot combine
            shown = ", ".join(self.sources[:4]) + (" ..." if len(self.sources) > 4 else "")
            raise CheckpointError(
                f"checkpoint tensors {shown} cannot be converted into the model's {self.target!r} with "
                f"transformers' {type(self.rule).__name__} ({type(e).__name__}: {e})"
            ) from None
        return {name: (v[0] if isinstance(v, list) else v) for name, v in out.items()}

    def _fuse_in_place(
        self,
        load: Callable[[str], torch.Tensor],
        load_into: Callable[[str, torch.Tensor], bool] | None,
        alloc: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
        source_info: Callable[[str], tuple[tuple[int, ...], torch.dtype]] | None = None,
    ) -> torch.Tensor:
        """``MergeModulelist(dim=0)`` then ``Concatenate(dim=1)`` (transformers' per-expert ->
        fused experts rule) computed by reading each source into its slice of the preallocated
        result: no stacked intermediate is made, and with ``load_into`` not even a per-expert buffer."""
        patterns = list(self.rule.source_patterns)
        per_pattern = {p: [k for k, sp in zip(self.sources, self.source_patterns) if sp == p] for p in patterns}
        n_experts = len(per_pattern[patterns[0]])
        if any(len(v) != n_experts for v in per_pattern.values()):
            counts = ", ".join(f"{p!r}: {len(v)}" for p, v in per_pattern.items())
            raise CheckpointError(f"{self.target!r}: the checkpoint has unequal expert counts per source pattern ({counts})")
        first_key = per_pattern[patterns[0]][0]
        if source_info is not None and load_into is not None:
            first_shape, dtype = source_info(first_key)
            first = None
        else:
            first = load(first_key)
            first_shape, dtype = tuple(first.shape), first.dtype
        rows = first_shape[0]
        shape = (n_experts, rows * len(patterns), *first_shape[1:])
        out = alloc(shape, dtype) if alloc is not None else torch.empty(shape, dtype=dtype)
        first_done = first is not None
        if first_done:
            out[0, :rows].copy_(first)
            del first
        for p_idx, p in enumerate(patterns):
            for e, key in enumerate(per_pattern[p]):
                if p_idx == 0 and e == 0 and first_done:
                    continue
                dst = out[e, p_idx * rows : (p_idx + 1) * rows]
                if load_into is None or not load_into(key, dst):
                    dst.copy_(load(key))
        return out


def is_expert_fusion(rule: Any) -> bool:
    """Whether a transformers ``WeightConverter`` is the per-expert -> fused experts rule
    (``MergeModulelist(dim=0)``, then ``Concatenate(dim=1)`` when gate and up are fused)."""
    ops = getattr(rule, "operations", None) or []
    names = [type(op).__name__ for op in ops]
    if names == ["MergeModulelist"]:
        return ops[0].dim == 0 and len(rule.source_patterns) == 1
    return names == ["MergeModulelist", "Concatenate"] and ops[0].dim == 0 and ops[1].dim == 1


class NameMapper:
    """Maps checkpoint keys to parameter names of ``model`` (a transformers model, or any module,
    for which names map one to one)."""

    def __init__(self, model: nn.Module, param_names: Iterable[str]):
        self.model = model
        self.names = set(param_names)
        self.renamings: list = []
        self.converters: list = []
        self._pattern_to_converter: dict = {}
        self._meta = dict.fromkeys(self.names, True)
        self.base_model_prefix = getattr(model, "base_model_prefix", None)
        try:
            from transformers import PreTrainedModel
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming
        except ImportError:  # pragma: no cover - without transformers names are used as they are
            return
        if isinstance(model, PreTrainedModel):
            rules = get_model_conversion_mapping(model)
            self.renamings = [r for r in rules if isinstance(r, WeightRenaming)]
            self.converters = [r for r in rules if isinstance(r, WeightConverter)]
        self._pattern_to_converter = {p: c for c in self.converters for p in c.source_patterns}
        self._meta = dict.fromkeys(self.names, True)

    def target_of(self, key: str) -> tuple[str, str | None]:
        """``(parameter name, converter source pattern or None)`` for checkpoint key ``key``;
        the name may not exist in the model (an unexpected key)."""
        if not self.renamings and not self.converters and not self.base_model_prefix:
            return key, None
        from transformers.core_model_loading import rename_source_key

        renamed, pattern = rename_source_key(key, self.renamings, self.converters, self.base_model_prefix, self._meta)
        if renamed not in self.names and key in self.names:
            renamed, pattern = key, None
        return renamed, pattern

    def group(self, keys: Iterable[str]) -> tuple[list[TargetGroup], list[str]]:
        """Group checkpoint ``keys`` by target parameter, in order of first appearance.

        Returns ``(groups, unexpected keys)``.
        """
        groups: dict[str, TargetGroup] = {}
        unexpected: list[str] = []
        for key in keys:
            target, pattern = self.target_of(key)
            if target not in self.names:
                unexpected.append(key)
                continue
            g = groups.get(target)
            if g is None:
                rule = self._pattern_to_converter[pattern] if pattern is not None else None
                g = groups[target] = TargetGroup(target, rule=rule)
            g.sources.append(key)
            g.source_patterns.append(pattern or key)
        for g in groups.values():
            if g.rule is not None:
                # Expert lists are stacked in list order: experts.2 must come before experts.10.
                order = sorted(range(len(g.sources)), key=lambda i: _natural_key(g.sources[i]))
                g.sources = [g.sources[i] for i in order]
                g.source_patterns = [g.source_patterns[i] for i in order]
        return list(groups.values()), unexpected


def _natural_key(key: str) -> list:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in key.split(".")]
