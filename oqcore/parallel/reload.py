"""``reload_weights`` on a sharded model: each rank takes full or pre-sharded tensors.

A tensor given at its full shape is cut to this rank's piece exactly as the load read it (the
same ranges of the same dim of the checkpoint tensor, or of the model parameter for model-named
weights); one given at the piece's shape is taken as it is. Tensors of experts other ranks own
(expert parallel) are skipped, and a row-split bias becomes zeros on every rank but rank 0 (it is
added once to the summed output). What is left goes through the ordinary three passes, with a
status collective after each so that a failure on any rank leaves every rank's model untouched.
"""

from __future__ import annotations

import torch

from oqcore.loading.state import OqState
from oqcore.parallel.sources import param_split


def localize_incoming(state: OqState, incoming: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``incoming`` (names -> tensors, full or this rank's pieces) as this rank's pieces; names
    it does not know, and tensors of a shape that is neither, are passed on for the ordinary
    checks to report."""
    out: dict[str, torch.Tensor] = {}
    rank0 = {f"{m}.{p}" for m, shard in state.shards.items() for p in shard.rank0}
    rank = next(iter(state.shards.values())).group.rank
    targets = {k: g.target for g in state.groups.values() for k in g.sources}
    for name, t in incoming.items():
        if name in state.foreign_sources:
            continue
        if isinstance(t, torch.Tensor):
            t = _piece(state, name, t)
            param = targets.get(name, name)
            if param in rank0 and rank != 0:
                t = torch.zeros_like(t)
        out[name] = t
    return out


def _piece(state: OqState, name: str, t: torch.Tensor) -> torch.Tensor:
    cut = state.source_cuts.get(name)
    if cut is not None:
        if tuple(t.shape) == tuple(cut.full_shape):
            parts = [t.narrow(cut.dim, a, b - a) for a, b in cut.ranges]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=cut.dim)
        return t
    split = param_split(name, state.shards)
    owner, _, attr = name.rpartition(".")
    full = state.shards[owner].full.get(attr) if owner in state.shards else None
    if split is not None and full is not None and tuple(t.shape) == tuple(full):
        return split.take(t)
    return t
