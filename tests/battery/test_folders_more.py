"""Battery: more model folders given to ``oqcore.load`` (bf16 checkpoints and save_quantized exports).

Damaged exports whose values (not layout) are wrong: a scale that is NaN, infinite, zero or
negative, or float8 data holding NaN, would load and give a silently wrong model; ``load`` refuses
them with :class:`oqcore.CheckpointError` naming the file and the tensor, and never writes to the
folder. vLLM/compressed-tensors do not check scale values; save_quantized never writes such values
(every quantizer clamps its scales to a positive finite value), so refusing them is safe.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import oqcore
from oqcore import CheckpointError
from tests.battery.st_forge import header_of, replace_tensor
from tests.battery.util import raises_naming

F = "model.safetensors"
Q = "model.layers.0.self_attn.q_proj"
EXP = "model.layers.0.mlp.experts"


@pytest.fixture(autouse=True)
def _cpu_backends(monkeypatch):
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")


@pytest.fixture(scope="module")
def saved(tiny_moe, tmp_path_factory) -> dict[str, Path]:
    """Per scheme, a tiny Mixtral quantized and saved (built once)."""
    out = {}
    for scheme in ("fp8_per_channel", "mxfp8"):
        model = oqcore.load(tiny_moe("mixtral"), scheme)
        out[scheme] = oqcore.save_quantized(model, tmp_path_factory.mktemp("saved") / scheme, format="oqcore")
    return out


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy(src: Path, tmp_path: Path) -> Path:
    d = tmp_path / "damaged"
    shutil.copytree(src, d)
    return d


def _set(folder: Path, name: str, fill) -> None:
    """Replace tensor ``name`` with a tensor of its dtype and shape, values from ``fill(float32 tensor)``."""
    header, data = header_of(folder / F)
    info = header[name]
    start, end = info["data_offsets"]
    dtype = {"F32": torch.float32, "F8_E8M0": torch.float8_e8m0fnu, "F8_E4M3": torch.float8_e4m3fn}[info["dtype"]]
    old = torch.frombuffer(bytearray(data[start:end]), dtype=torch.uint8).view(dtype).reshape(info["shape"])
    new = fill(old.float().clone()).to(dtype)
    from tests.battery import st_forge

    st_forge.TAGS.setdefault(torch.float8_e8m0fnu, "F8_E8M0")
    replace_tensor(folder / F, name, new)


def _first(t: torch.Tensor, v: float) -> torch.Tensor:
    t.view(-1)[0] = v
    return t


SCALE_CASES = {
    "nan": float("nan"),
    "inf": float("inf"),
    "neg_inf": float("-inf"),
    "negative": -0.5,
    "zero": 0.0,
}


@pytest.mark.parametrize("value", list(SCALE_CASES), ids=list(SCALE_CASES))
@pytest.mark.parametrize("tensor", [f"{Q}.weight_scale", f"{EXP}.w2_weight_scale"], ids=["linear", "experts"])
def test_bad_scale_value_fp8(saved, tmp_path, tensor, value):
    d = _copy(saved["fp8_per_channel"], tmp_path)
    _set(d, tensor, lambda t: _first(t, SCALE_CASES[value]))
    before = _tree(d)
    with raises_naming(CheckpointError, str(d / F), tensor, "finite and positive"):
        oqcore.load(d)
    assert _tree(d) == before


@pytest.mark.parametrize("tensor", [f"{Q}.weight_scale", f"{EXP}.w13_weight_scale"], ids=["linear", "experts"])
def test_nan_e8m0_scale_mxfp8(saved, tmp_path, tensor):
    """e8m0 byte 0xFF is NaN (the only non-finite e8m0 value; e8m0 has no zero or sign)."""
    d = _copy(saved["mxfp8"], tmp_path)
    header, data = header_of(d / F)
    start, _ = header[tensor]["data_offsets"]
    blob = bytearray((d / F).read_bytes())
    n = int.from_bytes(blob[:8], "little")
    blob[8 + n + start] = 0xFF
    (d / F).write_bytes(bytes(blob))
    with raises_naming(CheckpointError, str(d / F), tensor, "finite and positive"):
        oqcore.load(d)


@pytest.mark.parametrize("tensor", [f"{Q}.weight", f"{EXP}.w2_weight"], ids=["linear", "experts"])
def test_nan_float8_data(saved, tmp_path, tensor):
    """e4m3fn has NaN at 0x7F/0xFF only; the quantizers saturate, so it never occurs in an export."""
    d = _copy(saved["fp8_per_channel"], tmp_path)
    header, _ = header_of(d / F)
    start, _ = header[tensor]["data_offsets"]
    blob = bytearray((d / F).read_bytes())
    n = int.from_bytes(blob[:8], "little")
    blob[8 + n + start + 3] = 0xFF
    (d / F).write_bytes(bytes(blob))
    with raises_naming(CheckpointError, str(d / F), tensor, "NaN"):
        oqcore.load(d)


def test_tiny_positive_scale_loads(saved, tmp_path):
    """The check is on finiteness and sign only: a tiny positive scale is a valid export."""
    d = _copy(saved["fp8_per_channel"], tmp_path)
    _set(d, f"{Q}.weight_scale", lambda t: _first(t, 1e-30))
    model = oqcore.load(d)
    assert model.get_submodule(Q).weight_scale.view(-1)[0].item() == pytest.approx(1e-30)


# ---- bf16 checkpoints: which file is read, unused tensors, pickled checkpoints ----------------


@pytest.fixture
def ckpt(tiny_moe, tmp_path) -> Path:
    d = tmp_path / "m"
    shutil.copytree(tiny_moe("mixtral"), d)
    return d


def _add(folder: Path, name: str, t: torch.Tensor) -> None:
    from tests.battery.st_forge import add_tensors

    add_tensors(folder / F, {name: t})


UNUSED = {
    "plain": "model.layers.0.not_a_weight.weight",
    "zero_size": "model.layers.0.empty",
    "unicode_long": "model." + "\u00e9" * 400,
}


@pytest.mark.parametrize("kind", list(UNUSED), ids=list(UNUSED))
def test_unused_tensor_warns_and_loads(ckpt, kind):
    """As transformers ("Some weights ... were not used"): the load goes on, and says which."""
    name = UNUSED[kind]
    _add(ckpt, name, torch.zeros(0 if kind == "zero_size" else 4, dtype=torch.bfloat16))
    with pytest.warns(UserWarning, match="not used by MixtralForCausalLM") as rec:
        model = oqcore.load(ckpt, "fp8_per_tensor")
    msg = str(rec[0].message)
    assert str(ckpt / F) in msg and name[:100] in msg
    assert model.oq_state.stats.unexpected_keys == [name]


def test_refused_load_does_not_warn_about_unused(ckpt):
    """A load that fails says one thing: the error, not also a warning about skipped tensors."""
    import warnings

    _add(ckpt, "model.layers.0.extra", torch.zeros(2, dtype=torch.bfloat16))
    header, _ = header_of(ckpt / F)
    replace_tensor(ckpt / F, f"{Q}.weight", torch.zeros(3, 3, dtype=torch.bfloat16))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with raises_naming(CheckpointError, str(ckpt / F), f"{Q}.weight"):
            oqcore.load(ckpt, "fp8_per_tensor")
    assert not [w for w in rec if "not used" in str(w.message)]


def test_single_file_wins_over_index(ckpt):
    """transformers reads model.safetensors when present and ignores an index next to it; so does
    oqcore (the index here names a shard that does not exist, and is not even read)."""
    import json

    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "missing.safetensors"}}))
    model = oqcore.load(ckpt, "fp8_per_tensor")
    assert len(model.oq_state.wrappers) > 0


@pytest.mark.parametrize("legacy", ["pytorch_model.bin", "pytorch_model.bin.index.json"])
def test_pickled_checkpoint_only_is_refused(ckpt, legacy):
    from safetensors.torch import load_file

    (ckpt / legacy).write_bytes(b"x" if legacy.endswith("json") else b"")
    if legacy.endswith(".bin"):
        torch.save(load_file(ckpt / F), ckpt / legacy)
    (ckpt / F).unlink()
    with raises_naming(CheckpointError, str(ckpt), legacy, "safetensors only"):
        oqcore.load(ckpt, "fp8_per_tensor")


# ---- per-expert indices: the count is right but an index is out of range or repeated ---------

EXPERT_ARCHS = {"mixtral": "block_sparse_moe.experts", "qwen3_moe": "mlp.experts", "olmoe": "mlp.experts"}


def _rename_experts(folder: Path, old: str, new: str) -> str:
    from safetensors.torch import load_file, save_file

    t = load_file(folder / F)
    moved = [k for k in t if f".experts.{old}." in k]
    for k in moved:
        t[k.replace(f".experts.{old}.", f".experts.{new}.")] = t.pop(k)
    save_file(t, folder / F)
    return sorted(moved)[0].replace(f".experts.{old}.", f".experts.{new}.")


@pytest.mark.parametrize("arch", list(EXPERT_ARCHS))
def test_expert_index_out_of_range(tiny_moe, tmp_path, arch):
    """experts.4 in place of experts.3 with E=4: same count, but expert 3 would be silently missing."""
    d = tmp_path / "m"
    shutil.copytree(tiny_moe(arch), d)
    _rename_experts(d, "3", "4")
    with raises_naming(CheckpointError, str(d / F), ".experts.4.", "expert 4", "4 experts"):
        oqcore.load(d, "fp8_per_tensor")


def test_expert_index_repeated(ckpt):
    """experts.03 and experts.3 are both expert 3 (and expert 2 is missing)."""
    name = _rename_experts(ckpt, "2", "03")
    with raises_naming(CheckpointError, str(ckpt / F), "both expert 3"):
        oqcore.load(ckpt, "fp8_per_tensor")
    assert name.split(".experts.")[1].startswith("03.")


# ---- config.json far bigger than the checkpoint: refused before the (slow) meta build ----------


@pytest.mark.parametrize("layers", [100_000, 10**9])
def test_huge_layer_count_is_refused_before_building(ckpt, layers):
    """Building 100k layers on meta takes minutes; the header names say at once that it cannot fit."""
    import json

    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with raises_naming(CheckpointError, str(ckpt / "config.json"), "num_hidden_layers", str(layers), "layers 0..1"):
        oqcore.load(ckpt, "fp8_per_tensor")


def test_huge_layer_count_of_an_export_is_refused(saved, tmp_path):
    import json

    d = _copy(saved["fp8_per_channel"], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 100_000
    (d / "config.json").write_text(json.dumps(cfg))
    before = _tree(d)
    with raises_naming(CheckpointError, str(d / "config.json"), "num_hidden_layers"):
        oqcore.load(d)
    assert _tree(d) == before


def test_fused_and_per_expert_tensors_both_present(ckpt):
    """The fused ``experts.gate_up_proj`` (right shape) next to the per-expert w1/w3 it is made of."""
    from safetensors.torch import load_file, save_file

    t = load_file(ckpt / F)
    src = "model.layers.0.block_sparse_moe.experts.{}.{}.weight"
    w1 = torch.stack([t[src.format(i, "w1")] for i in range(4)])
    w3 = torch.stack([t[src.format(i, "w3")] for i in range(4)])
    t["model.layers.0.mlp.experts.gate_up_proj"] = torch.cat([w1, w3], 1)
    save_file(t, ckpt / F)
    with raises_naming(CheckpointError, str(ckpt / F), "'model.layers.0.mlp.experts.gate_up_proj'", "per-expert", "w1.weight"):
        oqcore.load(ckpt, "fp8_per_tensor")


# ---- quantized layers with no tensor: refused before anything is read ---------------------------


@pytest.mark.parametrize("header", [{}, {"__metadata__": {"format": "pt"}}], ids=["empty", "only_metadata"])
def test_empty_checkpoint_is_refused_before_reading(ckpt, header):
    from tests.battery.st_forge import forge

    forge(ckpt / F, header)
    with raises_naming(CheckpointError, str(ckpt), "no tensor for", f"'{Q}.weight'"):
        oqcore.load(ckpt, "fp8_per_tensor")


def test_quantized_tied_lm_head_missing_says_tied(tiny_moe, tmp_path):
    """lm_head tied to the embeddings is stored once (as the embedding): quantizing it on its own
    cannot work, and the error says so instead of 'never received its weights'."""
    import json

    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    shutil.copytree(tiny_moe("qwen3_moe"), d)
    t = load_file(d / F)
    t.pop("lm_head.weight")
    save_file(t, d / F)
    cfg = json.loads((d / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    with raises_naming(CheckpointError, str(d), "'lm_head.weight'", "tied to model.embed_tokens.weight", "ignore"):
        oqcore.load(d, {"targets": {"re:.*proj": "fp8_per_tensor_static", "re:lm_head": "fp8_per_tensor_static"}})
    # not quantized, the tied lm_head loads as transformers does: one tensor shared with the embedding
    model = oqcore.load(d, "fp8_per_tensor")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
