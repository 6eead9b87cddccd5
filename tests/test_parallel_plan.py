"""The parallel plan and the cut of each layer, in one process (no collective runs): which
modules transformers' plans split, each rank's ranges, the checks made before any read, and the
errors for a process group that is not there."""

from __future__ import annotations

import pytest
import torch

import oqcore
from oqcore.loading.install import install_wrappers
from oqcore.loading.meta import build_meta_model
from oqcore.parallel.comm import Group
from oqcore.parallel.localize import localize
from oqcore.parallel.plan import module_styles, plan_entries
from oqcore.loading.slices import shard_ranges
from oqcore.parallel.shard import Split
from test_toy4_scheme import toy4  # noqa: F401  (the fixture installing a third-party scheme)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from oqcore.synthetic import make_tiny_dense

    return make_tiny_dense("llama", tmp_path_factory.mktemp("plan-llama"), hidden_size=128, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=4, head_dim=32, num_layers=1)


def _planned(path, config):
    model = build_meta_model(path, torch.bfloat16)
    install_wrappers(model, oqcore.plan(model, config))
    return model


def test_transformers_tp_plan_for_a_dense_model(llama):
    model = _planned(llama, "fp8_per_block")
    styles = module_styles(model, plan_entries(model, "tp"))
    layer = "model.layers.0"
    assert styles == {
        **{f"{layer}.self_attn.{p}_proj": "colwise" for p in "qkv"},
        f"{layer}.self_attn.o_proj": "rowwise",
        f"{layer}.mlp.gate_proj": "colwise",
        f"{layer}.mlp.up_proj": "colwise",
        f"{layer}.mlp.down_proj": "rowwise",
        "lm_head": "colwise_gather_output",
    }


def test_ep_keeps_attention_tensor_parallel_and_splits_experts_by_expert(tiny_moe):
    model = _planned(tiny_moe("mixtral"), {"moe": "mxfp8"})
    tp = module_styles(model, plan_entries(model, "tp"))
    ep = module_styles(model, plan_entries(model, "ep"))
    experts = [n for n in tp if n.endswith("experts")]
    assert experts and all(tp[n] == "tp_experts" and ep[n] == "ep_experts" for n in experts)
    assert {n: s for n, s in tp.items() if n not in experts} == {n: s for n, s in ep.items() if n not in experts}


def test_each_rank_gets_its_range_and_packed_halves():
    assert [shard_ranges(8, r, 4) for r in range(4)] == [((0, 2),), ((2, 4),), ((4, 6),), ((6, 8),)]
    # gate | up stacked: each half cut alike
    assert shard_ranges(8, 1, 2, 2) == ((2, 4), (6, 8))
    t = torch.arange(16).reshape(8, 2)
    assert Split(0, ((2, 4), (6, 8)), 8).take(t).tolist() == [[4, 5], [6, 7], [12, 13], [14, 15]]
    assert Split(1, ((1, 2),), 2).transposed(2).dim == 0


def test_a_scheme_whose_quantizers_take_no_reduced_amax_cannot_be_cut_across_its_global_scale(toy4, llama):  # noqa: F811
    # toy4: 1x16 scales under a per-tensor global scale, and no implementation declares takes_amax
    model = _planned(llama, {"linear": "toy4"})
    styles = module_styles(model, plan_entries(model, "tp"))
    with pytest.raises(oqcore.UnsupportedLayerError) as e:
        localize(model, styles, Group(None, 0, 2))
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "per-tensor scales" in msg and "takes_amax" in msg, msg


def test_a_refused_cut_changes_no_module(llama):
    model = _planned(llama, "fp8_per_block")
    before = {n: tuple(p.shape) for n, p in model.named_parameters()}
    with pytest.raises(oqcore.UnsupportedLayerError, match=r"inside a 128x128 scale group"):
        localize(model, module_styles(model, plan_entries(model, "tp")), Group(None, 0, 2))
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == before
    assert not any(hasattr(m, "oq_shard") for m in model.modules())


def test_parallel_without_a_process_group_says_how_to_start_one(llama):
    with pytest.raises(oqcore.ConfigError) as e:
        oqcore.load(llama, "mxfp8", parallel="tp")
    assert e.value.field == "mesh" and "torchrun" in str(e.value) and "init_process_group" in str(e.value)
