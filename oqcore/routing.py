"""Token routing helpers shared by every scheme's fused-MoE kernels (no quantization here)."""

from __future__ import annotations

import torch


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's ``moe_align_block_size`` in torch: group the (token, slot) pairs by expert, padding
    each expert's run to a multiple of ``block_m`` so one kernel program serves one expert.

    ``topk_ids [T, k]`` (int): pairs routed outside ``[0, num_experts)`` are dropped (transformers
    marks masked slots with ``E``; the reference forward skips them too). Returns
    ``(sorted_ids int32 [P], expert_ids int32 [P // block_m])``: the flat pair indices
    ``t * k + j`` grouped by expert in stable order, padded with the sentinel ``T * k``, and the
    expert of each ``block_m`` block. Experts with no tokens get no block.
    """
    flat = topk_ids.reshape(-1).to(torch.int64)
    numel = flat.numel()
    ok = (flat >= 0) & (flat < num_experts)
    ids = torch.where(ok, flat, num_experts)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=num_experts + 1)[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded
    firsts = torch.cumsum(counts, 0) - counts
    sorted_ids = torch.full((int(padded.sum()),), numel, dtype=torch.int32, device=topk_ids.device)
    n_ok = int(counts.sum())
    kept = order[:n_ok]
    e_sorted = ids[kept]
    rank = torch.arange(n_ok, device=flat.device) - firsts[e_sorted]
    sorted_ids[starts[e_sorted] + rank] = kept.to(torch.int32)
    expert_ids = torch.repeat_interleave(torch.arange(num_experts, device=flat.device), padded // block_m).to(torch.int32)
    return sorted_ids, expert_ids
