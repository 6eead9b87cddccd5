"""oqcore.groups: scale groups as regions of a weight, and their amax (the statistic a sharded
quantization reduces over the ranks)."""

from __future__ import annotations

import pytest
import torch

from oqcore.groups import amax_grid, grid_shape, outer_level, scale_levels, weight_extent
from oqcore.keys import GroupShape, QuantKey, ScaleDesc

GROUPS = [GroupShape.PER_TENSOR, GroupShape.PER_CHANNEL, GroupShape.PER_TOKEN, GroupShape(128, 128), GroupShape(1, 32), GroupShape(1, 16), GroupShape(2, 3)]


def _loop_amax(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """max |w| per group by explicit slicing (the definition)."""
    *lead, n, k = w.shape
    r, c = (n if rows == -1 else rows), (k if cols == -1 else cols)
    out = torch.zeros(*lead, -(-n // r), -(-k // c))
    for i in range(out.shape[-2]):
        for j in range(out.shape[-1]):
            out[..., i, j] = w[..., i * r : (i + 1) * r, j * c : (j + 1) * c].abs().float().amax(dim=(-2, -1))
    return out


@pytest.mark.parametrize("shape", [(256, 512), (200, 300), (3, 130, 70), (1, 1)])
@pytest.mark.parametrize("group", GROUPS, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_amax_grid_is_the_max_magnitude_of_every_group(shape, group, dtype):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    w.view(-1)[:: max(1, w.numel() // 7)] *= -8  # the largest magnitudes are negative somewhere
    got = amax_grid(w, group)
    assert got.dtype == torch.float32 and tuple(got.shape) == grid_shape(tuple(shape), group)
    assert torch.equal(got, _loop_amax(w, *weight_extent(group)))


def test_per_channel_means_one_scale_per_output_row():
    # vLLM writes per-channel weight scales (-1, 1), but the elements sharing one are a row of [N, K]
    assert weight_extent(GroupShape.PER_CHANNEL) == (1, -1)
    assert grid_shape((6, 10), GroupShape.PER_CHANNEL) == (6, 1)
    w = torch.arange(60.0).reshape(6, 10) - 30
    assert amax_grid(w, GroupShape.PER_CHANNEL).flatten().tolist() == [30, 20, 10, 9, 19, 29]


def test_nan_and_inf_propagate_into_their_group():
    w = torch.ones(4, 64)
    w[2, 5] = float("nan")
    w[3, 40] = float("-inf")
    got = amax_grid(w, GroupShape(1, 32))
    assert got[2, 0].isnan() and got[3, 1] == float("inf")
    assert torch.isfinite(got[:2]).all() and got[2, 1] == 1 and got[3, 0] == 1


def test_levels_innermost_first_and_the_outer_one():
    inner = ScaleDesc(torch.float8_e4m3fn, True, GroupShape(1, 16))
    outer = ScaleDesc(torch.float32, True, GroupShape.PER_TENSOR)
    two = QuantKey(torch.float4_e2m1fn_x2, inner, scale2=outer)
    one = QuantKey(torch.float8_e4m3fn, outer)
    assert scale_levels(two) == [inner, outer] and outer_level(two) is outer
    assert scale_levels(one) == [outer] and outer_level(one) is outer
