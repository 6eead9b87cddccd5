"""The forward of a sharded model: the collectives each split implies, as module hooks.

A column-split linear's output stays split (the next row-split layer takes it), or is all-gathered
(``colwise_gather_output``); a row-split linear's partial outputs are summed over the ranks
(all-reduce; the bias lives on rank 0 only, so it is added once), its input cut first for
``rowwise_split_input``. Split experts (either way) return partial sums over the intermediate
size or over the experts the rank owns, summed the same way; expert-parallel ranks see expert
ids shifted to their own range (ids of other ranks fall outside ``[0, E_local)`` and are skipped,
as transformers' experts skip them). The sums run in the output dtype, as tensor-parallel engines do:
a float32 model matches its unsharded forward within float32 rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from oqcore.parallel.shard import LayerShard


def _gather_output(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
    return module.oq_shard.group.all_gather(out, dim=-1)


def _sum_output(module: nn.Module, args: Any, kwargs: Any, out: torch.Tensor) -> torch.Tensor:
    return module.oq_shard.group.all_reduce_sum_(out.contiguous())


def _split_input(module: nn.Module, args: tuple) -> tuple:
    (a, b), = module.oq_shard.params["weight"].ranges
    x = args[0]
    return (x[..., a:b].contiguous(), *args[1:])


def _shift_experts(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    off = module.oq_shard.expert_offset
    if len(args) >= 2:
        args = (args[0], args[1] - off, *args[2:])
    elif "top_k_index" in kwargs:
        kwargs = {**kwargs, "top_k_index": kwargs["top_k_index"] - off}
    return args, kwargs


def attach(module: nn.Module, shard: LayerShard) -> list:
    """Register the hooks of ``shard.style`` on ``module``; returns their handles."""
    style, hooks = shard.style, []
    if style == "colwise_gather_output":
        hooks.append(module.register_forward_hook(_gather_output))
    if style == "rowwise_split_input":
        hooks.append(module.register_forward_pre_hook(_split_input))
    if style == "ep_experts":
        hooks.append(module.register_forward_pre_hook(_shift_experts, with_kwargs=True))
    if style in ("rowwise", "rowwise_split_input", "tp_experts", "ep_experts"):
        hooks.append(module.register_forward_hook(_sum_output, with_kwargs=True))
    return hooks


def finish_sharded(model: nn.Module, shards: dict[str, LayerShard]) -> None:
    """After a parallel load: zero the rank-0-only parameters on the other ranks (a row-split
    bias is added once to the summed output) and attach every split module's forward hooks."""
    for name, shard in shards.items():
        module = model.get_submodule(name)
        if shard.group.rank != 0:
            for p in shard.rank0:
                getattr(module, p).data.zero_()
        shard.hooks = attach(module, shard)
