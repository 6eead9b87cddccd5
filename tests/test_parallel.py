"""Tensor- and expert-parallel online loading on 2 and 4 gloo ranks (CPU), every shorthand on the
four tiny MoE layouts and a dense Llama.

Each rank runs ``oqcore.load(..., parallel=...)`` in its own process (parallel_util.run_ranks);
the test process loads the same checkpoint unsharded and checks, for every quantized tensor of
every rank, that it equals the matching piece of the unsharded result byte for byte (pieces cut
by the test's own rule, parallel_util.expected_piece), that the TP / EP forward matches the
unsharded logits within float32 rounding (float32 models), that expert parallel and tensor
parallel inside the experts agree, and that a cut through a scale group fails at plan time.
"""

from __future__ import annotations

import pytest
import torch

import oqcore
from parallel_util import as_bytes, expected_piece, run_ranks

MOE_ARCHS = ["mixtral", "qwen3_moe", "olmoe", "gpt_oss"]
ARCHS = MOE_ARCHS + ["llama"]
CONFIGS = {
    "fp8_per_tensor": "fp8_per_tensor",
    "fp8_per_channel": "fp8_per_channel",
    "fp8_per_block": "fp8_per_block",
    "mxfp8": "mxfp8",
    "int8": {"linear": {"weight": "int8_per_channel_static"}, "moe": "int8_per_channel_weight_only"},
    "mxfp4": "mxfp4",
    "nvfp4": "nvfp4",
}
LOCAL_ACTIVATION_SCALES = {"fp8_per_tensor", "fp8_per_channel", "int8"}
"""Configs whose dynamic activation scales span K (per tensor / per token): a row-split layer
scales its piece of the input on its own, as vLLM's row-parallel layers do, so the forward is
close to, not equal to, the unsharded one."""
# the sizes every cut of every config keeps whole groups with: 128-element blocks need N/world
# and K/world to be multiples of 128; the others need 32 (MX) or 16 (NVFP4)
SIZES = {
    "small": dict(hidden_size=128, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4, head_dim=32, num_layers=2),
    "block": dict(hidden_size=512, intermediate_size=512, num_attention_heads=8, num_key_value_heads=8, head_dim=64, num_layers=1),
    # o_proj K = 6 x 32 = 192: 96 per rank on 2 ranks (whole 1x32 MX blocks), 48 on 4 (cuts one)
    "odd": dict(hidden_size=192, intermediate_size=128, num_attention_heads=6, num_key_value_heads=6, head_dim=32, num_layers=1),
}
GPT_OSS_TP = {"model.layers.*.mlp.experts": "moe_tp_experts"}
"""GPT-OSS has no tensor-parallel plan in transformers (its attention keeps per-head sinks):
the experts are split inside."""


def _family(cfg: str) -> str:
    return "block" if cfg == "fp8_per_block" else "small"


def _modes(arch: str) -> dict:
    if arch == "llama":
        return {"tp": "tp"}
    return {"tp": GPT_OSS_TP if arch == "gpt_oss" else "tp", "ep": "ep"}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    from oqcore.synthetic import make_tiny_dense, make_tiny_moe

    made = {}

    def get(arch: str, family: str):
        if (arch, family) not in made:
            out = tmp_path_factory.mktemp(f"par-{arch}-{family}")
            build = make_tiny_dense if arch == "llama" else make_tiny_moe
            made[arch, family] = build(arch, out, **SIZES[family])
        return made[arch, family]

    return get


EXPORT_CASES = [("mixtral", "fp8_per_block", "tp"), ("qwen3_moe", "mxfp8", "ep"), ("olmoe", "nvfp4", "tp"),
                ("gpt_oss", "mxfp4", "tp"), ("llama", "int8", "tp"), ("mixtral", "fp8_per_tensor", "ep")]
"""Exports from a sharded model (rank 0 writes what every rank sends)."""


def _cases(checkpoints, world: int, tmp) -> list[dict]:
    cases = []
    for arch in ARCHS:
        for cfg, config in CONFIGS.items():
            for mode, parallel in _modes(arch).items():
                path = str(checkpoints(arch, _family(cfg)))
                case = {"id": f"{arch}-{cfg}-{mode}", "path": path, "config": config, "parallel": parallel}
                if (arch, cfg, mode) in EXPORT_CASES:
                    case["after"] = [{"name": "export", "kind": "export", "out": str(tmp / f"export-{arch}-{cfg}-{mode}")}]
                cases.append(case)
    # a cut through a scale group: 128x128 blocks on 64-row pieces; MX blocks of 32 on 48-column pieces
    cases.append({"id": "misaligned-block", "path": str(checkpoints("mixtral", "small")), "config": "fp8_per_block", "parallel": "tp"})
    small = str(checkpoints("qwen3_moe", "small"))
    for kind in ("mesh1d", "group"):
        cases.append({"id": f"mesh-{kind}", "path": small, "config": "mxfp8", "mesh": kind, "parallel": None})
    bad = {
        "bad-mesh2d": {"mesh": "mesh2d"},
        "bad-mesh-str": {"mesh": "tp"},
        "bad-mode": {"parallel": "xp"},
        "bad-style": {"parallel": {"model.layers.*.self_attn.q_proj": "columnwise"}},
        "bad-plan-type": {"parallel": ["colwise"]},
        "mx-cut": {"parallel": "tp", "config": {"linear": "mxfp8"}, "path": str(checkpoints("llama", "odd"))},
        # written by the export case of mixtral-fp8_per_block-tp above (its save ends with a collective)
        "bad-quantized-folder": {"config": None, "path": str(tmp / "export-mixtral-fp8_per_block-tp")},
    }
    for cid, kw in bad.items():
        cases.append({"id": cid, "path": small, "config": "mxfp8", "forward": False, **kw})
    cases.append({"id": "nan-in-one-piece", "path": str(_with_nan(checkpoints("qwen3_moe", "small"))), "config": "mxfp8",
                  "parallel": "tp", "forward": False})
    cases.append({"id": "plan-splits-nothing", "path": str(checkpoints("mixtral", "small")), "config": "mxfp8",
                  "parallel": {"model.layers.*.mlp.shared_expert": "colwise"}})
    return cases


RELOAD_CASES = [("mixtral", "fp8_per_tensor", "tp"), ("qwen3_moe", "nvfp4", "ep"), ("gpt_oss", "mxfp8", "tp"), ("llama", "int8", "tp")]
"""Reload under the same sharding: per-tensor scales reduced over the ranks, expert parallel with
a per-expert global scale, GPT-OSS's transposed experts with biases (a rank-0 down bias), dense."""
NAN_AT = {"mixtral": "model.layers.0.self_attn.o_proj.weight", "qwen3_moe": "model.layers.1.mlp.experts.0.down_proj.weight",
          "gpt_oss": "model.layers.0.mlp.experts.down_proj", "llama": "model.layers.1.mlp.down_proj.weight"}
"""Where the reload plants a NaN: element 0, in the piece of rank 0 only (or, with expert
parallel, of the rank owning expert 0)."""


def _reload_cases(checkpoints) -> list[dict]:
    from oqcore.synthetic import perturbed_copy

    cases = []
    for arch, cfg, mode in RELOAD_CASES:
        src = checkpoints(arch, _family(cfg))
        new = src.parent / f"{src.name}-perturbed"
        if not new.exists():
            perturbed_copy(src, new)
        base = {"config": CONFIGS[cfg], "parallel": _modes(arch)[mode], "forward": False}
        cases.append({**base, "id": f"reload-{arch}-{cfg}", "path": str(src), "after": [
            {"name": "full", "kind": "reload", "source": str(new)},
            {"name": "pieces", "kind": "reload", "source": str(new), "form": "pieces"},
            {"name": "nan", "kind": "reload", "source": str(src), "nan": NAN_AT[arch]},
        ]})
        cases.append({**base, "id": f"fresh-{arch}-{cfg}", "path": str(new)})
    return cases


def _with_nan(src):
    """A copy of checkpoint ``src`` with a NaN at element 0 of layer 1's expert 0 down_proj (in
    the piece of rank 0 only: its first columns)."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = src.parent / f"{src.name}-nan"
    if not out.exists():
        shutil.copytree(src, out)
        tensors = load_file(out / "model.safetensors")
        tensors[NAN_AT["qwen3_moe"]].view(-1)[0] = float("nan")
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="session")
def unsharded(checkpoints):
    cache = {}

    def get(arch: str, cfg: str):
        if (arch, cfg) not in cache:
            m = oqcore.load(checkpoints(arch, _family(cfg)), CONFIGS[cfg], dtype=torch.float32)
            with torch.no_grad():
                logits = m(torch.tensor([[3, 17, 42, 99, 5, 7, 11, 64]])).logits
            tensors = {f"{n}.{k}": t for n, w in m.oq_state.wrappers.items() for k, t in w.named_parameters(recurse=False)}
            cache[arch, cfg] = (tensors, logits)
        return cache[arch, cfg]

    return get


@pytest.fixture(scope="session")
def high_precision(checkpoints):
    cache = {}

    def get(arch: str, cfg: str):
        key = (arch, _family(cfg))
        if key not in cache:
            m = oqcore.load(checkpoints(*key), None, dtype=torch.float32)
            with torch.no_grad():
                cache[key] = m(torch.tensor([[3, 17, 42, 99, 5, 7, 11, 64]])).logits
        return cache[key]

    return get


@pytest.fixture(scope="session", params=[2, 4], ids=["2ranks", "4ranks"])
def ranks(request, checkpoints, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"ranks{world}")
    cases = _cases(checkpoints, world, tmp) + _reload_cases(checkpoints)
    return world, run_ranks(world, cases, tmp)


def _weight_prefix(param: str) -> str:
    for p in ("w13_weight", "w2_weight", "weight"):
        if param == p or param.startswith(p + "_"):
            return p
    return ""


def _mismatches(arch_cfg_full: dict, res: dict, rank: int) -> list[str]:
    """Names of this rank's quantized tensors that differ from their piece of the unsharded result."""
    bad = []
    for name, local in res["tensors"].items():
        module, _, param = name.rpartition(".")
        full = arch_cfg_full[name]
        cut = res["cuts"].get(module)
        prefix = _weight_prefix(param)
        if cut is None:
            want = full
        elif prefix:
            qdata = arch_cfg_full[f"{module}.{prefix}"]
            want = expected_piece(full, tuple(qdata.shape), cut["weights"][prefix])
        elif param in cut["params"]:
            want = expected_piece(full, tuple(full.shape), cut["params"][param])
        else:  # a row-split layer's bias: added once, by rank 0
            want = full if rank == 0 else torch.zeros_like(full)
        if want.shape != local.shape or not torch.equal(as_bytes(want), as_bytes(local)):
            bad.append(f"{name} {list(local.shape)} vs {list(want.shape)}")
    return bad


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_every_rank_holds_the_unsharded_bytes_of_its_piece(ranks, unsharded, arch, cfg):
    world, results = ranks
    full, _ = unsharded(arch, cfg)
    for mode in _modes(arch):
        per_rank = results[f"{arch}-{cfg}-{mode}"]
        for r, res in enumerate(per_rank):
            assert res["error"] is None, (mode, r, res["error"])
            assert res["cuts"], f"{mode}: nothing was split"
            assert len(res["tensors"]) == len(full)
            bad = _mismatches(full, res, r)
            assert bad == [], f"{arch} {cfg} {mode} rank {r}/{world}: {bad[:5]}"
        # the pieces really are pieces: together the ranks hold each split weight once
        some = next(n for n, c in per_rank[0]["cuts"].items() if c["weights"])
        prefix, (dim, _, n) = next(iter(per_rank[0]["cuts"][some]["weights"].items()))
        assert sum(res["cuts"][some]["weights"][prefix][1][0][1] - res["cuts"][some]["weights"][prefix][1][0][0] for res in per_rank) * (
            len(per_rank[0]["cuts"][some]["weights"][prefix][1])
        ) == n


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.filterwarnings("ignore:.*0 layers quantized")
def test_parallel_forward_matches_unsharded(ranks, unsharded, high_precision, arch, cfg):
    world, results = ranks
    _, ref = unsharded(arch, cfg)
    for mode in _modes(arch):
        per_rank = results[f"{arch}-{cfg}-{mode}"]
        first = per_rank[0]["logits"]
        for res in per_rank[1:]:
            assert torch.equal(res["logits"], first)  # every rank ends with the same (reduced) output
        diff = (first - ref).abs().max().item()
        scale = ref.abs().max().item()
        if cfg in LOCAL_ACTIVATION_SCALES:
            # per-shard activation scales: another rounding of the same activations, no worse
            # (within 50 %) than the unsharded model's own quantization error
            hp = high_precision(arch, cfg)
            err, err_ref = (first - hp).abs().max().item(), (ref - hp).abs().max().item()
            print(f"{arch} {cfg} {mode} {world} ranks: error vs bf16 {err:.4f}, unsharded {err_ref:.4f}")
            assert err <= 1.5 * err_ref, (mode, err, err_ref)
        else:
            # float32 models: only the order of the float32 sums differs
            assert diff <= 2e-5 * scale, (mode, diff, scale)


@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_expert_parallel_equals_tensor_parallel_inside_experts(ranks, unsharded, arch, cfg):
    world, results = ranks
    full, ref = unsharded(arch, cfg)
    ep, tp = results[f"{arch}-{cfg}-ep"], results[f"{arch}-{cfg}-tp"]
    experts = [n for n, c in ep[0]["cuts"].items() if c["style"] == "ep_experts"]
    assert experts
    for module in experts:
        for name in [k for k in full if k.startswith(module + ".")]:
            # EP pieces (whole experts) laid end to end give the unsharded stacks; TP pieces were
            # checked against the same stacks: both hold the unsharded bytes
            if full[name].dim() >= 1 and full[name].shape[0] == ep[0]["cuts"][module]["weights"]["w13_weight"][2]:
                joined = torch.cat([as_bytes(r["tensors"][name]) for r in ep], dim=0)
                assert torch.equal(joined, as_bytes(full[name])), name
    if cfg not in LOCAL_ACTIVATION_SCALES:
        diff = (ep[0]["logits"] - tp[0]["logits"]).abs().max().item()
        assert diff <= 2e-5 * ref.abs().max().item()


def test_a_cut_through_a_scale_group_fails_at_plan_time(ranks):
    world, results = ranks
    for r, res in enumerate(results["misaligned-block"]):
        kind, msg = res["error"]
        assert kind == "UnsupportedLayerError", (r, kind, msg)
        # names the layer, the weight's shape, the boundary and the block
        assert "model.layers.0.self_attn.q_proj" in msg and "[128, 128]" in msg, msg
        assert f"{128 // world}" in msg and "128x128" in msg, msg


def test_a_plan_that_splits_nothing_is_refused(ranks):
    _, results = ranks
    for res in results["plan-splits-nothing"]:
        kind, msg = res["error"]
        assert kind == "ConfigError" and "splits no layer of MixtralForCausalLM" in msg and "parallel='ep'" in msg, msg


@pytest.mark.parametrize("arch,cfg,mode", RELOAD_CASES)
def test_reload_under_tp_is_in_place_and_equals_a_fresh_sharded_load(ranks, arch, cfg, mode):
    world, results = ranks
    fresh = results[f"fresh-{arch}-{cfg}"]
    for r, res in enumerate(results[f"reload-{arch}-{cfg}"]):
        assert res["error"] is None, res["error"]
        for form in ("full", "pieces"):
            step = res[form]
            assert step["error"] is None, (form, r, step["error"])
            assert step["in_place"], (form, r)
            want = fresh[r]["tensors"]
            bad = [k for k, t in step["tensors"].items() if not torch.equal(as_bytes(t), as_bytes(want[k]))]
            assert bad == [], (form, r, bad[:5])
        # ... and differs from what the load produced: the refit really happened
        assert any(not torch.equal(as_bytes(t), as_bytes(res["tensors"][k])) for k, t in res["full"]["tensors"].items())


@pytest.mark.parametrize("arch,cfg,mode", RELOAD_CASES)
def test_reload_under_tp_is_all_or_nothing_across_ranks(ranks, arch, cfg, mode):
    world, results = ranks
    kinds = []
    for r, res in enumerate(results[f"reload-{arch}-{cfg}"]):
        kind, msg = res["nan"]["error"]
        kinds.append(kind)
        if kind == "UnsupportedLayerError":  # the rank whose piece holds the NaN names it
            assert "NaN" in msg, msg
        else:
            assert kind == "DistributedError" and "failed while reloading" in msg, (r, kind, msg)
        # every rank keeps the weights of the last good reload, bit for bit
        after = res["nan"]["tensors"]
        assert all(torch.equal(as_bytes(t), as_bytes(res["pieces"]["tensors"][k])) for k, t in after.items())
    assert kinds.count("UnsupportedLayerError") >= 1 and kinds.count("DistributedError") >= 1, kinds


@pytest.mark.parametrize("arch,cfg,mode", EXPORT_CASES)
def test_export_from_shards_writes_the_unsharded_folder(ranks, checkpoints, tmp_path, arch, cfg, mode):
    world, results = ranks
    model = oqcore.load(checkpoints(arch, _family(cfg)), CONFIGS[cfg], dtype=torch.float32)
    try:
        want_dir, want_error = oqcore.save_quantized(model, tmp_path / "unsharded"), None
    except oqcore.OqError as e:  # a model compressed-tensors cannot hold: the shards must say the same
        want_dir, want_error = None, (type(e).__name__, str(e).replace(str(tmp_path / "unsharded"), "<out>"))
    per_rank = results[f"{arch}-{cfg}-{mode}"]
    if want_error is not None:
        kind, msg = per_rank[0]["export"]["error"]
        assert kind == want_error[0] and want_error[1].split(": ", 1)[-1][:80] in msg, (kind, msg)
        assert all(r["export"]["error"][0] == "DistributedError" for r in per_rank[1:])
        return
    assert all(r["export"]["error"] is None for r in per_rank), [r["export"]["error"] for r in per_rank]
    from pathlib import Path

    got_dir = Path(per_rank[0]["export"]["dest"])
    assert all(r["export"]["dest"] == str(got_dir) for r in per_rank)  # every rank is told the folder
    names = sorted(p.name for p in want_dir.iterdir())
    assert sorted(p.name for p in got_dir.iterdir()) == names
    for name in names:
        assert (got_dir / name).read_bytes() == (want_dir / name).read_bytes(), name


@pytest.mark.parametrize("world", [2, 4])
def test_per_rank_peak_memory_is_its_shard_plus_one_layer_shard(big_checkpoint, tmp_path, world):
    """Each rank's peak resident memory (above its baseline once the process group is up) stays
    within (its shard of the model + its largest high-precision layer shard) x 1.15 (the bound the
    unsharded load keeps, tests/test_load_memory.py) + 16 MiB per rank (allocator arenas and the
    collectives' buffers, which do not shrink with the shard), and it reads only its share of the file."""
    case = {"id": "big", "path": str(big_checkpoint), "config": "mxfp8", "parallel": "tp", "dtype": "bfloat16", "forward": False}
    results = run_ranks(world, [case], tmp_path)["big"]
    total = sum(f.stat().st_size for f in big_checkpoint.glob("*.safetensors"))
    for r, res in enumerate(results):
        assert res["error"] is None, res["error"]
        s = res["stats"]
        bound = (s["model"] + s["largest"]) * 1.15 + 16 * 2**20
        print(f"{world} ranks, rank {r}: peak +{s['peak_added'] / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB, read {s['read'] / 2**20:.1f} MiB")
        assert s["peak_added"] <= bound
        # its slices of the split layers plus the whole of what every rank holds (embeddings, norms, routers)
        assert s["read"] < total / world * 1.15


@pytest.mark.parametrize("kind", ["mesh1d", "group"])
def test_a_device_mesh_or_process_group_names_the_ranks(ranks, unsharded, kind):
    _, results = ranks
    full, ref = unsharded("qwen3_moe", "mxfp8")
    for r, res in enumerate(results[f"mesh-{kind}"]):
        assert res["error"] is None, res["error"]
        assert _mismatches(full, res, r) == []
        assert (res["logits"] - ref).abs().max() <= 2e-5 * ref.abs().max()


@pytest.mark.parametrize(
    "cid,kind,field,text",
    [
        ("bad-mesh2d", "ConfigError", "mesh", "expected a 1-D DeviceMesh"),
        ("bad-mesh-str", "ConfigError", "mesh", "expected a torch.distributed DeviceMesh, a ProcessGroup or None, got str"),
        ("bad-mode", "ConfigError", "parallel", "unknown parallel mode 'xp'; expected 'tp', 'ep' or a dict"),
        ("bad-style", "ConfigError", "parallel['model.layers.*.self_attn.q_proj']", "unknown parallel style 'columnwise'"),
        ("bad-plan-type", "ConfigError", "parallel", "got list"),
        ("bad-quantized-folder", "ConfigError", "parallel", "holds quantized weights; parallel loading reads high-precision checkpoints only"),
    ],
)
def test_bad_parallel_arguments_are_config_errors(ranks, cid, kind, field, text):
    _, results = ranks
    for res in results[cid]:
        got_kind, msg = res["error"]
        assert got_kind == kind and msg.startswith(field + ":") and text in msg, (got_kind, msg)


def test_an_mx_block_cut_by_the_split_names_layer_and_sizes(ranks):
    world, results = ranks
    res = results["mx-cut"]
    if world == 2:  # 96 columns per rank: whole 1x32 blocks
        assert all(r["error"] is None for r in res), [r["error"] for r in res]
        return
    for r in res:
        kind, msg = r["error"]
        assert kind == "UnsupportedLayerError" and "model.layers.0.self_attn.o_proj" in msg, msg
        assert "columns (K) index 48" in msg and "1x32" in msg and "multiple of 32" in msg and "192 / 4 = 48" in msg, msg


def test_a_nan_in_one_rank_piece_fails_the_load_on_every_rank(ranks):
    _, results = ranks
    kinds = [r["error"][0] for r in results["nan-in-one-piece"]]
    first_kind, first_msg = results["nan-in-one-piece"][0]["error"]
    assert first_kind == "UnsupportedLayerError" and "model.layers.1.mlp.experts.down_proj[expert 0]" in first_msg, first_msg
    assert kinds[1:] == ["DistributedError"] * (len(kinds) - 1), kinds
    assert all("rank 0 of" in r["error"][1] for r in results["nan-in-one-piece"][1:])
