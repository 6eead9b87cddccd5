"""Bad input to load / quantize_: one clear OqError subclass naming the file, tensor or layer, and
nothing half-built or half-applied."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import oqcore
from oqcore import CheckpointError, UnsupportedLayerError
from oqcore.fidelity import reference_model


@pytest.fixture(autouse=True)
def no_triton(monkeypatch):
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")


@pytest.fixture
def ckpt(tiny_moe, tmp_path):
    """A private copy of a tiny Mixtral to damage."""
    dst = tmp_path / "m"
    shutil.copytree(tiny_moe("mixtral"), dst)
    return dst


def rewrite(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_safetensors(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"m: no model.safetensors or model.safetensors.index.json$"):
        oqcore.load(ckpt, "fp8_per_block")


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere: no such folder"):
        oqcore.load(tmp_path / "nowhere", "fp8_per_block")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json does not exist"):
        oqcore.load(ckpt, "fp8_per_block")


def test_corrupt_header(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=r"model.safetensors: corrupt safetensors header"):
        oqcore.load(ckpt, "fp8_per_block")


def test_truncated_file(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor '.*' \(BF16 \[.*\]\) does not fit the file: .*truncated or corrupt"):
        oqcore.load(ckpt, "fp8_per_block")


def test_missing_shard(ckpt):
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    (ckpt / "model.safetensors").unlink()  # else it wins over the index, as in transformers
    with pytest.raises(CheckpointError, match=r"names shard\(s\) that do not exist: .*model-00002-of-00002.safetensors"):
        oqcore.load(ckpt, "fp8_per_block")


def test_unbuildable_config(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "not_a_model"
    cfg.pop("architectures")
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: transformers cannot read this config"):
        oqcore.load(ckpt, "fp8_per_block")


def test_already_quantized_checkpoint(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"already quantized \(quant_method='gptq'\), in a format oqcore cannot run"):
        oqcore.load(ckpt, "fp8_per_block")


def test_nan_weight_names_the_layer(ckpt):
    rewrite(ckpt, lambda t: t["model.layers.1.self_attn.o_proj.weight"].view(-1)[7].fill_(float("nan")))
    with pytest.raises(UnsupportedLayerError, match=r"^layer 'model.layers.1.self_attn.o_proj': weight holds 1 NaN/Inf value\(s\)"):
        oqcore.load(ckpt, "fp8_per_block")


def test_nan_in_one_expert_names_layer_and_expert(ckpt):
    rewrite(ckpt, lambda t: t["model.layers.0.block_sparse_moe.experts.2.w3.weight"].fill_(float("inf")))
    with pytest.raises(UnsupportedLayerError, match=r"^layer 'model.layers.0.mlp.experts.gate_up_proj\[expert 2\]'"):
        oqcore.load(ckpt, {"moe": "mxfp8"})


def test_missing_tensors_are_listed(ckpt):
    def drop(t):
        del t["model.norm.weight"]
        del t["model.layers.1.self_attn.k_proj.weight"]

    rewrite(ckpt, drop)
    with pytest.raises(CheckpointError) as e:
        oqcore.load(ckpt, {"moe": "mxfp8"})
    assert "the checkpoint has no tensor for 2 model weight(s): model.layers.1.self_attn.k_proj.weight, model.norm.weight" in str(e.value)


def test_missing_expert_tensor_of_a_quantized_layer(ckpt):
    rewrite(ckpt, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"))
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.experts.down_proj' fuses 4 experts, but the checkpoint has 3 tensors matching '.experts.\*.w2.weight'"):
        oqcore.load(ckpt, {"moe": "mxfp8"})


def test_wrong_shape(ckpt):
    rewrite(ckpt, lambda t: t.__setitem__("model.norm.weight", torch.ones(161, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight' has shape \[161\] in the checkpoint, the model expects \[160\]"):
        oqcore.load(ckpt, "fp8_per_block")


def test_quantize_inplace_failure_leaves_model_unchanged(tiny_moe):
    model = reference_model(tiny_moe("mixtral"), torch.bfloat16)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[2, 5, 5] = float("nan")
    before = {n: t.clone() for n, t in model.state_dict().items()}
    modules = dict(model.named_modules())
    with pytest.raises(UnsupportedLayerError, match=r"^layer 'model.layers.1.mlp.experts.down_proj\[expert 2\]': weight holds 1 NaN/Inf value\(s\) of 15360;"):
        oqcore.quantize_(model, {"linear": "fp8_per_block", "moe": "mxfp8"})
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(modules[n] is m for n, m in model.named_modules())
    after = model.state_dict()
    for n in before:
        torch.testing.assert_close(after[n], before[n], rtol=0, atol=0, equal_nan=True)
    assert not hasattr(model, "oq_state")
