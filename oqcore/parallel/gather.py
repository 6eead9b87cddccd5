"""The whole model from its shards, for an export: every rank sends, rank 0 assembles.

Each tensor of a split module is all-gathered along the dim its cut runs on and put back in
order (a two-range cut, the gate and up halves of a fused projection, is reassembled half by
half); a tensor with a single entry along that dim (a per-tensor scale, the per-channel scale of
a row-split weight) is the same on every rank and taken as it is; a row-split bias is rank 0's.
Rank 0 gets a copy of the model (sharing every tensor that was not split) whose split modules
hold the whole tensors and their unsharded shapes, which the ordinary export then writes: the
same folder an unsharded load exports. It holds the whole quantized model once, on rank 0.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from oqcore.parallel.shard import LayerShard, Split
from oqcore.torch_compat import own_parameters, set_parameter


def _prefix(name: str, shard: LayerShard) -> str | None:
    for p in shard.weights:
        if name == p or name.startswith(p + "_"):
            return p
    return None


def _whole(t: torch.Tensor, split: Split, ndim: int, shard: LayerShard) -> torch.Tensor:
    """Every rank's piece of ``t`` (one tensor of a weight of ``ndim`` dims cut by ``split``) put
    together; all ranks call it in the same order."""
    d = split.dim
    if t.dim() < ndim:  # per tensor ([1]) or per expert ([E], [E, 1]): split only with the experts
        if not (d == 0 and ndim == 3):
            return t
    elif t.shape[d] == 1:
        return t
    pieces = [p.chunk(len(split.ranges), dim=d) for p in _gather_all(t, shard)]
    return torch.cat([pieces[r][h] for h in range(len(split.ranges)) for r in range(len(pieces))], dim=d)


def _gather_all(t: torch.Tensor, shard: LayerShard) -> list[torch.Tensor]:
    import torch.distributed as dist

    src = t.detach().contiguous()
    raw = src.view(torch.uint8) if src.element_size() == 1 and src.dtype != torch.uint8 else src  # fp8 / e8m0 travel as bytes
    parts = [torch.empty_like(raw) for _ in range(shard.group.world)]
    dist.all_gather(parts, raw, group=shard.group.pg)
    return [p.view(src.dtype) for p in parts]


def whole_tensors(module: nn.Module, shard: LayerShard) -> dict[str, torch.Tensor]:
    """``{parameter name: whole tensor}`` of one split module (valid on every rank)."""
    out = {}
    for name, t in own_parameters(module).items():
        prefix = _prefix(name, shard)
        if prefix is not None:
            qdata = getattr(module, prefix)
            out[name] = _whole(t, shard.weights[prefix], qdata.dim(), shard)
        elif name in shard.params:
            out[name] = _whole(t, shard.params[name], t.dim(), shard)
        else:  # rank 0's row-split bias, static activation state: the same everywhere it matters
            out[name] = t
    return out


def gathered_model(model: nn.Module) -> nn.Module | None:
    """On rank 0, a copy of the sharded ``model`` holding the whole tensors of every split
    module (and their unsharded shapes), no hooks and an ``oq_state`` without shards; ``None`` on
    the other ranks. Every rank of the group must call it (it runs the all-gathers)."""
    state = model.oq_state
    wholes = {name: whole_tensors(model.get_submodule(name), shard) for name, shard in state.shards.items()}
    rank = next(iter(state.shards.values())).group.rank
    if rank != 0:
        return None
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    memo[id(state)] = None  # rebuilt below
    memo.update({id(shard): shard for shard in state.shards.values()})  # process groups cannot be copied
    clone = copy.deepcopy(model, memo)
    for name, tensors in wholes.items():
        module = clone.get_submodule(name)
        for attr, value in state.shards[name].attrs.items():
            setattr(module, attr, value)
        for pname, t in tensors.items():
            set_parameter(module, pname, nn.Parameter(t, requires_grad=False))
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
        module._forward_hooks_with_kwargs.clear()
        module._forward_pre_hooks_with_kwargs.clear()
        del module.oq_shard
    wrappers = {n: clone.get_submodule(n) for n in state.wrappers}
    clone.oq_state = dataclasses.replace(state, wrappers=wrappers, shards={}, source_cuts={}, foreign_sources=frozenset())
    return clone
