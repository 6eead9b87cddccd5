"""align_by_expert: vLLM's moe_align_block_size, shared by every scheme's fused-MoE kernel."""

import torch

from oqcore.routing import align_by_expert


def test_groups_by_expert_pads_to_block_and_drops_masked_slots():
    ids = torch.tensor([[2, 0], [2, 4], [0, 2]])  # 4 == E: a masked slot
    sorted_ids, expert_ids = align_by_expert(ids, 4, 4)
    n = ids.numel()
    assert expert_ids.tolist() == [0, 2]  # expert 1 and 3 got nothing: no block
    assert sorted_ids.tolist() == [1, 4, n, n, 0, 2, 5, n]
    assert sorted_ids.dtype == expert_ids.dtype == torch.int32


def test_negative_ids_are_dropped_and_order_is_stable():
    ids = torch.tensor([[0, 2], [2, 1], [2, 0], [-1, 2]])
    sorted_ids, expert_ids = align_by_expert(ids, 3, 4)
    pad = ids.numel()
    assert expert_ids.tolist() == [0, 1, 2]
    assert sorted_ids.tolist() == [0, 5, pad, pad, 3, pad, pad, pad, 1, 2, 4, 7]


def test_empty_routing():
    sorted_ids, expert_ids = align_by_expert(torch.full((3, 2), 5), 5, 16)
    assert sorted_ids.numel() == 0 and expert_ids.numel() == 0
