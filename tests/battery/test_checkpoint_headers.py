"""Battery: safetensors headers validated against the file and against the model.

Every malformed header (forged byte by byte) and every header that disagrees with the model makes
``oqcore.load`` raise one :class:`oqcore.CheckpointError` naming the file and the tensor (or
header field) and what would be valid, before any weight is read; the process default dtype is
untouched afterwards.
"""

from __future__ import annotations

import shutil

import pytest
import torch

import oqcore
from oqcore import CheckpointError
from oqcore.loading.checkpoint import file_entries
from tests.battery.st_forge import forge, header_of, pack, replace_tensor, rewrite
from tests.battery.util import raises_naming

F = "model.safetensors"


@pytest.fixture(autouse=True)
def no_triton(monkeypatch):
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")


@pytest.fixture
def shell(tiny_moe, tmp_path):
    """A model folder with the tiny Mixtral's config.json and no weights yet."""
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(tiny_moe("mixtral") / "config.json", d / "config.json")
    return d


@pytest.fixture
def ckpt(tiny_moe, tmp_path):
    """A private copy of the whole tiny Mixtral, to damage."""
    d = tmp_path / "m"
    shutil.copytree(tiny_moe("mixtral"), d)
    return d


def _base() -> tuple[dict, bytes]:
    """Two well-formed tensors: 'a' F32 [2, 2] at [0, 16) and 'b' F32 [4] at [16, 32)."""
    return pack({"a": torch.arange(4, dtype=torch.float32).reshape(2, 2), "b": torch.ones(4)})


def _with(name: str, **fields) -> tuple[dict, bytes]:
    header, data = _base()
    header[name] = {**header[name], **fields}
    return header, data


# (id, header, data, forced length field or None, culprits the message must name besides the file)
MALFORMED = [
    ("overlap", *_with("b", data_offsets=[8, 24]), None, ["'a'", "'b'", "overlap"]),
    ("overlap-contained", *_with("b", data_offsets=[4, 20]), None, ["'a'", "'b'", "overlap"]),
    ("negative-begin", *_with("b", data_offsets=[-16, 0]), None, ["'b'", "negative", "0 <= begin <= end"]),
    ("negative-end", *_with("b", data_offsets=[16, -1]), None, ["'b'", "negative"]),
    ("reversed", *_with("b", data_offsets=[32, 16]), None, ["'b'", "reversed", "0 <= begin <= end"]),
    ("past-end-of-file", *_with("b", data_offsets=[32, 48]), None, ["'b'", "does not fit the file"]),
    ("offsets-not-a-list", *_with("b", data_offsets="16-32"), None, ["'b'", "data_offsets", "two integers"]),
    ("offsets-three", *_with("b", data_offsets=[16, 24, 32]), None, ["'b'", "data_offsets", "two integers"]),
    ("offsets-float", *_with("b", data_offsets=[16.0, 32.0]), None, ["'b'", "data_offsets", "two integers"]),
    ("offsets-bool", *_with("b", data_offsets=[False, True]), None, ["'b'", "data_offsets", "two integers"]),
    ("negative-dim", *_with("b", shape=[-4]), None, ["'b'", "-4", "non-negative integers"]),
    ("float-dim", *_with("a", shape=[2, 2.0]), None, ["'a'", "2.0", "non-negative integers"]),
    ("string-dim", *_with("a", shape=["2", 2]), None, ["'a'", "'2'", "non-negative integers"]),
    ("bool-dim", *_with("b", shape=[True]), None, ["'b'", "True", "non-negative integers"]),
    ("shape-not-a-list", *_with("b", shape=4), None, ["'b'", "shape", "list of non-negative integers"]),
    ("shape-null", *_with("b", shape=None), None, ["'b'", "shape", "list of non-negative integers"]),
    ("unknown-dtype", *_with("b", dtype="F12"), None, ["'b'", "'F12'", "valid: F64, F32"]),
    ("lowercase-dtype", *_with("b", dtype="bf16"), None, ["'b'", "'bf16'", "BF16"]),
    ("dtype-not-a-string", *_with("b", dtype=32), None, ["'b'", "32", "valid:"]),
    ("too-few-bytes", *_with("b", shape=[5]), None, ["'b'", "16 bytes", "needs 5 x 4 = 20 bytes"]),
    ("too-many-bytes", *_with("b", shape=[3]), None, ["'b'", "16 bytes", "needs 3 x 4 = 12 bytes"]),
    ("dtype-size-mismatch", *_with("b", dtype="F16"), None, ["'b'", "16 bytes", "needs 4 x 2 = 8 bytes"]),
    ("entry-not-an-object", {**_base()[0], "b": [0, 16]}, _base()[1], None, ["'b'", "must be an object"]),
    ("entry-missing-dtype", {**_base()[0], "b": {"shape": [4], "data_offsets": [16, 32]}}, _base()[1], None, ["'b'", "no dtype", "needs dtype, shape, data_offsets"]),
    ("header-a-list", [1, 2], b"", None, ["a JSON list, not an object"]),
    ("header-a-string", "weights", b"", None, ["corrupt safetensors header"]),
    ("header-nan", b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', bytes(4), None, ["NaN"]),
    ("header-duplicate-name", b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', bytes(4), None, ["'a'", "twice"]),
    ("header-binary", b"\xff\xfe\x00garbage\x81", b"", None, ["not UTF-8"]),
    ("header-not-json", b"{not json at all", b"", None, ["corrupt safetensors header", "not valid JSON"]),
    ("metadata-a-list", {"__metadata__": ["format", "pt"]}, b"", None, ["'__metadata__'", "strings to strings"]),
    ("metadata-non-string-value", {"__metadata__": {"format": 1}}, b"", None, ["'__metadata__'", "'format'", "must be strings"]),
    ("header-length-past-file", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), 4096, ["header length 4096", "past the end of the file"]),
    ("header-length-implausible", {}, b"", 1 << 40, ["implausible"]),
    ("header-length-zero", b"", b"", None, ["corrupt safetensors header"]),
]


@pytest.mark.parametrize("header,data,length,culprits", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_header_is_refused_by_load(shell, header, data, length, culprits):
    forge(shell / F, header, data, length=length)
    with raises_naming(CheckpointError, str(shell / F), *culprits):
        oqcore.load(shell, "fp8_per_block")
    assert torch.get_default_dtype() == torch.float32


def test_file_shorter_than_its_length_field(shell):
    (shell / F).write_bytes(b"\x10\x00\x00")
    with raises_naming(CheckpointError, str(shell / F), "3 bytes", "8-byte header length"):
        oqcore.load(shell, "fp8_per_block")


def test_weights_file_is_a_directory(shell):
    (shell / F).mkdir()
    with raises_naming(CheckpointError, str(shell / F), "not a regular file"):
        oqcore.load(shell, "fp8_per_block")


@pytest.mark.parametrize(
    "offsets",
    [
        {"a": [0, 16], "b": [48, 64]},  # a gap between tensors
        {"b": [0, 16], "a": [16, 32]},  # stored in another order than listed
        {"a": [16, 32], "b": [32, 48]},  # leading gap
    ],
    ids=["gap", "reordered", "leading-gap"],
)
def test_gaps_and_order_are_fine(shell, offsets):
    header, _ = _base()
    for k, v in offsets.items():
        header[k]["data_offsets"] = v
    forge(shell / F, header, bytes(64))
    entries = {e.name: e for e in file_entries(shell / F)}
    assert {k: (e.offset - entries["a"].offset + offsets["a"][0]) for k, e in entries.items()} == {k: v[0] for k, v in offsets.items()}
    assert [e.name for e in file_entries(shell / F)] == sorted(offsets, key=lambda k: offsets[k][0])


def test_zero_size_tensor_may_sit_anywhere(shell):
    header, data = _base()
    header["empty"] = {"dtype": "BF16", "shape": [0, 3], "data_offsets": [8, 8]}
    forge(shell / F, header, data)
    assert {e.name: e.nbytes for e in file_entries(shell / F)} == {"a": 16, "b": 16, "empty": 0}


# ---- headers against the model ---------------------------------------------------------------


def test_integer_tensor_where_model_has_floating_weight(ckpt):
    replace_tensor(ckpt / F, "model.norm.weight", torch.ones(160, dtype=torch.int32))
    with raises_naming(CheckpointError, str(ckpt / F), "'model.norm.weight'", "I32 [160]", "bfloat16", "valid: a floating tensor"):
        oqcore.load(ckpt, "fp8_per_block")


def test_bool_tensor_where_model_has_floating_weight(ckpt):
    replace_tensor(ckpt / F, "model.layers.0.self_attn.q_proj.weight", torch.ones(160, 160, dtype=torch.bool))
    with raises_naming(CheckpointError, str(ckpt / F), "'model.layers.0.self_attn.q_proj.weight'", "BOOL", "floating"):
        oqcore.load(ckpt, "fp8_per_block")


def test_integer_expert_tensor_where_model_fuses_floating_experts(ckpt):
    name = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
    replace_tensor(ckpt / F, name, torch.ones(96, 160, dtype=torch.int8))
    with raises_naming(CheckpointError, str(ckpt / F), repr(name), "'model.layers.1.mlp.experts.gate_up_proj'", "floating"):
        oqcore.load(ckpt, {"moe": "mxfp8"})


def test_floating_tensor_where_model_has_integer_buffer(minilm, tmp_path):
    d = tmp_path / "minilm"
    shutil.copytree(minilm, d)
    replace_tensor(d / F, "embeddings.position_ids", torch.zeros(1, 512))
    with raises_naming(CheckpointError, str(d / F), "'embeddings.position_ids'", "F32 [1, 512]", "int64", "valid: an integer tensor"):
        oqcore.load(d, "fp8_per_tensor")


def test_fp8_tensor_where_model_expects_bf16(ckpt):
    replace_tensor(ckpt / F, "model.layers.0.self_attn.o_proj.weight", torch.zeros(160, 160, dtype=torch.float8_e4m3fn))
    with raises_naming(CheckpointError, str(ckpt / F), "float8_e4m3fn tensor 'model.layers.0.self_attn.o_proj.weight'", "already quantized"):
        oqcore.load(ckpt, "fp8_per_block")


def test_shape_mismatch_names_file_tensor_and_expected_shape(ckpt):
    replace_tensor(ckpt / F, "model.layers.0.self_attn.k_proj.weight", torch.zeros(80, 161, dtype=torch.bfloat16))
    with raises_naming(CheckpointError, str(ckpt / F), "'model.layers.0.self_attn.k_proj.weight'", "[80, 161]", "expects [80, 160]"):
        oqcore.load(ckpt, "fp8_per_block")


def test_expert_shape_mismatch_names_the_expert_tensor(ckpt):
    name = "model.layers.0.block_sparse_moe.experts.3.w2.weight"
    replace_tensor(ckpt / F, name, torch.zeros(160, 95, dtype=torch.bfloat16))
    with raises_naming(CheckpointError, str(ckpt / F), repr(name), "[160, 95]", "must be [160, 96]"):
        oqcore.load(ckpt, {"moe": "mxfp8"})


def test_unquantized_layer_shape_mismatch_is_caught_before_reading(ckpt, monkeypatch):
    replace_tensor(ckpt / F, "lm_head.weight", torch.zeros(300, 159, dtype=torch.bfloat16))
    import oqcore.loading.checkpoint as ck

    monkeypatch.setattr(ck.TensorReader, "read_into", lambda *a, **k: pytest.fail("a tensor was read"))
    with raises_naming(CheckpointError, str(ckpt / F), "'lm_head.weight'", "[300, 159]", "[300, 160]"):
        oqcore.load(ckpt, "fp8_per_block")


def test_malformed_headers_are_refused_before_any_read(ckpt, monkeypatch):
    def change(header, data):
        begin, end = header["model.norm.weight"]["data_offsets"]
        assert begin > 0
        header["model.norm.weight"]["data_offsets"] = [begin - 2, end - 2]  # overlaps the tensor stored before it

    rewrite(ckpt / F, change)
    import oqcore.loading.checkpoint as ck

    monkeypatch.setattr(ck.TensorReader, "read_into", lambda *a, **k: pytest.fail("a tensor was read"))
    with raises_naming(CheckpointError, str(ckpt / F), "'model.norm.weight'", "overlap"):
        oqcore.load(ckpt, "fp8_per_block")


def test_truncated_weights_file_names_the_tensor(ckpt):
    header, data = header_of(ckpt / F)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    forge(ckpt / F, header, data[:-10])
    with raises_naming(CheckpointError, str(ckpt / F), repr(last), "does not fit the file"):
        oqcore.load(ckpt, "fp8_per_block")
