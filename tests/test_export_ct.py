"""``save_quantized(model, out, format="compressed-tensors")``: what llm-compressor writes and vLLM
serves, checked with the other tools in the loop: compressed-tensors' own config model and
decompressors give exactly oqcore's dequantized weights, transformers loads the folder and runs it,
and the tensor names are the source checkpoint's (experts per expert, Mixtral's renamed blocks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ct_export_util import ct_config as _config
from ct_export_util import tensors_of as _tensors

import oqcore

pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

DENSE = [
    "fp8_per_tensor",
    "fp8_per_channel",
    "fp8_per_block",
    "mxfp8",
    {"linear": {"weight": "fp8_per_channel_static", "activation": None}},
    {"linear": {"weight": "mxfp8", "activation": None}},
    {"linear": {"weight": "int8_per_channel_static"}},
    {"linear": {"weight": "int8_per_channel_static", "activation": "int8_per_token"}},
]
DENSE_IDS = ["fp8-tensor", "fp8-channel", "fp8-block", "mxfp8", "fp8-channel-w8a16", "mxfp8-w8a16", "int8-w8a16", "int8-w8a8"]


def ct_decompress(tensors: dict, module: str, qscheme, dtype=torch.float32) -> torch.Tensor:
    """The weight compressed-tensors' own decompressor gives for ``module`` of the file, with the
    scheme the file's config declares for it."""
    from compressed_tensors.compressors import compress_module, decompress_module
    from compressed_tensors.quantization import QuantizationStatus, initialize_module_for_quantization

    local = {k[len(module) + 1 :]: v for k, v in tensors.items() if k.rpartition(".")[0] == module}
    n, k = (int(x) for x in local["weight_shape"]) if "weight_shape" in local else local["weight"].shape
    lin = torch.nn.Linear(k, n, bias="bias" in local, dtype=dtype)
    initialize_module_for_quantization(lin, qscheme, force_zero_point=False)
    lin.quantization_status = QuantizationStatus.FROZEN
    compress_module(lin)
    lin.load_state_dict({kk: v for kk, v in local.items()}, strict=True, assign=True)
    decompress_module(lin)
    return lin.weight.detach()


@pytest.mark.parametrize("config", DENSE, ids=DENSE_IDS)
def test_dense_export_decompresses_to_oqcore_and_loads_in_transformers(config, minilm, tmp_path):
    model = oqcore.load(minilm, config)
    out = oqcore.save_quantized(model, tmp_path / "ct", format="compressed-tensors")
    cfg, raw = _config(out)
    assert raw["producer"] == "oqcore" and list(cfg.config_groups) == ["group_0"]
    group = cfg.config_groups["group_0"]
    assert group.targets == ["Linear"]
    tensors = _tensors(out)
    wrappers = model.oq_state.wrappers
    assert len(wrappers) == 37
    # every layer kind of the model (attention, MLP in / out, pooler): decompressing all 37 is slow
    for name in ("encoder.layer.0.attention.self.query", "encoder.layer.3.intermediate.dense", "encoder.layer.5.output.dense", "pooler.dense"):
        w = wrappers[name]
        ours = w.method.dequantize_layer_weight(w, "weight", torch.float32)
        theirs = ct_decompress(tensors, name, group)
        assert torch.equal(ours, theirs), name
    # everything else is the model's own bytes under its own names
    src = _tensors(Path(minilm))
    modules = lambda names: {n.rpartition(".")[0] for n in names if n != "embeddings.position_ids"}  # noqa: E731
    assert modules(src) == modules(tensors)  # (position_ids: a buffer transformers rebuilds)
    for k, v in src.items():
        if k in tensors and (k.rpartition(".")[0] not in wrappers or k.endswith(".bias")):
            assert torch.equal(tensors[k], v.to(tensors[k].dtype)), k
    # transformers loads the folder; its compressed-tensors hook decompresses at the first forward to
    # oqcore's dequantized weights within bf16 rounding (it multiplies in the model dtype, bf16 here:
    # at most one rounding of the scale and one of the product; checked on two formats)
    if DENSE_IDS[DENSE.index(config)] in ("fp8-channel-w8a16", "int8-w8a16"):
        hf = transformers.AutoModel.from_pretrained(out)
        with torch.no_grad():
            hf(input_ids=torch.tensor([[101, 2023, 102]]))
        got = hf.encoder.layer[3].intermediate.dense.weight
        w = wrappers["encoder.layer.3.intermediate.dense"]
        ours = w.method.dequantize_layer_weight(w, "weight", torch.float32)
        torch.testing.assert_close(got.float(), ours, rtol=2**-7, atol=0)


MOE = [("mixtral", "fp8_per_tensor_static"), ("qwen3_moe", "fp8_per_channel_static"), ("olmoe", "int8_per_channel_static"), ("mixtral", "mxfp8")]


@pytest.mark.parametrize("arch, weight", MOE, ids=[f"{a}-{w}" for a, w in MOE])
def test_moe_export_uses_the_checkpoint_names_per_expert(arch, weight, tiny_moe, tmp_path):
    src = Path(tiny_moe(arch))
    config = {"linear": {"weight": weight, "activation": None}, "moe": {"weight": weight, "activation": None}}
    model = oqcore.load(src, config)
    out = oqcore.save_quantized(model, tmp_path / "ct", format="compressed-tensors")
    cfg, raw = _config(out)
    group = cfg.config_groups["group_0"]
    tensors, source = _tensors(out), _tensors(src)
    mods = lambda names: {n.rpartition(".")[0] for n in names}  # noqa: E731
    assert mods(tensors) == mods(source)  # every module under the checkpoint's own name
    routers = [m for m in mods(source) if m.endswith((".gate", ".router")) and ".experts." not in m]
    assert routers and set(routers) <= set(cfg.ignore)
    # each expert's projection decompresses to oqcore's expert weights
    moe = next(w for w in model.oq_state.wrappers.values() if type(w).__name__ == "QuantizedMoE")
    e, i = 1, moe.layout.intermediate_size
    w13 = moe.method.dequantize_layer_weight(moe, "w13_weight", torch.float32, expert=e)
    w2 = moe.method.dequantize_layer_weight(moe, "w2_weight", torch.float32, expert=e)
    expert_mods = sorted(m for m in mods(tensors) if f".experts.{e}." in m and ".layers.0." in m)
    by_role = {m.rpartition(".")[2]: m for m in expert_mods}
    gate, up, down = (by_role["w1"], by_role["w3"], by_role["w2"]) if "w1" in by_role else (
        by_role["gate_proj"], by_role["up_proj"], by_role["down_proj"])
    assert torch.equal(ct_decompress(tensors, gate, group), w13[:i])
    assert torch.equal(ct_decompress(tensors, up, group), w13[i:])
    assert torch.equal(ct_decompress(tensors, down, group), w2)
    if weight != "mxfp8":
        # transformers 5 dequantizes compressed experts while fusing them back (its
        # integrations/compressed_tensors.py CompressedTensorsDequantize: quant * scale in float32, which
        # handles per-tensor and per-channel scales; block and MX scales it does not expand): to
        # oqcore's dequantized experts within bf16 rounding
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=model.dtype)
        fused = hf.model.layers[0].mlp.experts
        torch.testing.assert_close(fused.gate_up_proj[e].detach().float(), w13, rtol=2**-7, atol=0)
        torch.testing.assert_close(fused.down_proj[e].detach().float(), w2, rtol=2**-7, atol=0)


def test_unknown_format_is_a_config_error(minilm, tmp_path):
    model = oqcore.load(minilm, "fp8_per_tensor")
    with pytest.raises(oqcore.ConfigError) as e:
        oqcore.save_quantized(model, tmp_path / "x", format="gguf")
    assert e.value.field == "format" and "compressed-tensors" in str(e.value)


def test_a_compressed_tensors_export_can_be_replaced(minilm, tmp_path):
    model = oqcore.load(minilm, "fp8_per_tensor")
    oqcore.save_quantized(model, tmp_path / "ct", format="compressed-tensors")
    oqcore.save_quantized(model, tmp_path / "ct", format="compressed-tensors")  # an earlier export: replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "f.txt").write_text("x")
    with pytest.raises(oqcore.SaveError, match="not an earlier oqcore export"):
        oqcore.save_quantized(model, tmp_path / "other", format="compressed-tensors")


def test_cli_writes_compressed_tensors_and_refuses_an_unknown_format(tmp_path, capsys):
    from oqcore.cli import main

    assert main(["quantize", "--out", str(tmp_path / "ct"), "--format", "compressed-tensors", "--no-check"]) == 0
    out = capsys.readouterr().out
    # what reads it, without claiming transformers expands every scheme (it does not: docs/formats.md)
    assert f"saved: {tmp_path / 'ct'} (compressed-tensors: oqcore.load and vLLM read it, and transformers where" in out
    cfg, raw = _config(tmp_path / "ct")
    assert raw["producer"] == "oqcore" and cfg.config_groups["group_0"].format == "float-quantized"
    assert main(["quantize", "--out", str(tmp_path / "x"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --format: unknown format 'gguf'") and not (tmp_path / "x").exists()


# single-scheme exports of every layout are read back in tests/test_export_matrix.py (c)
ROUNDTRIP = [
    # two schemes: two config groups, the dense layers by name, each experts module by a re: pattern
    ("mixtral", {"linear": "fp8_per_channel", "moe": {"weight": "int8_per_channel_static"}}),
]
ROUNDTRIP_IDS = ["mixtral-two-schemes"]


@pytest.mark.parametrize("arch, config", ROUNDTRIP, ids=ROUNDTRIP_IDS)
def test_oqcore_reads_its_compressed_tensors_export_bit_identical(arch, config, minilm, tiny_moe, tmp_path):
    src = minilm if arch == "minilm" else tiny_moe(arch)
    model = oqcore.load(src, config)
    out = oqcore.save_quantized(model, tmp_path / "ct", format="compressed-tensors")
    cfg, _ = _config(out)
    assert len(cfg.config_groups) == (2 if arch == "mixtral" and not isinstance(config, str) else 1)
    back = oqcore.load(out)  # read as stored: no re-quantizing
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # the same layers with the same keys (the config read back names each layer as a target)
    rows = lambda m: [(r["name"], r["weight"], r["activation"]) for r in m.oq_state.plan.rows() if r["action"] == "quantize"]  # noqa: E731
    assert rows(back) == rows(model)


def test_cli_takes_a_compressed_tensors_folder_as_saved(tiny_moe, tmp_path, capsys):
    from oqcore.cli import main

    model = oqcore.load(tiny_moe("mixtral"), "fp8_per_channel")
    out = oqcore.save_quantized(model, tmp_path / "ct", format="compressed-tensors")
    assert main(["explain", "--model", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["saved"] is True
    rows = {r["name"]: r for r in data["layers"]}
    assert rows["model.layers.0.mlp.experts"]["weight"] == "fp8_per_channel_static"
    assert rows["model.layers.0.self_attn.q_proj"]["activation"] == "fp8_per_token"
    assert main(["quantize", "--model", str(out)]) == 0
    text = capsys.readouterr().out
    assert "(saved with the model)" in text and "fidelity: not checked" in text


def test_a_scheme_without_a_compressed_tensors_form_is_refused(minilm, tmp_path):
    from toy_scheme import register_toy

    register_toy()  # a v1 plugin: methods and quantizers, no Scheme record
    model = oqcore.load(minilm, {"linear": "toy_int4"})
    with pytest.raises(oqcore.SaveError, match=r"layer 'encoder\.layer\.0\.attention\.self\.query' \(toy_int4, activation none\): its plugin declares no compressed-tensors form"):
        oqcore.save_quantized(model, tmp_path / "ct", format="compressed-tensors")
    assert not (tmp_path / "ct").exists()
    oqcore.save_quantized(model, tmp_path / "oq", format="oqcore")  # its own format still works


def test_a_model_with_no_quantized_layer_is_refused(minilm, tmp_path):
    """compressed-tensors has no config for "nothing quantized" (config_groups must be non-empty, and
    oqcore would refuse to read it back): a SaveError pointing at format='oqcore'."""
    with pytest.warns(UserWarning, match="0 layers quantized"):
        model = oqcore.load(minilm, {"moe": "mxfp8"})  # MiniLM has no experts
    with pytest.raises(oqcore.SaveError, match=r"no layer of the model is quantized .*save with format='oqcore'"):
        oqcore.save_quantized(model, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    oqcore.save_quantized(model, tmp_path / "oq", format="oqcore")
    assert oqcore.load(tmp_path / "oq").oq_state.wrappers == {}
