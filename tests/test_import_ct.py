"""oqcore.load reads compressed-tensors checkpoints as stored (issue 11, import side).

The checkpoints are written by compressed-tensors' own compressors (``tests/ct_reference.py``).
Checked: (1) every quantized tensor of the loaded model holds the stored bytes (fp8 as stored,
int8 unpacked with compressed-tensors' helper, uint8 exponents as e8m0, bf16/f32 scales as float32
exactly), MoE experts stacked into w13 (gate then up) and w2; (2) the forward is within bf16 rounding
of the model rebuilt from compressed-tensors' own decompression (activations fake-quantized by the
activation key's reference quantizer for W8A8); (3) what oqcore cannot read is refused by name.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import oqcore
from oqcore import CheckpointError

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from ct_reference import write_ct_checkpoint
from test_ct_reference import ct_decompress

DENSE = ["FP8_W8A16", "FP8_DYNAMIC", "FP8_BLOCK", "MXFP8", "MXFP8A16", "W8A16_CHANNEL"]
MOE_ARCHS = ["mixtral", "qwen3_moe", "olmoe"]
# tiny MoE: I = 96 rows per gate/up, so 128-row blocks cannot be stacked (tested below as a refusal),
# and per-tensor gate/up scales differ (refused; a checkpoint with equal ones loads)
MOE_LOADABLE = ["FP8_DYNAMIC", "MXFP8", "MXFP8A16", "W8A16_CHANNEL"]
WITH_ACTIVATIONS = {"FP8_DYNAMIC", "FP8_BLOCK", "MXFP8"}
_written: dict = {}


def _write(src, scheme, tmp_path_factory, **kw):
    key = (str(src), scheme, tuple(sorted(kw.items())))
    if key not in _written:
        _written[key] = write_ct_checkpoint(src, tmp_path_factory.mktemp(f"ct-{scheme}"), scheme, **kw)
    return _written[key]


def _copy(folder, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(folder, out)
    return out


def _edit_tensors(folder, fn):
    f = folder / "model.safetensors"
    t = load_file(f)
    fn(t)
    save_file(t, f, metadata={"format": "pt"})


def _edit_qc(folder, fn):
    f = folder / "config.json"
    cfg = json.loads(f.read_text())
    fn(cfg["quantization_config"])
    f.write_text(json.dumps(cfg))


def _expected(stored: dict, module: str, spec_dtype: torch.dtype, attr: str) -> torch.Tensor:
    """A stored tensor by the dtype rule: weight_packed unpacked to int8, uint8 scales as e8m0,
    float scales as float32."""
    if attr == "weight" and f"{module}.weight_packed" in stored:
        shape = torch.Size(stored[f"{module}.weight_shape"].tolist())
        return unpack_from_int32(stored[f"{module}.weight_packed"], 8, shape)
    t = stored[f"{module}.{attr}"]
    if t.dtype == torch.uint8 and spec_dtype == torch.float8_e8m0fnu:
        return t.view(torch.float8_e8m0fnu)
    return t.to(spec_dtype) if t.is_floating_point() and t.dtype != spec_dtype and spec_dtype == torch.float32 else t


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (float8 compared as bytes: -0.0 / NaN patterns count)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.element_size() == 1:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


_EXPERT = re.compile(r"(.*)\.experts\.(\d+)\.(\w+)$")
_SHARD = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1, "w2": None, "down_proj": None}


def _in_memory(prefix: str) -> str:
    return prefix.replace("block_sparse_moe", "mlp")  # transformers' Mixtral renaming


def _assert_stored_bytes(model, folder):
    stored = load_file(folder / "model.safetensors")
    modules = sorted({k.rpartition(".")[0] for k in stored if k.endswith(".weight_scale")})
    assert modules
    seen = set()
    for mod in modules:
        m = _EXPERT.fullmatch(mod)
        if m is None:
            w = model.get_submodule(mod)
            for attr in ("weight", "weight_scale"):
                got = getattr(w, attr)
                assert _same(got, _expected(stored, mod, got.dtype, attr)), (mod, attr)
            if f"{mod}.bias" in stored:
                assert torch.equal(w.bias, stored[f"{mod}.bias"].to(w.bias.dtype))
            seen.add(mod)
            continue
        prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
        fused = model.get_submodule(f"{_in_memory(prefix)}.experts")
        shard = _SHARD[proj]
        name = "w2_weight" if shard is None else "w13_weight"
        for suffix in ("", "_scale"):
            full = getattr(fused, name + suffix)[e]
            want = _expected(stored, mod, full.dtype, "weight" + suffix)
            if shard is not None and full.shape[0] == 2 * want.shape[0]:
                rows = want.shape[0]
                full = full[shard * rows : (shard + 1) * rows]
            assert _same(full, want.reshape(full.shape)), (mod, suffix)
        seen.add(f"{prefix}.experts")
    assert set(model.oq_state.wrappers) == {_in_memory(s) for s in seen}


def _reference(src, folder, scheme, causal: bool) -> torch.nn.Module:
    """The source model (float32) with every quantized weight replaced by compressed-tensors' own
    decompression of the stored tensors; with activation quantization, each quantized layer's
    input fake-quantized by the activation key's reference quantizer (dense models only)."""
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if causal else AutoModel
    ref = cls.from_pretrained(src, dtype=torch.float32).eval()
    stored = load_file(folder / "model.safetensors")
    modules = sorted({k.rpartition(".")[0] for k in stored if k.endswith(".weight_scale")})
    with torch.no_grad():
        for mod in modules:
            deq = ct_decompress(stored, mod, scheme, torch.float32).float()
            m = _EXPERT.fullmatch(mod)
            if m is None:
                ref.get_submodule(mod).weight.copy_(deq)
                continue
            experts = ref.get_submodule(f"{_in_memory(m.group(1))}.experts")
            e, shard = int(m.group(2)), _SHARD[m.group(3)]
            if shard is None:
                experts.down_proj[e].copy_(deq)
            else:
                rows = deq.shape[0]
                experts.gate_up_proj[e, shard * rows : (shard + 1) * rows].copy_(deq)
    return ref


def _fake_quant_inputs(ref, model):
    """Hooks quantizing each quantized linear's input as the loaded layer's activation key does."""
    hooks = []
    for name, w in model.oq_state.wrappers.items():
        fmt = w.method.formats.activation
        if fmt is None:
            continue

        static = w.input_scale.detach().clone() if fmt.key.scale.static else None

        def hook(mod, args, fmt=fmt, static=static):
            x = args[0]
            flat = x.reshape(-1, x.shape[-1]).float()
            if static is not None:  # the stored input scale: clamp(x / s, +-448) to e4m3, times s
                q = (flat / static).clamp(-448, 448).to(torch.float8_e4m3fn)
                return ((q.float() * static).reshape(x.shape).to(x.dtype),)
            out = fmt.reference.quantize(flat, None)
            named = dict(out) if isinstance(out, dict) else dict(zip(fmt.tensors, out))
            return (fmt.dequantize(*(named[n] for n in fmt.tensors), torch.float32, None).reshape(x.shape).to(x.dtype),)

        hooks.append(ref.get_submodule(name).register_forward_pre_hook(hook))
    return hooks


def _minilm_err(model, ref, fake_quant: bool = True, like=None) -> float:
    """Relative error of ``model``'s MiniLM embeddings against ``ref`` (float32) on fixed token ids,
    each quantized layer's input of ``ref`` fake-quantized as the activation keys of ``like``
    (default ``model``) do when ``fake_quant``."""
    hooks = _fake_quant_inputs(ref, like if like is not None else model) if fake_quant else []
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            return _rel_err(model(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state)
    finally:
        for h in hooks:
            h.remove()


def w8a8_reference(weight: str) -> dict:
    """A config for a stored checkpoint whose linears hold ``weight``: keep the stored layers, run
    the ``torch`` reference forward (what a fake-quant reference computes op for op; see
    :func:`test_minilm_reads_stored_bytes_and_forward` for why W8A8 end-to-end comparisons need it)."""
    return {"linear": {"weight": weight}, "backend": {"linear": "torch"}}


STORED_WEIGHT = {"FP8_DYNAMIC": "fp8_per_channel_static", "FP8_BLOCK": "fp8_per_block_static", "MXFP8": "mxfp8"}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("scheme", DENSE)
def test_minilm_reads_stored_bytes_and_forward(scheme, minilm, tmp_path_factory, monkeypatch):
    # the oracle's reference backend (the Triton interpreter's W8A8 forward is compared elsewhere)
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    folder = _write(minilm, scheme, tmp_path_factory)
    # W8A8: the torch backend, which the fake-quant reference emulates op for op. The CPU kernels
    # agree with it per layer within float32 rounding (tests/test_cpu_forwards.py), but through 6
    # W8A8 layers one activation that lands on the other side of an fp8 rounding boundary cascades
    # (measured: 3.5 % on this input); this test is about the stored bytes and their meaning.
    pin = w8a8_reference(STORED_WEIGHT[scheme]) if scheme in WITH_ACTIVATIONS else None
    model = oqcore.load(folder, pin, dtype=torch.float32)
    _assert_stored_bytes(model, folder)
    assert len(model.oq_state.wrappers) == 37  # every Linear of MiniLM (nothing is named lm_head)
    ref = _reference(minilm, folder, scheme, causal=False)
    err = _minilm_err(model, ref, fake_quant=scheme in WITH_ACTIVATIONS)
    # weight-only: only summation order differs; W8A8: a rounding of an activation may flip
    assert not any(w.method.backend.name == "triton" for w in model.oq_state.wrappers.values())
    # within bf16 rounding through 6 layers: the CPU kernels (cpu, cpu-int8) compute in bf16 steps; a wrong
    # scale or layout gives errors of 10 % and more
    assert err < 2**-6


@pytest.mark.parametrize("scheme", MOE_LOADABLE)
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_reads_stored_bytes(arch, scheme, tiny_moe, tmp_path_factory):
    folder = _write(tiny_moe(arch), scheme, tmp_path_factory)
    model = oqcore.load(folder)
    _assert_stored_bytes(model, folder)
    kinds = {type(w).__name__ for w in model.oq_state.wrappers.values()}
    assert kinds == {"QuantizedLinear", "QuantizedMoE"}
    # the routers stay in high precision, as the checkpoint's ignore list says
    assert not any(n.endswith(("mlp.gate", "block_sparse_moe.gate")) for n in model.oq_state.wrappers)


@pytest.mark.parametrize("scheme", ["MXFP8A16", "W8A16_CHANNEL"])
def test_moe_weight_only_forward(scheme, tiny_moe, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    src = tiny_moe("qwen3_moe")
    folder = _write(src, scheme, tmp_path_factory)
    model = oqcore.load(folder, dtype=torch.float32)
    ref = _reference(src, folder, scheme, causal=True)
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, ref(input_ids=ids).logits
    assert _rel_err(got, want) < 2**-6  # bf16 rounding (the CPU kernels compute in bf16 steps)


def test_moe_block_with_128_multiples(tiny_moe, tmp_path_factory):
    src = tiny_moe("qwen3_moe", hidden_size=256, intermediate_size=128)
    folder = _write(src, "FP8_BLOCK", tmp_path_factory, ignore=("lm_head", "re:.*self_attn.*"))
    model = oqcore.load(folder)
    _assert_stored_bytes(model, folder)
    assert all(type(w).__name__ == "QuantizedMoE" for w in model.oq_state.wrappers.values())


def test_moe_per_tensor_with_equal_gate_and_up_scales(tiny_moe, tmp_path_factory, tmp_path):
    folder = _copy(_write(tiny_moe("olmoe"), "FP8_W8A16", tmp_path_factory), tmp_path)

    def align(t):
        for k in [k for k in t if k.endswith("gate_proj.weight_scale")]:
            t[k.replace("gate_proj", "up_proj")] = t[k].clone()

    _edit_tensors(folder, align)
    model = oqcore.load(folder)
    _assert_stored_bytes(model, folder)
    assert model.oq_state.config.to_dict()["targets"]["model.layers.0.mlp.experts"] == {
        "weight": "fp8_per_tensor_static",
        "activation": None,
    }


# -- refusals ----------------------------------------------------------------------------------------


def test_moe_per_tensor_gate_and_up_scales_differ_are_requantized_as_vllm_does(tiny_moe, tmp_path_factory):
    """llm-compressor quantizes gate and up apart (two per-tensor scales); oqcore keeps one w13 scale
    per expert, so it dequantizes both shards and quantizes the expert's w13 again (vLLM requantizes
    both shards to one scale too). The only lossy read; down_proj stays as stored."""
    from safetensors.torch import load_file

    folder = _write(tiny_moe("qwen3_moe"), "FP8_W8A16", tmp_path_factory)
    model = oqcore.load(folder)
    stored = {}
    for f in sorted(folder.glob("*.safetensors")):
        stored.update(load_file(f))
    moe = model.oq_state.wrappers["model.layers.0.mlp.experts"]
    base = "model.layers.0.mlp.experts"
    differ = 0
    for e in range(moe.layout.num_experts):
        sg, su = (stored[f"{base}.{e}.{p}.weight_scale"].float() for p in ("gate_proj", "up_proj"))
        differ += int(not torch.equal(sg, su))
        g = stored[f"{base}.{e}.gate_proj.weight"].float() * sg
        u = stored[f"{base}.{e}.up_proj.weight"].float() * su
        ref = oqcore.quantize_tensor(torch.cat([g, u]), "fp8_per_tensor_static", quantizer="torch")
        assert torch.equal(moe.w13_weight[e].view(torch.uint8), ref.qdata.view(torch.uint8)), e
        assert torch.equal(moe.w13_weight_scale[e], ref.scale), e
        torch.testing.assert_close(moe.w13_weight_scale[e], torch.maximum(sg, su), rtol=2**-20, atol=0)  # vLLM's max scale
        assert torch.equal(moe.w2_weight[e].view(torch.uint8), stored[f"{base}.{e}.down_proj.weight"].view(torch.uint8))
    assert differ  # the case is real: llm-compressor's scales differ


def test_moe_blocks_straddling_gate_and_up(tiny_moe, tmp_path_factory):
    folder = _write(tiny_moe("mixtral"), "FP8_BLOCK", tmp_path_factory)
    with pytest.raises(
        CheckpointError, match=r"'model.layers.0.mlp.experts': its scales cover blocks of 128 rows"
    ) as e:
        oqcore.load(folder)
    assert "96 rows each, not a multiple of 128" in str(e.value)
    assert "block_sparse_moe.experts.0.w1" in str(e.value)


def test_gpt_oss_per_expert_is_refused(tiny_moe, tmp_path_factory):
    folder = _write(tiny_moe("gpt_oss"), "FP8_DYNAMIC", tmp_path_factory)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.mlp.experts.0.") as e:
        oqcore.load(folder)
    assert "GptOssForCausalLM" in str(e.value) and "fused" in str(e.value)


def test_group128_int8_is_refused(minilm, tmp_path_factory):
    folder = _write(minilm, "W8A16", tmp_path_factory)
    with pytest.raises(
        CheckpointError, match=r"config.json: quantization_config.config_groups.group_0: no oqcore scheme reads weights"
    ) as e:
        oqcore.load(folder)
    msg = str(e.value)
    assert "group_size: 128" in msg and "strategy: group" in msg and "type: int" in msg
    assert (
        "oqcore reads: " in msg and "int8: weights {num_bits: 8, type: int, symmetric: True, strategy: channel" in msg
    )


def test_input_scale_of_a_dynamic_group_is_refused(minilm, tmp_path_factory, tmp_path):
    """An FP8 checkpoint whose config says dynamic input activations but stores input_scale tensors:
    the tensor is named, and so is what reads it (static input_activations)."""
    folder = _copy(_write(minilm, "FP8", tmp_path_factory), tmp_path)
    _edit_qc(folder, lambda qc: qc["config_groups"]["group_0"]["input_activations"].update(dynamic=True))
    with pytest.raises(CheckpointError, match=r"unexpected tensor '.*\.input_scale'") as e:
        oqcore.load(folder)
    assert "static input activation scale" in str(e.value) and "dynamic: false" in str(e.value)


def test_asymmetric_weights_are_refused(minilm, tmp_path_factory, tmp_path):
    folder = _copy(_write(minilm, "W8A16_CHANNEL", tmp_path_factory), tmp_path)
    _edit_qc(folder, lambda qc: qc["config_groups"]["group_0"]["weights"].update(symmetric=False))
    with pytest.raises(CheckpointError, match=r"group_0: no oqcore scheme reads weights .*symmetric: False") as e:
        oqcore.load(folder)
    assert "asymmetric weights with zero points" in str(e.value)


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "torchao"])
def test_other_quant_methods_are_refused(method, minilm, tmp_path):
    folder = _copy(minilm, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "bits": 4}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=rf"config.json: the checkpoint is already quantized \(quant_method='{method}'\), in a format oqcore cannot run",
    ) as e:
        oqcore.load(folder)
    # what oqcore does read, by name (FineGrainedFP8 and ModelOpt: tests/test_import_peers.py)
    assert "'compressed-tensors', transformers FineGrainedFP8 ('fp8') and NVIDIA ModelOpt FP8" in str(e.value)


MALFORMED = [
    ("no-groups", lambda qc: qc.pop("config_groups"), ["quantization_config.config_groups must be a non-empty JSON object"]),
    ("empty-groups", lambda qc: qc.update(config_groups={}), ["config_groups must be a non-empty JSON object"]),
    ("bad-num-bits", lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits="eight"),
     ["not a valid compressed-tensors config", "config_groups.group_0.weights.num_bits", "'eight'"]),
    ("bad-strategy", lambda qc: qc["config_groups"]["group_0"]["weights"].update(strategy="diagonal"),
     ["not a valid compressed-tensors config", "group_0.weights.strategy"]),
    ("no-targets", lambda qc: qc["config_groups"]["group_0"].pop("targets"), ["not a valid compressed-tensors config", "group_0.targets"]),
    ("frozen-status", lambda qc: qc.update(quantization_status="frozen"), ["quantization_status is 'frozen'", "'compressed'"]),
    ("bad-ignore-regex", lambda qc: qc.update(ignore=["lm_head", "re:("]),
     ["quantization_config.ignore[1] = 're:(' is not a valid regular expression"]),
    ("bad-target-regex", lambda qc: qc["config_groups"]["group_0"].update(targets=["re:.*query[", "Linear"]),
     ["quantization_config.config_groups.group_0.targets[0] = 're:.*query[' is not a valid regular expression"]),
    ("kv-cache", lambda qc: qc.update(kv_cache_scheme={"num_bits": 8, "type": "float", "strategy": "tensor"}),
     ["quantization_config.kv_cache_scheme is set"]),
    ("output-activations", lambda qc: qc["config_groups"]["group_0"].update(
        output_activations={"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}), ["group_0.output_activations is set"]),
    ("targets-nothing", lambda qc: qc["config_groups"]["group_0"].update(targets=["Conv2d"]), ["match no layer of BertModel"]),
]  # fmt: skip


@pytest.mark.parametrize("edit, culprits", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_config_is_refused(edit, culprits, minilm, tmp_path_factory, tmp_path):
    folder = _copy(_write(minilm, "FP8_DYNAMIC", tmp_path_factory), tmp_path)
    _edit_qc(folder, edit)
    with pytest.raises(CheckpointError) as e:
        oqcore.load(folder)
    msg = str(e.value)
    assert str(folder / "config.json") in msg
    for c in culprits:
        assert c in msg, (c, msg)


LAYER = "encoder.layer.0.attention.self.query"
TENSORS = [
    ("missing-scale", "FP8_DYNAMIC", lambda t: t.pop(f"{LAYER}.weight_scale"),
     [f"missing tensor '{LAYER}.weight_scale'", f"quantized layer '{LAYER}'", "group 'group_0'"]),
    ("missing-weight", "MXFP8", lambda t: t.pop(f"{LAYER}.weight"), [f"missing tensor '{LAYER}.weight'"]),
    ("missing-packed-shape", "W8A16_CHANNEL", lambda t: t.pop(f"{LAYER}.weight_shape"), [f"missing tensor '{LAYER}.weight_shape'"]),
    ("extra-zero-point", "W8A16_CHANNEL", lambda t: t.__setitem__(f"{LAYER}.weight_zero_point", torch.zeros(384, 1, dtype=torch.int8)),
     [f"unexpected tensor '{LAYER}.weight_zero_point'", "asymmetric"]),
    ("extra-input-scale", "FP8_DYNAMIC", lambda t: t.__setitem__(f"{LAYER}.input_scale", torch.ones(1)),
     [f"unexpected tensor '{LAYER}.input_scale'", "static input activation scale"]),
    ("scale-int32", "FP8_DYNAMIC", lambda t: t.__setitem__(f"{LAYER}.weight_scale", torch.ones(384, 1, dtype=torch.int32)),
     [f"tensor '{LAYER}.weight_scale' is I32 [384, 1]", "expects float32 [384, 1]"]),
    ("weight-bf16", "FP8_W8A16", lambda t: t.__setitem__(f"{LAYER}.weight", torch.ones(384, 384, dtype=torch.bfloat16)),
     [f"tensor '{LAYER}.weight' is BF16 [384, 384]", "expects float8_e4m3fn [384, 384]"]),
    ("scale-shape", "MXFP8", lambda t: t.__setitem__(f"{LAYER}.weight_scale", torch.ones(384, 6, dtype=torch.uint8)),
     [f"tensor '{LAYER}.weight_scale' is U8 [384, 6]", "expects float8_e8m0fnu [384, 12]", "or its bytes as uint8"]),
    ("packed-int8", "W8A16_CHANNEL", lambda t: t.__setitem__(f"{LAYER}.weight_packed", torch.ones(384, 96, dtype=torch.int8)),
     [f"tensor '{LAYER}.weight_packed' is I8 [384, 96]", "expects int32 [384, 96]"]),
    ("packed-shape-wrong", "W8A16_CHANNEL", lambda t: t.__setitem__(f"{LAYER}.weight_shape", torch.tensor([384, 380])),
     [f"tensor '{LAYER}.weight_shape' says [384, 380]", "expects [384, 384]"]),
    ("zero-scale", "FP8_DYNAMIC", lambda t: t[f"{LAYER}.weight_scale"].view(-1)[3].fill_(0),
     ["damaged compressed-tensors checkpoint", f"tensor '{LAYER}.weight_scale' holds 1 of 384"]),
    ("nan-e8m0", "MXFP8", lambda t: t[f"{LAYER}.weight_scale"].view(-1)[5].fill_(255),
     ["damaged compressed-tensors checkpoint", f"'{LAYER}.weight_scale'"]),
]  # fmt: skip


@pytest.mark.parametrize("scheme, edit, culprits", [m[1:] for m in TENSORS], ids=[m[0] for m in TENSORS])
def test_bad_tensors_are_refused(scheme, edit, culprits, minilm, tmp_path_factory, tmp_path):
    folder = _copy(_write(minilm, scheme, tmp_path_factory), tmp_path)
    _edit_tensors(folder, edit)
    with pytest.raises(CheckpointError) as e:
        oqcore.load(folder)
    msg = str(e.value)
    for c in culprits:
        assert c in msg, (c, msg)


def test_ignored_layer_holding_quantized_tensors(minilm, tmp_path_factory, tmp_path):
    folder = _copy(_write(minilm, "FP8_DYNAMIC", tmp_path_factory), tmp_path)
    _edit_qc(folder, lambda qc: qc.update(ignore=["lm_head", "pooler.dense"]))
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'pooler.dense.weight(_scale)?' \(.*\) is quantized, but config.json's quantization_config does not quantize layer 'pooler.dense'",
    ):
        oqcore.load(folder)


def test_a_different_config_is_refused(minilm, tmp_path_factory):
    folder = _write(minilm, "FP8_DYNAMIC", tmp_path_factory)
    with pytest.raises(oqcore.ConfigError, match=r"linear weight mxfp8 conflicts with compressed-tensors checkpoint .*, which stores layer 'encoder\.layer\.0\.attention\.self\.query' already quantized as fp8_per_channel_static"):
        oqcore.load(folder, "mxfp8")
