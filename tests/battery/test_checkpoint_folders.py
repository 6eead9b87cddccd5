"""Battery: model folders, ``config.json``, shard indexes, already-quantized checkpoints and the
arguments of ``oqcore.load``.

Each bad input makes ``oqcore.load`` raise one typed error (:class:`oqcore.CheckpointError` for the
folder and its files, :class:`oqcore.ConfigError` for the arguments) whose message names the file
and the field, entry or tensor at fault, before any weight is read.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import oqcore
from oqcore import CheckpointError, ConfigError
from tests.battery.st_forge import forge, header_of, pack, replace_tensor, rewrite
from tests.battery.util import raises_naming

F = "model.safetensors"
INDEX = "model.safetensors.index.json"
S1, S2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


@pytest.fixture(autouse=True)
def no_triton(monkeypatch):
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")


@pytest.fixture
def ckpt(tiny_moe, tmp_path):
    """A private copy of the tiny Mixtral, to damage."""
    d = tmp_path / "m"
    shutil.copytree(tiny_moe("mixtral"), d)
    return d


@pytest.fixture
def sharded(ckpt):
    """The tiny Mixtral split into two shards with a correct index."""
    tensors = load_file(ckpt / F)
    names = sorted(tensors)
    half = len(names) // 2
    save_file({k: tensors[k] for k in names[:half]}, ckpt / S1, metadata={"format": "pt"})
    save_file({k: tensors[k] for k in names[half:]}, ckpt / S2, metadata={"format": "pt"})
    wm = {k: (S1 if i < half else S2) for i, k in enumerate(names)}
    (ckpt / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))
    (ckpt / F).unlink()
    return ckpt


def _edit_config(folder, change):
    cfg = json.loads((folder / "config.json").read_text())
    change(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_index(folder, change):
    idx = json.loads((folder / INDEX).read_text())
    change(idx)
    (folder / INDEX).write_text(json.dumps(idx))


# ---- config.json -----------------------------------------------------------------------------

RAW_CONFIGS = [
    ("a-list", b"[1, 2, 3]", ["a JSON list, not an object"]),
    ("a-string", b'"mixtral"', ["a JSON string, not an object"]),
    ("a-number", b"42", ["a JSON number, not an object"]),
    ("empty", b"", ["is empty"]),
    ("whitespace", b"  \n ", ["is empty"]),
    ("binary-garbage", b"\x89PNG\r\n\x1a\n\x00\x00\xff", ["not UTF-8"]),
    ("not-json", b"{model_type: mixtral}", ["not valid JSON"]),
    ("nan", b'{"model_type": "mixtral", "rms_norm_eps": NaN}', ["NaN"]),
    ("infinity", b'{"model_type": "mixtral", "rope_theta": Infinity}', ["Infinity"]),
    ("duplicate-key", b'{"model_type": "mixtral", "model_type": "llama"}', ["'model_type'", "twice"]),
]


@pytest.mark.parametrize("raw,culprits", [c[1:] for c in RAW_CONFIGS], ids=[c[0] for c in RAW_CONFIGS])
def test_config_json_not_a_json_object(ckpt, raw, culprits):
    (ckpt / "config.json").write_bytes(raw)
    with raises_naming(CheckpointError, str(ckpt / "config.json"), *culprits):
        oqcore.load(ckpt, "fp8_per_block")


FIELDS = [
    ("architectures-a-string", {"architectures": "MixtralForCausalLM"}, ["'architectures'", "list of model class names"]),
    ("architectures-ints", {"architectures": [1]}, ["'architectures'", "list of model class names"]),
    ("architectures-empty-string", {"architectures": [""]}, ["'architectures'"]),
    ("torch_dtype-garbage", {"torch_dtype": "bfloat17"}, ["'torch_dtype'", "'bfloat17'", "valid: bfloat16, float16, float32"]),
    ("torch_dtype-int8", {"torch_dtype": "int8"}, ["'torch_dtype'", "'int8'", "valid:"]),
    ("dtype-a-number", {"dtype": 16}, ["'dtype'", "16", "valid:"]),
    ("dtype-fp8", {"dtype": "float8_e4m3fn"}, ["'dtype'", "float8_e4m3fn", "high-precision"]),
    ("dtype-torch-prefix", {"dtype": "torch.float16"}, ["'dtype'", "'torch.float16'", "valid: bfloat16"]),
    ("dtype-auto", {"dtype": "auto"}, ["'dtype'", "'auto'", "valid: bfloat16"]),
    ("quantization_config-a-string", {"quantization_config": "fp8"}, ["'quantization_config'", "must be an object"]),
    ("quantization_config-a-list", {"quantization_config": ["fp8"]}, ["'quantization_config'", "must be an object"]),
    ("quant_method-not-a-string", {"quantization_config": {"quant_method": 8}}, ["'quantization_config.quant_method'", "string"]),
    ("model_type-not-a-string", {"model_type": ["mixtral"]}, ["'model_type'", "must be a string"]),
]


@pytest.mark.parametrize("fields,culprits", [c[1:] for c in FIELDS], ids=[c[0] for c in FIELDS])
def test_config_json_field_of_the_wrong_shape(ckpt, fields, culprits):
    _edit_config(ckpt, lambda c: c.update(fields))
    with raises_naming(CheckpointError, str(ckpt / "config.json"), *culprits):
        oqcore.load(ckpt, "fp8_per_block")


def test_config_json_is_a_directory(ckpt):
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").mkdir()
    with raises_naming(CheckpointError, str(ckpt / "config.json"), "not a regular file"):
        oqcore.load(ckpt, "fp8_per_block")


def test_config_json_missing(ckpt):
    (ckpt / "config.json").unlink()
    with raises_naming(CheckpointError, str(ckpt / "config.json"), "does not exist"):
        oqcore.load(ckpt, "fp8_per_block")


def test_config_transformers_cannot_read(ckpt):
    _edit_config(ckpt, lambda c: (c.pop("architectures"), c.update(model_type="no_such_model")))
    with raises_naming(CheckpointError, str(ckpt / "config.json"), "transformers cannot read this config"):
        oqcore.load(ckpt, "fp8_per_block")


@pytest.mark.parametrize("value,dtype", [("float16", torch.float16), ("half", torch.float16), ("float32", torch.float32), (None, torch.bfloat16)])
def test_config_dtype_spellings_accepted(ckpt, value, dtype):
    from oqcore.loading.meta import build_meta_model

    _edit_config(ckpt, lambda c: (c.pop("dtype", None), c.update(torch_dtype=value)))
    model = build_meta_model(ckpt)
    assert model.model.norm.weight.dtype == dtype


# ---- the folder itself -----------------------------------------------------------------------


def test_folder_does_not_exist(tmp_path):
    with raises_naming(CheckpointError, str(tmp_path / "nowhere"), "no such folder"):
        oqcore.load(tmp_path / "nowhere", "fp8_per_block")


def test_folder_is_a_file(ckpt):
    with raises_naming(CheckpointError, str(ckpt / "config.json"), "is not a folder"):
        oqcore.load(ckpt / "config.json", "fp8_per_block")


@pytest.mark.parametrize("path", [42, None, ["a"]], ids=["int", "none", "list"])
def test_folder_not_a_path(path):
    with raises_naming(CheckpointError, "model path must be a folder path", type(path).__name__):
        oqcore.load(path, "fp8_per_block")


def test_no_weights(ckpt):
    (ckpt / F).unlink()
    with raises_naming(CheckpointError, str(ckpt), "no model.safetensors or model.safetensors.index.json"):
        oqcore.load(ckpt, "fp8_per_block")


def test_two_unnamed_weight_files(ckpt):
    shutil.copy(ckpt / F, ckpt / "a.safetensors")
    os.rename(ckpt / F, ckpt / "b.safetensors")
    with raises_naming(CheckpointError, str(ckpt), "a.safetensors, b.safetensors", "which one"):
        oqcore.load(ckpt, "fp8_per_block")


# ---- the shard index -------------------------------------------------------------------------

RAW_INDEXES = [
    ("a-list", b'["model-00001-of-00002.safetensors"]', ["a JSON list, not an object"]),
    ("a-string", b'"weights"', ["a JSON string, not an object"]),
    ("empty", b"", ["is empty"]),
    ("binary-garbage", b"\x00\x01\x02\xff\xfe", ["not UTF-8"]),
    ("nan", b'{"metadata": {"total_size": NaN}, "weight_map": {}}', ["NaN"]),
]


@pytest.mark.parametrize("raw,culprits", [c[1:] for c in RAW_INDEXES], ids=[c[0] for c in RAW_INDEXES])
def test_index_not_a_json_object(sharded, raw, culprits):
    (sharded / INDEX).write_bytes(raw)
    with raises_naming(CheckpointError, str(sharded / INDEX), *culprits):
        oqcore.load(sharded, "fp8_per_block")


INDEX_FIELDS = [
    ("no-weight_map", lambda i: i.pop("weight_map"), ["no 'weight_map' field"]),
    ("weight_map-a-list", lambda i: i.update(weight_map=[S1, S2]), ["'weight_map'", "a JSON list", "must be an object"]),
    ("weight_map-a-string", lambda i: i.update(weight_map=S1), ["'weight_map'", "a JSON string"]),
    ("weight_map-empty", lambda i: i.update(weight_map={}), ["'weight_map' is empty"]),
    ("value-an-int", lambda i: i["weight_map"].update({"model.norm.weight": 2}), ["weight_map['model.norm.weight']", "is 2", "shard file name"]),
    ("value-null", lambda i: i["weight_map"].update({"model.norm.weight": None}), ["weight_map['model.norm.weight']", "is None"]),
    ("value-a-list", lambda i: i["weight_map"].update({"model.norm.weight": [S1]}), ["weight_map['model.norm.weight']", "shard file name"]),
    ("metadata-a-list", lambda i: i.update(metadata=[1]), ["'metadata'", "must be an object"]),
]


@pytest.mark.parametrize("change,culprits", [c[1:] for c in INDEX_FIELDS], ids=[c[0] for c in INDEX_FIELDS])
def test_index_field_of_the_wrong_shape(sharded, change, culprits):
    _edit_index(sharded, change)
    with raises_naming(CheckpointError, str(sharded / INDEX), *culprits):
        oqcore.load(sharded, "fp8_per_block")


def test_index_is_a_directory(sharded):
    (sharded / INDEX).unlink()
    (sharded / INDEX).mkdir()
    with raises_naming(CheckpointError, str(sharded / INDEX), "not a regular file"):
        oqcore.load(sharded, "fp8_per_block")


def _point_norm_at(folder, shard):
    _edit_index(folder, lambda i: i["weight_map"].update({"model.norm.weight": shard}))


def test_index_shard_with_dotdot_is_refused(sharded, tmp_path):
    shutil.copy(sharded / S2, tmp_path / "outside.safetensors")
    _point_norm_at(sharded, "../outside.safetensors")
    with raises_naming(CheckpointError, str(sharded / INDEX), "weight_map['model.norm.weight']", "'../outside.safetensors'", "inside"):
        oqcore.load(sharded, "fp8_per_block")


def test_index_shard_with_absolute_path_is_refused(sharded, tmp_path):
    shutil.copy(sharded / S2, tmp_path / "outside.safetensors")
    _point_norm_at(sharded, str(tmp_path / "outside.safetensors"))
    with raises_naming(CheckpointError, str(sharded / INDEX), "weight_map['model.norm.weight']", "absolute path"):
        oqcore.load(sharded, "fp8_per_block")


def test_index_shard_symlink_resolving_outside_is_refused(sharded, tmp_path):
    shutil.move(sharded / S2, tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", sharded / S2)
    with raises_naming(CheckpointError, str(sharded / INDEX), S2, "outside the model folder"):
        oqcore.load(sharded, "fp8_per_block")


def test_hub_cache_snapshot_symlinks_into_blobs_are_fine(sharded, tmp_path):
    """The Hugging Face hub cache keeps files in ``<repo>/blobs`` and links them from
    ``<repo>/snapshots/<rev>/``: such links are not "outside"."""
    repo = tmp_path / "models--x--tiny"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    shutil.copytree(sharded, snap)
    for name in (S1, S2):
        shutil.move(snap / name, repo / "blobs" / name)
        os.symlink(os.path.relpath(repo / "blobs" / name, snap), snap / name)
    model = oqcore.load(snap, "fp8_per_block")
    assert model.oq_state.wrappers


def test_index_names_a_missing_shard(sharded):
    _point_norm_at(sharded, "model-00003-of-00002.safetensors")
    with raises_naming(CheckpointError, str(sharded / INDEX), "model-00003-of-00002.safetensors", "do not exist"):
        oqcore.load(sharded, "fp8_per_block")


def test_index_shard_is_a_directory(sharded):
    (sharded / "dir.safetensors").mkdir()
    _point_norm_at(sharded, "dir.safetensors")
    with raises_naming(CheckpointError, str(sharded / INDEX), "'dir.safetensors'", "not a regular file"):
        oqcore.load(sharded, "fp8_per_block")


def _norm_shard(folder):
    return json.loads((folder / INDEX).read_text())["weight_map"]["model.norm.weight"]


def test_index_maps_tensor_to_the_wrong_shard(sharded):
    where = _norm_shard(sharded)
    other = S1 if where == S2 else S2
    _point_norm_at(sharded, other)
    with raises_naming(CheckpointError, str(sharded / INDEX), "'model.norm.weight'", f"to {other}", f"it is in {where}"):
        oqcore.load(sharded, "fp8_per_block")


def test_index_names_a_tensor_no_shard_holds(sharded):
    _edit_index(sharded, lambda i: i["weight_map"].update({"model.extra.weight": S1}))
    with raises_naming(CheckpointError, str(sharded / INDEX), "'model.extra.weight'", "no shard holds it"):
        oqcore.load(sharded, "fp8_per_block")


def test_shard_holds_a_tensor_the_index_does_not_list(sharded):
    _edit_index(sharded, lambda i: i["weight_map"].pop("model.norm.weight"))
    with raises_naming(CheckpointError, str(sharded / INDEX), "does not list tensor 'model.norm.weight'"):
        oqcore.load(sharded, "fp8_per_block")


def test_same_tensor_in_two_shards(sharded):
    where = _norm_shard(sharded)
    other = S1 if where == S2 else S2
    replace_tensor(sharded / other, "model.norm.weight", torch.ones(160, dtype=torch.bfloat16))
    with raises_naming(CheckpointError, "'model.norm.weight'", "appears in both", S1, S2):
        oqcore.load(sharded, "fp8_per_block")


def test_malformed_shard_header_names_the_shard(sharded):
    rewrite(sharded / S2, lambda h, d: h.update({"__metadata__": {"format": 3}}))
    with raises_naming(CheckpointError, str(sharded / S2), "'__metadata__'"):
        oqcore.load(sharded, "fp8_per_block")


def test_sharded_checkpoint_loads_like_the_single_file(sharded, tiny_moe):
    a = oqcore.load(sharded, "fp8_per_block")
    b = oqcore.load(tiny_moe("mixtral"), "fp8_per_block")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k].view(torch.uint8), sb[k].view(torch.uint8)), k


# ---- already-quantized checkpoints that do not say so -------------------------------------------


@pytest.mark.parametrize("shorthand,dtype", [("fp8_per_block", "float8_e4m3fn"), ("mxfp8", "float8_e4m3fn"), ("int8_per_channel_weight_only", "int8")])
def test_save_pretrained_of_an_oqcore_model_is_refused(tiny_moe, tmp_path, shorthand, dtype):
    """A model oqcore quantized, written with transformers' ``save_pretrained``: config.json has
    no quantization_config, the weights are fp8/int8 with scales beside them."""
    out = tmp_path / "sp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oqcore.load(tiny_moe("qwen3_moe"), shorthand).save_pretrained(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with raises_naming(CheckpointError, str(out / F), f"{dtype} tensor 'model.layers.", "with a '", "_scale'", "already quantized", "not supported yet"):
        oqcore.load(out, shorthand)


def test_fp8_weight_with_scale_is_refused(ckpt):
    name = "model.layers.0.self_attn.q_proj"
    replace_tensor(ckpt / F, f"{name}.weight", torch.zeros(160, 160, dtype=torch.float8_e4m3fn))
    replace_tensor(ckpt / F, f"{name}.weight_scale", torch.ones(1))
    with raises_naming(CheckpointError, str(ckpt / F), f"float8_e4m3fn tensor '{name}.weight' with a 'weight_scale'", "already quantized"):
        oqcore.load(ckpt, "fp8_per_block")


def test_finegrained_fp8_scale_inv_is_refused(ckpt):
    name = "model.layers.1.self_attn.o_proj"
    replace_tensor(ckpt / F, f"{name}.weight", torch.zeros(160, 160, dtype=torch.float8_e4m3fn))
    replace_tensor(ckpt / F, f"{name}.weight_scale_inv", torch.ones(2, 2))
    with raises_naming(CheckpointError, str(ckpt / F), f"'{name}.weight' with a 'weight_scale_inv'"):
        oqcore.load(ckpt, "fp8_per_block")


def test_int8_weight_with_scale_is_refused(ckpt):
    name = "model.layers.0.self_attn.v_proj"
    replace_tensor(ckpt / F, f"{name}.weight", torch.zeros(80, 160, dtype=torch.int8))
    replace_tensor(ckpt / F, f"{name}.weight_scale", torch.ones(80, 1))
    with raises_naming(CheckpointError, str(ckpt / F), f"int8 tensor '{name}.weight' with a 'weight_scale'", "already quantized"):
        oqcore.load(ckpt, "fp8_per_block")


def test_gptq_packed_weights_are_refused(ckpt):
    name = "model.layers.0.self_attn.q_proj"
    rewrite(ckpt / F, lambda h, d: h.pop(f"{name}.weight"))
    for suffix, t in (("qweight", torch.zeros(20, 160, dtype=torch.int32)), ("qzeros", torch.zeros(1, 20, dtype=torch.int32)), ("scales", torch.ones(1, 160, dtype=torch.float16))):
        replace_tensor(ckpt / F, f"{name}.{suffix}", t)
    with raises_naming(CheckpointError, str(ckpt / F), f"int32 tensor '{name}.qweight'", "already quantized"):
        oqcore.load(ckpt, "fp8_per_block")


def test_mxfp4_blocks_and_scales_are_refused(tiny_moe, tmp_path):
    d = tmp_path / "g"
    shutil.copytree(tiny_moe("gpt_oss"), d)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    rewrite(d / F, lambda h, _: h.pop(name))
    replace_tensor(d / F, f"{name}_blocks", torch.zeros(4, 192, 5, 16, dtype=torch.uint8))
    replace_tensor(d / F, f"{name}_scales", torch.zeros(4, 192, 5, dtype=torch.uint8))
    with raises_naming(CheckpointError, str(d / F), f"uint8 tensor '{name}_blocks' with a 'gate_up_proj_scales'", "already quantized"):
        oqcore.load(d, "fp8_per_block")


def test_lone_scale_tensor_is_refused(ckpt):
    replace_tensor(ckpt / F, "model.layers.0.self_attn.k_proj.input_scale", torch.ones(1))
    with raises_naming(CheckpointError, str(ckpt / F), "'model.layers.0.self_attn.k_proj.input_scale'", "F32 [1]", "no place for"):
        oqcore.load(ckpt, "fp8_per_block")


@pytest.mark.parametrize(
    "name,content,culprits",
    [
        ("quantize_config.json", {"bits": 4, "group_size": 128, "desc_act": False}, ["GPTQ", "bits=4", "group_size=128"]),
        ("quant_config.json", {"w_bit": 4, "q_group_size": 128}, ["AWQ", "w_bit=4"]),
    ],
    ids=["gptq", "awq"],
)
def test_quantization_metadata_outside_config_json_is_refused(ckpt, name, content, culprits):
    (ckpt / name).write_text(json.dumps(content))
    with raises_naming(CheckpointError, str(ckpt / name), *culprits, "already quantized"):
        oqcore.load(ckpt, "fp8_per_block")


def test_declared_quant_method_is_still_refused(ckpt):
    _edit_config(ckpt, lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}))
    with raises_naming(CheckpointError, str(ckpt / "config.json"), "quant_method='gptq'", "transformers FineGrainedFP8 ('fp8')"):
        oqcore.load(ckpt, "fp8_per_block")


@pytest.mark.parametrize(
    "metadata",
    [
        ("config.json", {"quant_method": "fp8", "weight_block_size": [128, 128]}),
        ("hf_quant_config.json", {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8"}}),
    ],
    ids=["finegrained-fp8", "modelopt"],
)
def test_fp8_metadata_on_a_high_precision_checkpoint_names_the_weight(ckpt, metadata):
    """FineGrainedFP8 and ModelOpt checkpoints are read as stored (tests/test_import_peers.py); their
    metadata over bf16 tensors is a CheckpointError naming the first quantized layer's weight."""
    name, content = metadata
    if name == "config.json":
        _edit_config(ckpt, lambda c: c.update(quantization_config=content))
    else:
        (ckpt / name).write_text(json.dumps(content))
    with raises_naming(CheckpointError, str(ckpt / F), "tensor 'model.layers.0.self_attn.q_proj.weight' is BF16 [160, 160]", "expects float8_e4m3fn"):
        oqcore.load(ckpt)


def test_prequantized_detection_reads_no_tensor(ckpt, monkeypatch):
    import oqcore.loading.checkpoint as ck

    replace_tensor(ckpt / F, "model.layers.0.self_attn.q_proj.weight", torch.zeros(160, 160, dtype=torch.float8_e4m3fn))
    monkeypatch.setattr(ck.TensorReader, "read_into", lambda *a, **k: pytest.fail("a tensor was read"))
    with raises_naming(CheckpointError, str(ckpt / F), "already quantized"):
        oqcore.load(ckpt, "fp8_per_block")


# ---- arguments of load ---------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cuda:7", "bogus", 42, "meta", "cpu:x"], ids=["cuda7", "bogus", "int", "meta", "cpu-x"])
def test_bad_device_is_a_config_error_before_anything(tmp_path, device):
    # the folder does not even exist: the device is checked first
    with raises_naming(ConfigError, "device"):
        oqcore.load(tmp_path / "nowhere", "fp8_per_block", device=device)


@pytest.mark.parametrize(
    "dtype",
    [torch.int8, torch.float8_e4m3fn, torch.bool, "bfloat17", "int8", 3, None, torch.complex64],
    ids=["int8", "fp8", "bool", "bfloat17", "int8-name", "int", "none", "complex"],
)
def test_bad_dtype_is_a_config_error(ckpt, dtype):
    with raises_naming(ConfigError, "dtype", "valid"):
        oqcore.load(ckpt, "fp8_per_block", dtype=dtype)


@pytest.mark.parametrize("name,dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32), ("torch.float16", torch.float16)])
def test_dtype_names_are_accepted(tiny_moe, name, dtype):
    model = oqcore.load(tiny_moe("mixtral"), "fp8_per_block", dtype=name)
    assert model.model.norm.weight.dtype == dtype
    assert model.lm_head.weight.dtype == dtype
    assert model.oq_state.dtype == dtype


def test_progress_not_callable(ckpt):
    with raises_naming(ConfigError, "progress", "callable"):
        oqcore.load(ckpt, "fp8_per_block", progress=5)


def test_no_config_loads_unquantized_and_says_so(tiny_moe):
    path = tiny_moe("mixtral")
    with pytest.warns(UserWarning, match=r"0 layers quantized") as rec:
        model = oqcore.load(path)
    msg = str(rec[0].message)
    assert str(path) in msg and "no config was given" in msg
    assert model.oq_state.wrappers == {}
    ref = load_file(path / F)
    sd = model.state_dict()
    plain = [k for k in ref if "block_sparse_moe" not in k]  # renamed to mlp.* by transformers
    assert len(plain) > 10 and set(plain) <= sd.keys()
    for k in plain:
        assert sd[k].dtype == torch.bfloat16 and torch.equal(sd[k], ref[k]), k
    expert = ref["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    assert torch.equal(sd["model.layers.1.mlp.experts.gate_up_proj"][2, 96:], expert)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_config_matching_no_layer_warns(minilm):
    with pytest.warns(UserWarning, match=r"0 layers quantized: the config .* matches no layer"):
        model = oqcore.load(minilm, {"moe": "mxfp8"})
    assert model.oq_state.wrappers == {}


def test_quantizing_load_does_not_warn(tiny_moe):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = oqcore.load(tiny_moe("mixtral"), "fp8_per_block")
    assert len(model.oq_state.wrappers) == 10


def test_forged_minimal_checkpoint_loads(tmp_path, tiny_moe):
    """Positive control for the forging helpers: a checkpoint forged from scratch with the tiny
    model's tensors loads, so the refusals above are about the damage, not the forging."""
    d = tmp_path / "f"
    d.mkdir()
    shutil.copy(tiny_moe("mixtral") / "config.json", d / "config.json")
    header, data = pack(load_file(tiny_moe("mixtral") / F), metadata={"format": "pt"})
    forge(d / F, header, data)
    assert header_of(d / F)[0] == header
    assert oqcore.load(d, "fp8_per_block").oq_state.wrappers
