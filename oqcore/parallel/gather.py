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

from oqcore.loading.checkpoint import ST_DTYPES
from oqcore.parallel.shard import LayerShard, Split
from oqcore.torch_compat import own_parameters, set_parameter


def _prefix(name: str, shard: LayerShard) -> str | None:
    for p in shard.weights:
        if name == p or name.startswith(p + "_"):
            return p
    return None


def _whole(t: torch.Tensor, split: Split, full: tuple[int, ...], shard: LayerShard) -> torch.Tensor:
    """Every rank's piece of ``t`` (whose unsharded shape is ``full``; ``split`` cuts its weight)
    put together; all ranks call it in the same order. A tensor of the unsharded shape already
    is the same on every rank (a per-tensor scale, a row-split weight's per-channel scale)."""
    if tuple(t.shape) == tuple(full):
        return t
    d = next(i for i, (a, b) in enumerate(zip(t.shape, full)) if a != b)  # the cut runs along it
    pieces = [p.chunk(len(split.ranges), dim=d) for p in _gather_all(t, shard)]
    return torch.cat([pieces[r][h] for h in range(len(split.ranges)) for r in range(len(pieces))], dim=d)


def _gather_all(t: torch.Tensor, shard: LayerShard) -> list[torch.Tensor]:
    import torch.distributed as dist

    src = t.detach().contiguous()
    byte = ST_DTYPES["U8"]  # the storage format's byte: 8-bit floats travel as raw bytes (gloo has no fp8)
    raw = src.view(byte) if src.element_size() == 1 and src.is_floating_point() else src
    parts = [torch.empty_like(raw) for _ in range(shard.group.world)]
    dist.all_gather(parts, raw, group=shard.group.pg)
    return [p.view(src.dtype) for p in parts]


def _full_shapes(module: nn.Module, shard: LayerShard) -> dict[str, tuple[int, ...]]:
    """The unsharded shape of every quantized tensor of a split module: its method run on
    meta tensors of the weights' unsharded shapes (no values, no memory)."""
    method = getattr(module, "method", None)
    if method is None:
        return {}
    out = {}
    for prefix, shape in shard.weight_shapes.items():
        meta = torch.empty(shape, dtype=module.params_dtype, device="meta")
        qt = method.quantize_weight(meta, f"{module.layer_name} (shapes)")
        out.update({method.formats.weight.param_name(prefix, n): tuple(t.shape) for n, t in qt.tensors.items()})
    return out


def whole_tensors(module: nn.Module, shard: LayerShard) -> dict[str, torch.Tensor]:
    """``{parameter name: whole tensor}`` of one split module (valid on every rank)."""
    out = {}
    full = {**_full_shapes(module, shard), **shard.full}
    for name, t in own_parameters(module).items():
        prefix = _prefix(name, shard)
        if prefix is not None and name in full:
            out[name] = _whole(t, shard.weights[prefix], full[name], shard)
        elif name in shard.params:
            out[name] = _whole(t, shard.params[name], full[name], shard)
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
