"""Which bytes of the checkpoint one rank reads: its slices of each source tensor.

A parameter's :class:`~oqcore.parallel.shard.Split` is turned into slices of the checkpoint
tensors that make it (:class:`oqcore.loading.slices.SlicedEntry`, read by file offsets), through
transformers' conversion rule for the parameter:

- a plain rename: the same slice of the one source;
- per-expert tensors fused into ``[E, rows * P, ...]`` (``MergeModulelist`` then ``Concatenate``
  over ``P`` projections): an expert range drops the other experts' tensors from the group (never
  read), a cut of the fused rows becomes, per projection, the part of the cut inside it, a cut of
  a later dim the same cut one dim lower on every source;
- any other rule (rare): the sources are read whole and the converted result is cut
  (:func:`cut_converted`).
"""

from __future__ import annotations

import torch

from oqcore.loading.names import TargetGroup, is_expert_fusion
from oqcore.loading.slices import SlicedEntry
from oqcore.parallel.shard import LayerShard, Split


def param_split(target: str, shards: dict[str, LayerShard]) -> Split | None:
    """The split of model parameter ``target`` on this rank, or ``None`` (held whole)."""
    owner, _, attr = target.rpartition(".")
    shard = shards.get(owner)
    return None if shard is None else shard.params.get(attr)


def slice_group(g: TargetGroup, split: Split, entries: dict) -> list[str]:
    """Rewrite group ``g`` (and ``entries``, key -> entry) so that reading it yields this rank's
    piece of its target: sources replaced by :class:`SlicedEntry` s, other experts dropped.
    Returns the dropped keys (the tensors of experts other ranks own)."""
    if g.rule is None:
        key = g.sources[0]
        entries[key] = SlicedEntry(entries[key], split.dim, split.ranges)
        return []
    if not is_expert_fusion(g.rule):
        return []  # read whole, cut after conversion
    patterns = list(g.rule.source_patterns)
    per = {p: [k for k, sp in zip(g.sources, g.source_patterns) if sp == p] for p in patterns}
    if split.dim == 0:
        (a, b), = split.ranges
        keep = {k for p in patterns for k in per[p][a:b]}
        dropped = [k for k in g.sources if k not in keep]
        pairs = [(k, sp) for k, sp in zip(g.sources, g.source_patterns) if k in keep]
        g.sources, g.source_patterns = [k for k, _ in pairs], [sp for _, sp in pairs]
        return dropped
    rows = split.full // len(patterns)
    for p_idx, p in enumerate(patterns):
        if split.dim == 1:
            lo, hi = p_idx * rows, (p_idx + 1) * rows
            ranges = tuple((max(a, lo) - lo, min(b, hi) - lo) for a, b in split.ranges if a < hi and b > lo)
        else:
            ranges = split.ranges
        for key in per[p]:
            entries[key] = SlicedEntry(entries[key], split.dim - 1, ranges)
    return []


def cut_converted(name: str, value: torch.Tensor, shards: dict[str, LayerShard]) -> torch.Tensor:
    """A converted tensor cut to this rank's piece when it arrived whole (a rule read whole)."""
    split = param_split(name, shards)
    if split is None or split.local == split.full or value.shape[split.dim] != split.full:
        return value
    return split.take(value).contiguous()
