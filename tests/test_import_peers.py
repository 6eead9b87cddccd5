"""oqcore.load reads transformers FineGrainedFP8 and NVIDIA ModelOpt FP8 checkpoints as stored
(issue 11, import side; the translation is oqcore/loading/peer_configs.py).

The checkpoints are written as the peers write them:

- FineGrainedFP8: transformers' own quantizer op, ``transformers/integrations/finegrained_fp8.py``
  ``Fp8Quantize._quantize_one`` (per block: ``scale = fp8_max / amax``, ``q = clamp(w * scale)``,
  stored ``weight_scale_inv = 1 / scale`` float32) on the modules transformers' ``replace_with_fp8_linear``
  converts (every ``nn.Linear`` and fused experts module but those ``should_convert_module`` skips),
  with the per-expert names ``save_pretrained`` writes; ``quantization_config`` is
  ``FineGrainedFP8Config(...).to_dict()``. (transformers cannot load them on this CPU-only machine:
  its FP8 quantizer needs accelerate; its own dequantizer ``Fp8Dequantize._dequantize_one`` is
  called below to check the meaning of the stored scale.)
- ModelOpt: ModelOpt's export formula, ``modelopt/torch/export/unified_export_hf.py``
  ``_export_quantized_weight`` and ``quant_utils.py::to_quantized_weight`` (``weight_scale = amax /
  448`` float32 scalar, or ``[N]`` per channel; ``q = (w / weight_scale).to(fp8)``; ``input_scale``
  float32 scalar), in the layout vLLM's ``layers/quantization/modelopt.py`` loads
  (``ModelOptFp8LinearMethod`` / ``ModelOptFp8PcPtLinearMethod.create_weights``), metadata in
  ``hf_quant_config.json`` or ``config.json`` (``convert_hf_quant_config_format``).

Checked: the loaded layers hold the stored bytes (bit-exact), the forward is within bf16 rounding of
a fake-quant reference (dequantized weights, inputs quantized by the activation key's reference
quantizer), MoE experts stack like compressed-tensors', ``oq explain`` reads the folders, and every
bad input is one CheckpointError naming the file and the field or tensor.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import oqcore
from oqcore import CheckpointError
from oqcore.loading.peer_configs import modelopt_exclude_patterns, transformers_skip_patterns

pytest.importorskip("compressed_tensors")
from test_import_ct import _minilm_err, _same, w8a8_reference
from typer.testing import CliRunner

F = "model.safetensors"
FP8 = torch.float8_e4m3fn
_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(\w+)$")
_SHARD = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1, "w2": None, "down_proj": None}


# -- writers --------------------------------------------------------------------------------------------


def _linear_modules(src: Path) -> set[str]:
    from oqcore.loading.meta import build_meta_model

    return {n for n, m in build_meta_model(src).named_modules() if type(m) is torch.nn.Linear}


def _converted(src: Path, keys, skip) -> list[str]:
    """The checkpoint modules whose weight transformers' FineGrainedFP8 converts: nn.Linear modules
    and per-expert projections (their fused experts module is converted), not skipped by
    ``should_convert_module`` (``skip`` None: transformers' default list, here ``lm_head``)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    patterns = ["lm_head"] if skip is None else list(skip)
    linears = _linear_modules(src)
    out = []
    for k in keys:
        mod = k.removesuffix(".weight")
        m = _EXPERT.fullmatch(mod)
        owner = m.group(1).replace("block_sparse_moe", "mlp") if m else mod
        if k.endswith(".weight") and (m is not None or mod in linears) and should_convert_module(owner, patterns):
            out.append(mod)
    return out


def write_finegrained(src: Path, out: Path, block=(128, 128), skip=None, **cfg_kw) -> Path:
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.utils.quantization_config import FineGrainedFP8Config

    shutil.copytree(src, out)
    qc = FineGrainedFP8Config(weight_block_size=block, modules_to_not_convert=skip, **cfg_kw)
    op = Fp8Quantize(SimpleNamespace(quantization_config=qc))
    t = load_file(out / F)
    for mod in _converted(src, list(t), skip):
        got = op.convert({f"{mod}.weight": t.pop(f"{mod}.weight")})
        assert got[f"{mod}.weight"].dtype == FP8, f"transformers left {mod} unquantized (not a multiple of the block)"
        t.update(got)
    save_file(t, out / F, metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = json.loads(json.dumps(qc.to_dict()))
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def write_modelopt(src: Path, out: Path, algo="FP8", exclude=("lm_head",), where="file", seed=0) -> Path:
    shutil.copytree(src, out)
    t = load_file(out / F)
    g = torch.Generator().manual_seed(seed)
    mods = _converted(src, list(t), exclude)
    for mod in mods:
        w = t[f"{mod}.weight"]
        if algo == "FP8":
            scale = torch.tensor(w.float().abs().amax().item() / 448.0)  # ModelOpt: amax.item() / maxbound
            t[f"{mod}.weight"] = (w / scale).to(FP8)
            # a calibrated static activation scale (amax / 448): any positive float32 scalar
            t[f"{mod}.input_scale"] = (torch.rand((), generator=g) * 4 + 1) / 448
        else:  # FP8_PER_CHANNEL_PER_TOKEN: per output channel, no input scale
            scale = w.float().abs().amax(dim=1) / 448.0
            t[f"{mod}.weight"] = (w / scale[:, None]).to(FP8)
        t[f"{mod}.weight_scale"] = scale.to(torch.float32)
    save_file(t, out / F, metadata={"format": "pt"})
    hf = {
        "producer": {"name": "modelopt", "version": "0.39.0"},
        "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None, "exclude_modules": list(exclude)},
    }
    if where == "file":
        (out / "hf_quant_config.json").write_text(json.dumps(hf))
    else:
        cfg = json.loads((out / "config.json").read_text())
        if where == "config-flat":  # what ModelOpt's convert_hf_quant_config_format writes into config.json
            cfg["quantization_config"] = {"config_groups": {"group_0": {"targets": ["Linear"]}}, "ignore": list(exclude),
                                          "quant_algo": algo, "producer": hf["producer"], "quant_method": "modelopt"}  # fmt: skip
        else:
            cfg["quantization_config"] = {"quant_method": "modelopt", **hf}
        (out / "config.json").write_text(json.dumps(cfg))
    return out


_made: dict = {}


def _folder(kind, src, tmp_path_factory, **kw) -> Path:
    key = (kind, str(src), tuple(sorted((k, str(v)) for k, v in kw.items())))
    if key not in _made:
        out = tmp_path_factory.mktemp(kind) / "ckpt"
        _made[key] = (write_finegrained if kind == "fg" else write_modelopt)(src, out, **kw)
    return _made[key]


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    return out


def _load(folder, config=None, **kw):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = oqcore.load(folder, config, **kw)
    return model, [str(w.message) for w in seen if issubclass(w.category, UserWarning)]


# -- what the loaded model holds --------------------------------------------------------------------------


def _stored_scale(stored: dict, mod: str) -> torch.Tensor:
    return stored[f"{mod}.weight_scale_inv"] if f"{mod}.weight_scale_inv" in stored else stored[f"{mod}.weight_scale"]


def _assert_stored_bytes(model, folder: Path, requantized_w13: bool = False) -> set[str]:
    """Every quantized tensor of the model is the stored one (scales as float32, reshaped only);
    returns the wrapped layer names."""
    stored = load_file(folder / F)
    quantized = sorted({k.rpartition(".")[0] for k, v in stored.items() if v.dtype == FP8})
    assert quantized
    seen = set()
    for mod in quantized:
        q, s = stored[f"{mod}.weight"], _stored_scale(stored, mod).float()
        m = _EXPERT.fullmatch(mod)
        if m is None:
            w = model.oq_state.wrappers[mod]
            assert _same(w.weight, q), mod
            assert torch.equal(w.weight_scale, s.reshape(w.weight_scale.shape)), mod
            seen.add(mod)
            continue
        fused = m.group(1).replace("block_sparse_moe", "mlp")
        w, e, shard = model.oq_state.wrappers[fused], int(m.group(2)), _SHARD[m.group(3)]
        seen.add(fused)
        if shard is None:
            assert _same(w.w2_weight[e], q) and torch.equal(
                w.w2_weight_scale[e], s.reshape(w.w2_weight_scale[e].shape)
            ), mod
            continue
        if requantized_w13:
            continue
        rows = q.shape[0]
        assert _same(w.w13_weight[e, shard * rows : (shard + 1) * rows], q), mod
        srows = w.w13_weight_scale.shape[1] // 2
        assert torch.equal(w.w13_weight_scale[e, shard * srows : (shard + 1) * srows], s.reshape(srows, -1)), mod
    assert set(model.oq_state.wrappers) == seen
    return seen


def _dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``q * s`` with ``s`` one value, one per row, or one per block (ceil-sized grid), float32."""
    n, k = q.shape
    s = s.float().reshape(1, 1) if s.numel() == 1 else s.float().reshape(s.shape[0], -1)
    r, c = -(-n // s.shape[0]), -(-k // s.shape[1])
    return q.float() * s.repeat_interleave(r, 0)[:n].repeat_interleave(c, 1)[:, :k]


def _forward_vs_fake_quant(model, src: Path, folder: Path) -> float:
    """Relative error of the loaded MiniLM's output against the float32 source with every quantized
    weight dequantized from the stored tensors and every quantized layer's input fake-quantized
    by the loaded layer's activation key (reference quantizer)."""
    from transformers import AutoModel

    ref = AutoModel.from_pretrained(src, dtype=torch.float32).eval()
    stored = load_file(folder / F)
    with torch.no_grad():
        for mod in model.oq_state.wrappers:
            ref.get_submodule(mod).weight.copy_(_dequant(stored[f"{mod}.weight"], _stored_scale(stored, mod)))
    return _minilm_err(model, ref)


def _targets(model) -> set[tuple]:
    return {(t["weight"], t["activation"]) for t in model.oq_state.config.to_dict()["targets"].values()}


# -- FineGrainedFP8 ----------------------------------------------------------------------------------------


def test_finegrained_block_minilm_reads_stored_bytes_and_forward(minilm, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    folder = _folder("fg", minilm, tmp_path_factory)
    model, warned = _load(folder, w8a8_reference("fp8_per_block_static"), dtype=torch.float32)
    assert len(_assert_stored_bytes(model, folder)) == 37  # every Linear of MiniLM (no lm_head to skip)
    assert _targets(model) == {("fp8_per_block_static", "fp8_per_block_dynamic")}  # DeepSeek-V3's W8A8
    assert not warned
    # within bf16 rounding through 6 layers; a scale read as its inverse gives errors of 100 % and more
    assert _forward_vs_fake_quant(model, minilm, folder) < 2**-6


def test_finegrained_scale_inv_is_a_multiplier_as_transformers_dequantizes(minilm, tmp_path_factory):
    """transformers' own dequantizer of the stored pair equals oqcore's dequantized weight."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    folder = _folder("fg", minilm, tmp_path_factory)
    model = oqcore.load(folder, dtype=torch.float32)
    stored = load_file(folder / F)
    deq = Fp8Dequantize(None)
    for mod in ("encoder.layer.0.attention.self.query", "encoder.layer.5.output.dense"):
        theirs = deq._dequantize_one(stored[f"{mod}.weight"], stored[f"{mod}.weight_scale_inv"], torch.float32)
        w = model.oq_state.wrappers[mod]
        ours = w.method.formats.weight.dequantize(w.weight, w.weight_scale, torch.float32, None)
        assert torch.equal(theirs, ours), mod


@pytest.mark.parametrize("scale_name", ["weight_scale_inv", "weight_scale"], ids=["transformers", "vllm-autofp8"])
def test_finegrained_per_tensor_minilm(scale_name, minilm, tmp_path_factory, tmp_path, monkeypatch):
    """``weight_block_size: null``: one scale per tensor, named weight_scale_inv by transformers'
    FP8Linear and weight_scale by vLLM / AutoFP8 checkpoints; dynamic per-tensor activations."""
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    folder = _copy(_folder("fg", minilm, tmp_path_factory, block=None), tmp_path)
    if scale_name == "weight_scale":
        t = load_file(folder / F)
        for k in [k for k in t if k.endswith(".weight_scale_inv")]:
            t[k.removesuffix("_inv")] = t.pop(k).reshape(())
        save_file(t, folder / F, metadata={"format": "pt"})
    model, _ = _load(folder, w8a8_reference("fp8_per_tensor_static"), dtype=torch.float32)
    assert len(_assert_stored_bytes(model, folder)) == 37
    assert _targets(model) == {("fp8_per_tensor_static", "fp8_per_tensor_dynamic")}
    assert _forward_vs_fake_quant(model, minilm, folder) < 2**-6


def test_finegrained_modules_to_not_convert_keep_transformers_meaning(minilm, tmp_path_factory):
    """A suffix ("attention.output.dense") and a regex prefix ("encoder.layer.[45]"): those layers are
    stored in high precision and stay so."""
    skip = ["attention.output.dense", r"encoder.layer.[45]"]
    folder = _folder("fg", minilm, tmp_path_factory, skip=skip)
    model = oqcore.load(folder, dtype=torch.float32)
    wrapped = _assert_stored_bytes(model, folder)
    assert not any(
        n.endswith("attention.output.dense") or n.startswith(("encoder.layer.4.", "encoder.layer.5.")) for n in wrapped
    )
    assert "encoder.layer.0.attention.self.query" in wrapped and "pooler.dense" in wrapped
    assert len(wrapped) == 37 - 2 * 6 - 4  # layers 4 and 5 (6 linears each), attention.output.dense of layers 0-3


# qwen3_moe's tiny attention (head_dim 40) is not a multiple of 128, which transformers' quantizer
# leaves unquantized: those checkpoints skip it by name (a regex prefix, transformers' meaning)
NO_ATTENTION = ("lm_head", r"model\.layers\.\d+\.self_attn")


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe"])
def test_finegrained_moe_reads_stored_bytes(arch, tiny_moe, tmp_path_factory):
    """Per-expert weight + weight_scale_inv stacked into w13 (gate then up) and w2, as for
    compressed-tensors; lm_head (transformers' default skip) and the routers stay bf16."""
    src = tiny_moe(arch, hidden_size=256, intermediate_size=128)
    folder = _folder("fg", src, tmp_path_factory, **({"skip": list(NO_ATTENTION)} if arch == "qwen3_moe" else {}))
    model = oqcore.load(folder)
    wrapped = _assert_stored_bytes(model, folder)
    assert "lm_head" not in wrapped and any(n.endswith("mlp.experts") for n in wrapped)
    kinds = {type(w).__name__ for w in model.oq_state.wrappers.values()}
    assert kinds == ({"QuantizedMoE"} if arch == "qwen3_moe" else {"QuantizedLinear", "QuantizedMoE"})


def test_finegrained_moe_is_the_compressed_tensors_reading(tiny_moe, tmp_path_factory, tmp_path):
    """The same bytes as a compressed-tensors FP8_BLOCK checkpoint (weight_scale_inv renamed
    weight_scale, llm-compressor's config) load into an identical model: the view is exact."""
    src = tiny_moe("mixtral", hidden_size=256, intermediate_size=128)
    folder = _folder("fg", src, tmp_path_factory)
    ct = _copy(folder, tmp_path)
    t = load_file(ct / F)
    save_file({k.removesuffix("_inv"): v for k, v in t.items()}, ct / F, metadata={"format": "pt"})
    cfg = json.loads((ct / "config.json").read_text())
    fp8 = {"num_bits": 8, "type": "float", "symmetric": True}
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "quantization_status": "compressed", "format": "float-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "format": "float-quantized",
                                      "weights": {**fp8, "dynamic": False, "strategy": "block", "block_structure": [128, 128]},
                                      "input_activations": {**fp8, "dynamic": True, "strategy": "group", "group_size": 128}}},
        "ignore": ["lm_head"],
    }  # fmt: skip
    (ct / "config.json").write_text(json.dumps(cfg))
    a, b = oqcore.load(folder), oqcore.load(ct)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(_same(sa[k], sb[k]) for k in sa)
    assert _targets(a) == _targets(b) == {("fp8_per_block_static", "fp8_per_block_dynamic")}


def test_finegrained_gpt_oss_fused_experts_are_refused(tiny_moe, tmp_path):
    """gpt-oss keeps its experts fused on disk ([E, H, 2I], gate/up interleaved): transformers'
    quantizer makes ``gate_up_proj`` + ``gate_up_proj_scale_inv``; oqcore refuses them by name."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.utils.quantization_config import FineGrainedFP8Config

    src = tiny_moe("gpt_oss", hidden_size=256, intermediate_size=128)
    folder = write_finegrained(src, tmp_path / "g", skip=list(NO_ATTENTION))
    qc = FineGrainedFP8Config(modules_to_not_convert=list(NO_ATTENTION))
    t = load_file(folder / F)
    for k in [k for k in t if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        t.update(Fp8Quantize(SimpleNamespace(quantization_config=qc)).convert({k: t.pop(k)}))
    save_file(t, folder / F, metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.mlp.experts.(gate_up|down)_proj"
    ) as e:
        oqcore.load(folder)
    assert "GptOssForCausalLM" in str(e.value) and "fused" in str(e.value)


# -- ModelOpt ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["file", "config-flat", "config-nested"])
def test_modelopt_fp8_minilm(where, minilm, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    folder = _folder("mo", minilm, tmp_path_factory, where=where, exclude=("pooler.dense",))
    model, warned = _load(folder, dtype=torch.float32)
    wrapped = _assert_stored_bytes(model, folder)
    assert len(wrapped) == 36 and "pooler.dense" not in wrapped
    # static per-tensor activations with the stored input_scale, as vLLM's ModelOptFp8LinearMethod runs them
    assert _targets(model) == {("fp8_per_tensor_static", "fp8_per_tensor_static")}
    assert not any("input_scale" in w for w in warned)
    stored = load_file(folder / F)
    for mod in wrapped:
        w = model.oq_state.wrappers[mod]
        assert w.input_scale.shape == (1,) and torch.equal(w.input_scale, stored[f"{mod}.input_scale"].reshape(1)), mod
    assert _forward_vs_fake_quant(model, minilm, folder) < 2**-6


def test_modelopt_per_channel_per_token_minilm(minilm, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")
    folder = _folder("mo", minilm, tmp_path_factory, algo="FP8_PER_CHANNEL_PER_TOKEN", exclude=())
    model, warned = _load(folder, w8a8_reference("fp8_per_channel_static"), dtype=torch.float32)
    assert len(_assert_stored_bytes(model, folder)) == 37  # weight_scale [N] read as [N, 1]
    assert _targets(model) == {("fp8_per_channel_static", "fp8_per_token")}
    assert not any("input_scale" in w for w in warned)
    assert _forward_vs_fake_quant(model, minilm, folder) < 2**-6


def test_modelopt_moe_gate_and_up_scales_requantized_as_vllm_does(tiny_moe, tmp_path_factory):
    """ModelOpt quantizes gate and up apart (it fuses FP8 scales of no parallel linears), so each
    expert's w13 is requantized to one scale as vLLM's ModelOptFp8MoEMethod does; the rest as stored."""
    src = tiny_moe("qwen3_moe")
    folder = _folder("mo", src, tmp_path_factory)
    model, warned = _load(folder)
    _assert_stored_bytes(model, folder, requantized_w13=True)
    stored = load_file(folder / F)
    moe = model.oq_state.wrappers["model.layers.1.mlp.experts"]
    base = "model.layers.1.mlp.experts"
    for e in range(moe.layout.num_experts):
        g, u = (
            _dequant(stored[f"{base}.{e}.{p}.weight"], stored[f"{base}.{e}.{p}.weight_scale"])
            for p in ("gate_proj", "up_proj")
        )
        ref = oqcore.quantize_tensor(torch.cat([g, u]), "fp8_per_tensor_static", quantizer="torch")
        assert _same(moe.w13_weight[e], ref.qdata) and torch.equal(moe.w13_weight_scale[e], ref.scale), e
    assert _targets(model) == {("fp8_per_tensor_static", "fp8_per_tensor_static")}
    assert not any("input_scale" in w for w in warned)
    # one input scale per layer and projection: the max over the experts (and over gate / up), as
    # vLLM's process_fp8_input_tensor_strategy_moe keeps it
    for layer, w in model.oq_state.wrappers.items():
        if not layer.endswith("experts"):
            continue
        n = w.layout.num_experts
        s13 = torch.stack([stored[f"{layer}.{e}.{p}.input_scale"] for e in range(n) for p in ("gate_proj", "up_proj")])
        s2 = torch.stack([stored[f"{layer}.{e}.down_proj.input_scale"] for e in range(n)])
        assert torch.equal(w.w13_input_scale, s13.max().reshape(1)) and torch.equal(w.w2_input_scale, s2.max().reshape(1)), layer


# -- oq explain --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fg", "mo"])
def test_oq_explain_reads_the_stored_config(kind, minilm, tmp_path_factory):
    from oqcore.cli import app

    folder = _folder(kind, minilm, tmp_path_factory, **({"exclude": ("pooler.dense",)} if kind == "mo" else {}))
    r = CliRunner().invoke(app, ["explain", "--model", str(folder), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["saved"] is True
    want = (
        ("fp8_per_block_static", "fp8_per_block_dynamic")
        if kind == "fg"
        else ("fp8_per_tensor_static", "fp8_per_tensor_static")
    )
    rows = [row for row in data["layers"] if row["kind"] == "linear" and row.get("weight")]
    assert len(rows) == (37 if kind == "fg" else 36)
    assert all((row["weight"], row["activation"]) == want for row in rows)


# -- bad inputs ----------------------------------------------------------------------------------------------


def _edit_config(folder: Path, fn) -> None:
    f = folder / "config.json"
    cfg = json.loads(f.read_text())
    fn(cfg["quantization_config"])
    f.write_text(json.dumps(cfg))


def _edit_tensors(folder: Path, fn) -> None:
    t = load_file(folder / F)
    fn(t)
    save_file(t, folder / F, metadata={"format": "pt"})


Q = "encoder.layer.0.attention.self.query"

FG_BAD = [
    ("static", lambda d: _edit_config(d, lambda q: q.update(activation_scheme="static")),
     ["config.json", "quantization_config.activation_scheme is 'static'", "static FineGrainedFP8 activation scales", "are not read"]),
    ("scheme-unknown", lambda d: _edit_config(d, lambda q: q.update(activation_scheme="per-row")),
     ["quantization_config.activation_scheme is 'per-row'", "'dynamic' or 'static'"]),
    ("block-64", lambda d: _edit_config(d, lambda q: q.update(weight_block_size=[64, 64])),
     ["config.json: quantization_config.weight_block_size", "transformers FineGrainedFP8", "block_structure: [64, 64]"]),
    ("block-malformed", lambda d: _edit_config(d, lambda q: q.update(weight_block_size=[128])),
     ["quantization_config.weight_block_size is [128]", "two positive integers"]),
    ("ue8m0", lambda d: _edit_config(d, lambda q: q.update(scale_fmt="ue8m0")), ["quantization_config.scale_fmt is 'ue8m0'"]),
    ("fp4-experts", lambda d: _edit_config(d, lambda q: q.update(expert_dtype="fp4")), ["quantization_config.expert_dtype is 'fp4'"]),
    ("embeddings", lambda d: _edit_config(d, lambda q: q.update(modules_to_convert=["embed_tokens"])),
     ["quantization_config.modules_to_convert", "embeddings"]),
    ("skip-not-list", lambda d: _edit_config(d, lambda q: q.update(modules_to_not_convert="lm_head")),
     ["quantization_config.modules_to_not_convert is 'lm_head'", "a list"]),
    ("skip-bad-regex", lambda d: _edit_config(d, lambda q: q.update(modules_to_not_convert=["pooler["])),
     ["quantization_config.modules_to_not_convert", "'pooler['", "regular expression"]),
    ("missing-scale-inv", lambda d: _edit_tensors(d, lambda t: t.pop(f"{Q}.weight_scale_inv")),
     ["model.safetensors", f"tensor '{Q}.weight' is F8_E4M3 [384, 384]", f"'{Q}.weight_scale_inv'", "is missing"]),
    ("two-scales", lambda d: _edit_tensors(d, lambda t: t.update({f"{Q}.weight_scale": t[f"{Q}.weight_scale_inv"].clone()})),
     ["model.safetensors", f"'{Q}.weight_scale'", f"'{Q}.weight_scale_inv'", "both the scale"]),
    ("scale-shape", lambda d: _edit_tensors(d, lambda t: t.update({f"{Q}.weight_scale_inv": torch.ones(3, 2)})),
     ["model.safetensors", f"tensor '{Q}.weight_scale_inv' is F32 [3, 2]", "float32 [3, 3]"]),
    ("weight-shape", lambda d: _edit_tensors(d, lambda t: t.update({f"{Q}.weight": t[f"{Q}.weight"][:256]})),
     ["model.safetensors", f"'{Q}.weight'", "[256, 384]"]),
    ("skipped-but-fp8", lambda d: _edit_config(d, lambda q: q.update(modules_to_not_convert=["attention.self.query"])),
     ["model.safetensors", f"tensor '{Q}.weight_scale_inv' (F32 [3, 3]) is quantized", f"does not quantize layer '{Q}'"]),
]  # fmt: skip


@pytest.mark.parametrize("edit, culprits", [b[1:] for b in FG_BAD], ids=[b[0] for b in FG_BAD])
def test_finegrained_bad_inputs(edit, culprits, minilm, tmp_path_factory, tmp_path):
    folder = _copy(_folder("fg", minilm, tmp_path_factory), tmp_path)
    edit(folder)
    with pytest.raises(CheckpointError) as e:
        oqcore.load(folder)
    for c in culprits:
        assert c in str(e.value), (c, str(e.value))


def _edit_hf(folder: Path, fn) -> None:
    f = folder / "hf_quant_config.json"
    obj = json.loads(f.read_text())
    fn(obj)
    f.write_text(json.dumps(obj))


MO_BAD = [
    ("kv-cache", "file", lambda d: _edit_hf(d, lambda o: o["quantization"].update(kv_cache_quant_algo="FP8")),
     ["hf_quant_config.json: quantization.kv_cache_quant_algo is 'FP8'", "KV cache"]),
    ("kv-cache-config", "config-flat", lambda d: _edit_config(d, lambda q: q.update(kv_cache_scheme={"num_bits": 8, "type": "float", "dynamic": False})),
     ["config.json: quantization_config.kv_cache_scheme", "KV cache"]),
    ("nvfp4", "file", lambda d: _edit_hf(d, lambda o: o["quantization"].update(quant_algo="NVFP4")),
     ["hf_quant_config.json: quantization.quant_algo is 'NVFP4'", "'FP8', 'FP8_PER_CHANNEL_PER_TOKEN'"]),
    ("w4a8-config", "config-nested", lambda d: _edit_config(d, lambda q: q["quantization"].update(quant_algo="W4A8_AWQ")),
     ["config.json: quantization_config.quantization.quant_algo is 'W4A8_AWQ'"]),
    ("no-quantization", "file", lambda d: _edit_hf(d, lambda o: o.pop("quantization")), ["hf_quant_config.json: field 'quantization'"]),
    ("exclude-not-list", "file", lambda d: _edit_hf(d, lambda o: o["quantization"].update(exclude_modules="lm_head")),
     ["hf_quant_config.json: quantization.exclude_modules is 'lm_head'", "a list"]),
    ("kv-scale-tensor", "file", lambda d: _edit_tensors(d, lambda t: t.update({"encoder.layer.0.attention.self.key.k_scale": torch.ones(())})),
     ["model.safetensors", "'encoder.layer.0.attention.self.key.k_scale'"]),
    ("missing-scale", "file", lambda d: _edit_tensors(d, lambda t: t.pop(f"{Q}.weight_scale")),
     ["model.safetensors", f"tensor '{Q}.weight' is F8_E4M3 [384, 384]", f"'{Q}.weight_scale'", "is missing"]),
    ("scale-shape", "file", lambda d: _edit_tensors(d, lambda t: t.update({f"{Q}.weight_scale": torch.ones(2)})),
     ["model.safetensors", f"tensor '{Q}.weight_scale' is F32 [2]"]),
]  # fmt: skip


@pytest.mark.parametrize("where, edit, culprits", [b[1:] for b in MO_BAD], ids=[b[0] for b in MO_BAD])
def test_modelopt_bad_inputs(where, edit, culprits, minilm, tmp_path_factory, tmp_path):
    folder = _copy(_folder("mo", minilm, tmp_path_factory, where=where, exclude=("pooler.dense",)), tmp_path)
    edit(folder)
    with pytest.raises(CheckpointError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oqcore.load(folder)
    for c in culprits:
        assert c in str(e.value), (c, str(e.value))


def test_modelopt_metadata_on_a_bf16_checkpoint_names_the_weight(minilm, tmp_path):
    """hf_quant_config.json says FP8, the tensors are bf16/f32: the first quantized layer's weight is named."""
    folder = _copy(minilm, tmp_path)
    (folder / "hf_quant_config.json").write_text(
        json.dumps({"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8"}})
    )
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: tensor '.*\.weight' is F32 \[\d+, \d+\], quantized layer .* expects float8_e4m3fn",
    ):
        oqcore.load(folder)


# -- the skip-list translations keep the peers' meaning -----------------------------------------------------

NAMES = [
    "lm_head", "model.lm_head", "model.layers.1.mlp.gate", "model.layers.1.mlp.gate_proj", "model.layers.11.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.experts.3.gate_proj", "encoder.layer.0.attention.output.dense",
    "pooler.dense", "model.layers.1", "vision_tower.blocks.0.fc1",
]  # fmt: skip


@pytest.mark.parametrize(
    "key", ["lm_head", "mlp.gate", "model.layers.1", r"model.layers.*", "fc1", "experts", "dense", "q_proj"]
)
def test_transformers_skip_patterns_match_should_convert_module(key):
    from compressed_tensors.utils import match_name
    from transformers.quantizers.quantizers_utils import should_convert_module

    for name in NAMES:
        ours = any(match_name(name, p) for p in transformers_skip_patterns(key))
        theirs = not should_convert_module(name, [key])
        # a per-expert projection is skipped with its fused experts module (what transformers converts)
        owner = name.rpartition(".experts.")[0] + ".experts" if ".experts." in name else name
        assert ours == (theirs or not should_convert_module(owner, [key])), (key, name)


@pytest.mark.parametrize(
    "pattern", ["lm_head", "model.layers.1*", "model.layers.1.*", "*mlp.gate", "*.q_proj", "vision_tower*"]
)
def test_modelopt_exclude_patterns_match_vllm_is_layer_excluded(pattern):
    from compressed_tensors.utils import match_name

    for name in NAMES:
        ours = any(match_name(name, p) for p in modelopt_exclude_patterns(pattern))
        # vLLM ModelOptQuantConfigBase.is_layer_excluded: exact, substring, then fnmatch
        theirs = pattern == name or pattern in name or fnmatch.fnmatch(name, pattern)
        assert ours == theirs, (pattern, name)
