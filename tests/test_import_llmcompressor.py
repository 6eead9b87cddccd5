"""oqcore.load reads checkpoints written by llm-compressor itself (issue 11, import side).

The folders in ``tests/data/llmcompressor`` were written once by llm-compressor 0.14.0.1
(compressed-tensors 0.19.0, transformers 5.17.0; ``make_fixtures.py`` there regenerates them,
``versions.json`` records the versions): ``model_free_ptq`` for the data-free schemes and
``oneshot`` + ``QuantizationModifier`` for FP8 with static activation scales, on a tiny bf16 Llama
and a tiny bf16 Qwen3-MoE (2 experts of intermediate 128, so 128x128 blocks split gate from up).
They differ from ``tests/ct_reference.py``'s in what a real run writes around the tensors: config
group names after the preset (``FP8_DYNAMIC``, ``config_group_0``), every ``QuantizationArgs``
field dumped (``observer: null``, ``observer_kwargs: {}``, ``actorder``, ``zp_dtype``...),
``transform_config: {}``, ``naive-quantized`` for fp8 weight-only (compressed-tensors 0.19), bf16
scales, ``model.safetensors.index.json`` beside a single shard, ``recipe.yaml`` (oneshot), and
``observer: memoryless_minmax`` / ``sparsity_config: {}`` (oneshot).

Checked: (1) every quantized tensor oqcore holds is the stored one, bit for bit (MoE experts
stacked gate-then-up into w13; per-tensor gate/up scales that differ are requantized to one w13
scale by the rule vLLM uses, checked exactly); (2) each layer runs the oqcore scheme matching the
config group, and what the checkpoint ignores (embeddings, lm_head, routers) stays in high
precision; (3) the logits are within bf16 rounding of a float32 transformers model holding the
exactly dequantized stored weights (weight-only) with, for W8A8, every quantized layer's input
fake-quantized by the activation key's reference quantizer (``oqcore.quantize_tensor``); (4) the
two schemes oqcore cannot run are refused by name; (5) the bf16 sources are rebuilt from the seed
and llm-compressor's scales are its bf16 arithmetic (why its bytes differ from oqcore's own).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import oqcore
from oqcore import CheckpointError

pytest.importorskip("compressed_tensors")
from battery.util import raises_naming
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from test_ct_reference import scale_per_element
from test_import_ct import _expected, _rel_err, _same

DATA = Path(__file__).parent / "data" / "llmcompressor"
VERSIONS = json.loads((DATA / "versions.json").read_text())

# fixture folder -> the oqcore (weight, activation) keys its one config group must load as
LOADABLE = {
    f"{model}_{scheme}": keys
    for model in ("dense", "moe")
    for scheme, keys in {
        "FP8_DYNAMIC": ("fp8_per_channel_static", "fp8_per_token"),
        "FP8_BLOCK": ("fp8_per_block_static", "fp8_per_block_dynamic"),
        "MXFP8": ("mxfp8", "mxfp8"),
        "MXFP8A16": ("mxfp8", None),
        "W8A16_CHANNEL": ("int8_per_channel_static", None),
        "FP8_W8A16": ("fp8_per_tensor_static", None),
    }.items()
    if (DATA / f"{model}_{scheme}").is_dir()
}
# oneshot FP8: per-tensor weights and STATIC per-tensor input activations (calibrated input_scale)
LOADABLE["dense_FP8"] = ("fp8_per_tensor_static", "fp8_per_tensor_static")
DENSE_LAYERS = [f"model.layers.{i}.{p}" for i in range(2) for p in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]  # fmt: skip
MOE_LAYERS = [f"model.layers.{i}.{p}" for i in range(2) for p in
              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.experts")]  # fmt: skip


def test_the_fixtures_are_what_the_script_says():
    """Guards the test data itself: every fixture the generator lists is here, was written by the
    llm-compressor version the docs name, and the tests below cover each one."""
    assert VERSIONS["llmcompressor"] == "0.14.0.1" and VERSIONS["compressed_tensors"] == "0.19.0"
    listed = set(VERSIONS["fixtures"])
    assert listed == {p.parent.name for p in DATA.glob("*/config.json")}
    # the 4-bit float fixtures (make_fixtures.FP4_FIXTURES) are covered by tests/test_import_fp4.py
    fp4 = {n for n, spec in VERSIONS["fixtures"].items() if "FP4" in spec["scheme"]}
    assert listed == set(LOADABLE) | {"dense_W8A16"} | fp4
    for name in listed:
        qc = json.loads((DATA / name / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == "compressed-tensors" and qc["version"] == "0.19.0", name


@pytest.fixture(scope="module")
def loaded():
    """oqcore.load of each loadable fixture, once (float32 model dtype: the reference's)."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = oqcore.load(DATA / name, dtype=torch.float32)
        return made[name]

    return get


def _stored(name: str) -> dict[str, torch.Tensor]:
    return load_file(DATA / name / "model.safetensors")


def _dequantized(stored: dict, module: str) -> torch.Tensor:
    """The stored weight of ``module`` dequantized exactly in float32: fp8 / unpacked int8 values
    times the stored scale expanded to [N, K] (bf16 scales and e8m0 exponents are exact in float32,
    and so is the product of an 8-bit value and an 8-bit-mantissa scale)."""
    if f"{module}.weight_packed" in stored:
        shape = torch.Size(stored[f"{module}.weight_shape"].tolist())
        q = unpack_from_int32(stored[f"{module}.weight_packed"], 8, shape)
    else:
        q = stored[f"{module}.weight"]
    n, k = q.shape
    return q.to(torch.float32) * scale_per_element(stored, module, n, k)


def _expert_modules(stored: dict, layer: str) -> dict[int, dict[str, str]]:
    """{expert: {gate_proj|up_proj|down_proj: stored module name}} of ``layer``'s experts."""
    out: dict[int, dict[str, str]] = {}
    for key in stored:
        if key.startswith(f"{layer}.experts.") and key.endswith(".weight_scale"):
            mod = key.rpartition(".")[0]
            e, proj = mod[len(layer) + len(".experts.") :].split(".")
            out.setdefault(int(e), {})[proj] = mod
    return out


def _per_tensor_w13(stored: dict, layer: str, e: int):
    """What oqcore holds for expert ``e`` 's w13 when gate and up were quantized with their own
    per-tensor scales: both dequantized, stacked, quantized again by the reference quantizer (one
    scale, the larger of the two to float32 rounding, as vLLM requantizes both shards)."""
    mods = _expert_modules(stored, layer)[e]
    w13 = torch.cat([_dequantized(stored, mods["gate_proj"]), _dequantized(stored, mods["up_proj"])])
    return oqcore.quantize_tensor(w13, "fp8_per_tensor_static", quantizer="torch")


@pytest.mark.parametrize("name", sorted(LOADABLE))
def test_loads_stored_bytes_with_the_matching_scheme(name, loaded):
    model = loaded(name)
    stored = _stored(name)
    weight_key, act_key = LOADABLE[name]
    layers = DENSE_LAYERS if name.startswith("dense") else MOE_LAYERS
    # (2) one wrapper per quantized layer, each with the scheme the config group declares
    assert sorted(model.oq_state.wrappers) == sorted(layers)
    targets = model.oq_state.config.to_dict()["targets"]
    assert targets == {layer: {"weight": weight_key, "activation": act_key} for layer in layers}
    # what the checkpoint ignores stays as stored (embeddings, lm_head, the routers)
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight"):
        if key in stored:
            got = model.get_parameter(key)
            assert got.dtype == torch.float32 and torch.equal(got, stored[key].float()), key
    # (1) the stored bytes
    for layer in layers:
        w = model.oq_state.wrappers[layer]
        if not layer.endswith("experts"):
            for attr in ("weight", "weight_scale"):
                got = getattr(w, attr)
                assert _same(got, _expected(stored, layer, got.dtype, attr)), (layer, attr)
            if act_key == "fp8_per_tensor_static":  # the calibrated input scale, bf16 -> float32 exactly
                assert w.input_scale.dtype == torch.float32 and w.input_scale.shape == (1,)
                assert torch.equal(w.input_scale, stored[f"{layer}.input_scale"].float().reshape(1)), layer
            else:
                assert not hasattr(w, "input_scale"), layer
            continue
        experts = _expert_modules(stored, layer.rpartition(".")[0])
        assert sorted(experts) == list(range(w.layout.num_experts)) == [0, 1]
        for e, mods in experts.items():
            for suffix in ("", "_scale"):
                full = getattr(w, "w2_weight" + suffix)[e]
                want = _expected(stored, mods["down_proj"], full.dtype, "weight" + suffix)
                assert _same(full, want.reshape(full.shape)), (e, "down", suffix)
            if weight_key == "fp8_per_tensor_static":
                ref = _per_tensor_w13(stored, layer.rpartition(".")[0], e)
                assert _same(w.w13_weight[e], ref.qdata) and _same(w.w13_weight_scale[e], ref.scale), e
                continue
            for suffix in ("", "_scale"):
                full = getattr(w, "w13_weight" + suffix)[e]
                parts = [_expected(stored, mods[p], full.dtype, "weight" + suffix) for p in ("gate_proj", "up_proj")]
                assert _same(full, torch.cat(parts).reshape(full.shape)), (e, suffix)


def test_per_tensor_experts_were_requantized_because_the_stored_scales_differ():
    """The moe_FP8_W8A16 case above is the lossy one only because llm-compressor gave gate and up
    their own per-tensor scales; checked here so the requantization branch is really exercised."""
    stored = _stored("moe_FP8_W8A16")
    differ = 0
    for layer in ("model.layers.0.mlp", "model.layers.1.mlp"):
        for mods in _expert_modules(stored, layer).values():
            g, u = (stored[f"{mods[p]}.weight_scale"] for p in ("gate_proj", "up_proj"))
            differ += int(not torch.equal(g, u))
    assert differ == 4  # every expert of both layers


# -- forward --------------------------------------------------------------------------------------


def _fake_quant(x: torch.Tensor, act_key: str | None, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` rounded through the activation key (quantize then dequantize, float32) by its reference
    quantizer; unchanged for weight-only. A static key uses the STORED ``input_scale``
    (compressed-tensors' fake quantization: ``clamp(x / s, +-448)`` to e4m3, times ``s``)."""
    if act_key is None:
        return x
    if input_scale is not None:
        s = input_scale.float()
        return ((x.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s).to(x.dtype)
    flat = x.reshape(-1, x.shape[-1]).float()
    qt = oqcore.quantize_tensor(flat, act_key, quantizer="torch", role="activation")
    return qt.dequantize(torch.float32).reshape(x.shape)


def _reference(name: str, model) -> torch.nn.Module:
    """A float32 transformers model built from the fixture's config (quantization_config removed)
    holding the stored high-precision tensors and every quantized weight exactly dequantized from
    the stored tensors (per-tensor MoE w13: from what oqcore holds, itself checked exactly above).
    With an activation key, each quantized layer's inputs (the experts' gate-up and down inputs
    too) are fake-quantized as oqcore's methods do."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads((DATA / name / "config.json").read_text())
    cfg.pop("quantization_config")
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    ref = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    stored = _stored(name)
    weight_key, act_key = LOADABLE[name]
    params = dict(ref.named_parameters())
    filled = set()
    with torch.no_grad():
        for key, t in stored.items():
            if key in params:
                params[key].copy_(t.float())
                filled.add(key)
        for layer, w in model.oq_state.wrappers.items():
            if not layer.endswith("experts"):
                params[f"{layer}.weight"].copy_(_dequantized(stored, layer))
                filled.add(f"{layer}.weight")
                s = stored[f"{layer}.input_scale"] if act_key == "fp8_per_tensor_static" else None
                ref.get_submodule(layer).register_forward_pre_hook(lambda m, a, s=s: (_fake_quant(a[0], act_key, s),))
                continue
            experts = ref.get_submodule(layer)
            for e, mods in _expert_modules(stored, layer.rpartition(".")[0]).items():
                if weight_key == "fp8_per_tensor_static":
                    w13 = w.w13_weight[e].float() * w.w13_weight_scale[e]
                else:
                    w13 = torch.cat([_dequantized(stored, mods["gate_proj"]), _dequantized(stored, mods["up_proj"])])
                experts.gate_up_proj[e].copy_(w13)
                experts.down_proj[e].copy_(_dequantized(stored, mods["down_proj"]))
            filled |= {f"{layer}.gate_up_proj", f"{layer}.down_proj"}
            experts.forward = _fake_quant_experts(experts, act_key)
    assert filled == set(params), sorted(set(params) - filled)  # nothing left at random init
    return ref


def _fake_quant_experts(experts, act_key):
    """transformers' eager Qwen3MoeExperts loop with each expert's inputs fake-quantized."""

    def forward(hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(experts.num_experts):
            tok, pos = torch.where(top_k_index == e)  # top_k_index: [T, top_k]
            if tok.numel() == 0:
                continue
            x = _fake_quant(hidden_states[tok], act_key)
            gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
            h = _fake_quant(experts.act_fn(gate) * up, act_key)
            y = torch.nn.functional.linear(h, experts.down_proj[e]) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    return forward


@pytest.mark.parametrize("name", sorted(LOADABLE))
def test_forward_within_bf16_rounding_of_the_dequantized_reference(name, monkeypatch):
    # the oracle's CPU backends (the Triton interpreter's forwards are compared elsewhere)
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    model = oqcore.load(DATA / name, dtype=torch.float32)
    assert not any(w.method.backend.name == "triton" for w in model.oq_state.wrappers.values())
    ref = _reference(name, model)
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
    # Bound: bf16 rounding (2^-7 relative, Frobenius, over the logits). The reference is exact
    # float32 dequantization and fake-quantization; the CPU kernels (cpu-int8) compute in bf16 steps
    # (2^-9 relative per rounding, adding up over 2 layers: measured 3e-3). Where every layer runs on
    # the float32 reference backend ("torch") the arithmetic is the reference's own and only the
    # summation order may differ: 2^-16 (measured 0). Measured against wrong references: without
    # the activation rounding 3e-2 (dense) / 4e-2 (MoE), the two experts of one layer swapped 9e-2,
    # one layer's weight 1 % off 1e-3 (caught where the bound is 2^-16).
    exact = {w.method.backend.name for w in model.oq_state.wrappers.values()} == {"torch"}
    assert _rel_err(got, want) < (2**-16 if exact else 2**-7), _rel_err(got, want)


# -- refusals -------------------------------------------------------------------------------------


def test_group128_int8_is_refused_by_name():
    with raises_naming(
        CheckpointError,
        str(DATA / "dense_W8A16" / "config.json"),
        "quantization_config.config_groups.W8A16: no oqcore scheme reads weights",
        "group_size: 128",
        "strategy: group",
        "type: int",
        "int8: weights {num_bits: 8, type: int, symmetric: True, strategy: channel",
    ):
        oqcore.load(DATA / "dense_W8A16")


def test_static_fp8_runs_with_the_stored_input_scale_not_a_dynamic_one(monkeypatch):
    """The FP8 (static activations) fixture's forward differs from a reference quantizing each
    input with a per-call (dynamic) per-tensor scale by far more than the bound above: the forward
    test can tell the stored input scale from a dynamic one."""
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    name = "dense_FP8"
    model = oqcore.load(DATA / name, dtype=torch.float32)
    saved = LOADABLE[name]
    try:
        LOADABLE[name] = ("fp8_per_tensor_static", "fp8_per_tensor_dynamic")
        ref = _reference(name, model)
    finally:
        LOADABLE[name] = saved
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert _rel_err(got, want) > 2**-7, _rel_err(got, want)


# -- the sources and llm-compressor's arithmetic ----------------------------------------------------


def _make_fixtures():
    sys.path.insert(0, str(DATA))
    try:
        import make_fixtures
    finally:
        sys.path.remove(str(DATA))
    return make_fixtures


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The bf16 sources, rebuilt from the seed by the generator's own ``make_source``."""
    mf = _make_fixtures()
    out = {kind: mf.make_source(kind, tmp_path_factory.mktemp(f"source-{kind}")) for kind in ("dense", "moe")}
    for kind, folder in out.items():
        # transformers' random init from the seed gave the same bytes in 5.17 (which wrote the
        # fixtures) and this one; if an upgrade changes it, commit the sources instead
        assert mf.tensors_sha256(folder) == VERSIONS["source_tensors_sha256"][kind], kind
    return out


def test_high_precision_tensors_are_the_sources(sources):
    """The fixtures' unquantized tensors (embeddings, norms, lm_head, routers) are the rebuilt
    sources', so the sources below are what llm-compressor quantized."""
    for name, spec in VERSIONS["fixtures"].items():
        src = load_file(sources[spec["source"]] / "model.safetensors")
        stored = _stored(name)
        plain = [k for k in stored if stored[k].dtype == torch.bfloat16 and not k.endswith(("_scale", "_shape"))]
        # dense: embed, lm_head, 4 layer norms, final norm; Qwen3-MoE adds 4 q/k norms and 2 routers
        assert len(plain) == (7 if spec["source"] == "dense" else 13), (name, len(plain))
        assert all(torch.equal(stored[k], src[k]) for k in plain), name
        # every source weight is in the fixture, as itself or quantized under its module's name
        modules = {k.rpartition(".")[0] for k in stored}
        assert {k.rpartition(".")[0] for k in src} <= modules, name


def test_llmcompressor_scales_are_computed_in_bf16(sources):
    """Why llm-compressor's bytes differ from oqcore's on bf16 checkpoints (docs/formats.md): its
    per-channel fp8 scale is amax / 448 evaluated in bf16, and the weight is divided by it in bf16
    before the cast to fp8; oqcore evaluates the same formula in float32."""
    src = load_file(sources["dense"] / "model.safetensors")
    stored = _stored("dense_FP8_DYNAMIC")
    differ = total = 0
    for layer in DENSE_LAYERS:
        w = src[f"{layer}.weight"]
        assert w.dtype == torch.bfloat16
        scale = w.abs().amax(dim=1, keepdim=True) / 448  # bf16 arithmetic
        assert torch.equal(stored[f"{layer}.weight_scale"], scale), layer
        q = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert _same(stored[f"{layer}.weight"], q), layer
        ours = oqcore.quantize_tensor(w, "fp8_per_channel_static", quantizer="torch")
        differ += int((ours.qdata.view(torch.uint8) != q.view(torch.uint8)).sum())
        total += q.numel()
    # measured on these 14 weights: 5408 of 180224 bytes (3.0 %; docs/formats.md quotes 3 % on a
    # bf16 4096x4096 weight); both sides are deterministic, so the count is exact
    assert (differ, total) == (5408, 180224)


def test_llmcompressor_mx_exponents_round_amax_up(sources):
    """llm-compressor's MXFP8 scale exponents are OCP MX v1.0's (oqcore's) or one larger, never
    smaller: compressed-tensors rounds each group's amax up to a power of two before taking the
    exponent (docs/formats.md)."""
    src = load_file(sources["dense"] / "model.safetensors")
    stored = _stored("dense_MXFP8A16")
    larger = total = 0
    for layer in DENSE_LAYERS:
        ours = oqcore.quantize_tensor(src[f"{layer}.weight"], "mxfp8", quantizer="torch")
        theirs = stored[f"{layer}.weight_scale"].to(torch.int16)
        delta = theirs - ours.scale.view(torch.uint8).to(torch.int16)
        assert set(delta.unique().tolist()) <= {0, 1}, layer
        larger += int(delta.sum())
        total += delta.numel()
    # measured: 26 of 5632 scales (0.46 %; docs/formats.md: about 0.4 %), the rest equal
    assert (larger, total) == (26, 5632)


def test_nvfp4_fused_siblings_share_one_global_scale_as_llmcompressor_writes(sources):
    """vLLM serves q/k/v and gate/up as one GEMM with one NVFP4 global scale (it keeps the max of
    the stored ones and does not re-quantize), so llm-compressor quantizes each group with one
    global scale; oqcore's nvfp4 does the same (KeyFormat.fused_outer_scale): the group's largest
    amax, through the quantizers' takes_amax."""
    model = oqcore.load(sources["dense"], "nvfp4")
    src = load_file(sources["dense"] / "model.safetensors")
    stored = _stored("dense_NVFP4A16")
    groups = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
    differing = 0
    for layer in ("model.layers.0", "model.layers.1"):
        for group in groups:
            names = [f"{layer}.{m}" for m in group]
            ours = [model.get_submodule(n).weight_global_scale for n in names]
            theirs = [stored[f"{n}.weight_global_scale"] for n in names]
            assert all(torch.equal(o, ours[0]) for o in ours) and all(torch.equal(t, theirs[0]) for t in theirs), names
            # the group's global scale is the one of its largest amax (its smallest global scale),
            # which llm-compressor stores rounded to bf16
            alone = [oqcore.quantize_tensor(src[f"{n}.weight"], "nvfp4", quantizer="torch").tensors["global_scale"] for n in names]
            assert torch.equal(ours[0], torch.stack(alone).min(dim=0).values), names
            differing += len({float(a) for a in alone}) > 1  # the members alone would differ
            assert torch.equal(ours[0].detach().bfloat16().float(), theirs[0].float()), (names, ours[0], theirs[0])
    assert differing >= 3  # of the 4 groups (two bf16 amaxes of one layer's gate and up coincide)
    # o_proj / down_proj stand alone
    o = "model.layers.0.self_attn.o_proj"
    alone = oqcore.quantize_tensor(src[f"{o}.weight"], "nvfp4", quantizer="torch").tensors["global_scale"]
    assert torch.equal(model.get_submodule(o).weight_global_scale, alone)
