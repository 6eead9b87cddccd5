"""Round trip of oqcore's own export format (``format="oqcore"``): load(bf16, shorthand) ->
save_quantized -> load(saved) -> forward, for every `oq make-model` layout and the real MiniLM, under
every shorthand (the compressed-tensors default: tests/test_export_matrix.py).

The reloaded model must hold the same tensors bit for bit (same names, dtypes, shapes, bytes),
give bit-identical forward outputs, and never re-quantize anything (its tensors come from the file).
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import oqcore
from oqcore.saved_format import QUANT_METHOD
from oqcore.layer_tensors import _derive, _derive_any, _on_meta, quantized_tensors
from oqcore.methods import OnlineMethodBase

ARCHS = ["mixtral", "qwen3_moe", "olmoe", "gpt_oss"]
SHORTHANDS = ["fp8_per_tensor", "fp8_per_channel", "fp8_per_block", "mxfp8", "int8_per_channel_weight_only", "mxfp4", "nvfp4"]
MOE_ONLY = {"int8_per_channel_weight_only"}


@pytest.fixture(autouse=True)
def _cpu_backends(monkeypatch):
    """Saving and loading do not depend on the backend; the CPU backends keep these tests fast
    (conftest turns Triton's interpreter on, which would otherwise be chosen and is slow)."""
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")


def _source(name, tiny_moe, minilm):
    return minilm if name == "minilm" else tiny_moe(name)


def _forward(model) -> torch.Tensor:
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _state(model) -> dict[str, tuple[torch.dtype, tuple[int, ...], torch.Tensor]]:
    out = {}
    for k, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        out[k] = (t.dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8).clone() if t.numel() else t)
    return out


def _no_requantize(monkeypatch):
    """Quantizing a real tensor during the reload is an error (the meta-device probe that derives
    the expected tensor shapes is allowed: it computes no numbers)."""
    real = OnlineMethodBase.quantize_weight

    def guarded(self, w, name):
        if not w.is_meta:
            raise AssertionError(f"re-quantized {name} on load")
        return real(self, w, name)

    monkeypatch.setattr(OnlineMethodBase, "quantize_weight", guarded)


@pytest.mark.filterwarnings("ignore:.*0 layers quantized")  # the moe-only scheme on MiniLM, asserted below
@pytest.mark.parametrize("shorthand", SHORTHANDS)
@pytest.mark.parametrize("model_name", [*ARCHS, "minilm"])
def test_roundtrip_bit_identical(model_name, shorthand, tiny_moe, minilm, tmp_path, monkeypatch):
    src = _source(model_name, tiny_moe, minilm)
    try:
        original = oqcore.load(src, shorthand)
    except oqcore.ConfigError as e:
        # a moe-only scheme on a model without experts may be refused as quantizing nothing
        assert shorthand in MOE_ONLY and model_name == "minilm" and "moe" in str(e), e
        return
    wrappers = original.oq_state.wrappers
    if shorthand in MOE_ONLY and model_name == "minilm":
        assert wrappers == {}, "a moe-only scheme quantized layers of a model without experts"
    else:
        assert wrappers, f"{shorthand} quantized nothing in {model_name}"
    # what the loader derives from each method (meta-device probe) is what the method really made
    for name, specs in quantized_tensors(wrappers).items():
        real = {k: (tuple(p.shape), p.dtype) for k, p in wrappers[name].named_parameters(recurse=False)}
        assert {k: (s.shape, s.dtype) for k, s in specs.items()} == real, name
    kinds = {type(w).__name__ for w in wrappers.values()}
    if model_name != "minilm" and shorthand not in MOE_ONLY:
        assert kinds == {"QuantizedLinear", "QuantizedMoE"}, kinds
    if model_name in ("mixtral", "qwen3_moe", "olmoe") and shorthand not in MOE_ONLY:
        assert any(w.bias is None for w in wrappers.values() if type(w).__name__ == "QuantizedLinear")

    out = oqcore.save_quantized(original, tmp_path / "q", format="oqcore")
    assert out == (tmp_path / "q").resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"], "temporary folders left behind"

    _no_requantize(monkeypatch)
    back = oqcore.load(tmp_path / "q")
    assert back.oq_state.config.to_dict() == original.oq_state.config.to_dict()
    assert back.oq_state.wrappers.keys() == wrappers.keys()

    before, after = _state(original), _state(back)
    assert before.keys() == after.keys()
    for k, (dtype, shape, data) in before.items():
        assert after[k][0] == dtype and after[k][1] == shape, f"{k}: {after[k][:2]} != {(dtype, shape)}"
        assert torch.equal(after[k][2], data), f"{k} differs after the round trip"
    ref, got = _forward(original), _forward(back)
    assert torch.isfinite(ref.float()).all()
    assert torch.equal(ref, got), f"forward differs after the round trip (max {((ref.float() - got.float()).abs().max())})"

    # what is on disk: quantized tensors under the wrappers' names, readable by the safetensors library
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["producer"] == QUANT_METHOD
        for name, w in wrappers.items():
            for pname, p in w.named_parameters(recurse=False):
                assert f"{name}.{pname}" in keys
                assert torch.equal(f.get_tensor(f"{name}.{pname}").view(torch.uint8), p.detach().view(torch.uint8))


@pytest.mark.parametrize("fmt", ["oqcore", "compressed-tensors"])
def test_reload_with_the_saved_config_is_fine_and_another_is_a_config_error(fmt, tiny_moe, tmp_path):
    src = tiny_moe("mixtral")
    original = oqcore.load(src, "fp8_per_channel")
    oqcore.save_quantized(original, tmp_path / "q", format=fmt)
    for same_config in ("fp8_per_channel", original.oq_state.config, original.oq_state.config.to_dict()):
        same = oqcore.load(tmp_path / "q", same_config)
        assert torch.equal(_forward(same), _forward(original))
    files = {p.name: p.read_bytes() for p in (tmp_path / "q").iterdir() if p.is_file()}
    with pytest.raises(oqcore.ConfigError, match="already quantized") as e:
        oqcore.load(tmp_path / "q", "mxfp8")
    assert str(tmp_path / "q") in str(e.value)
    assert {p.name: p.read_bytes() for p in (tmp_path / "q").iterdir() if p.is_file()} == files


def test_resave_of_a_reloaded_export_is_identical(tiny_moe, tmp_path):
    """A reloaded export saved again (to a new folder) gives the same tensors."""
    original = oqcore.load(tiny_moe("gpt_oss"), "mxfp8")
    oqcore.save_quantized(original, tmp_path / "a", format="oqcore")  # gpt-oss's fused experts
    back = oqcore.load(tmp_path / "a")
    oqcore.save_quantized(back, tmp_path / "b", format="oqcore")
    again = oqcore.load(tmp_path / "b")
    assert _state(again).keys() == _state(original).keys()
    for k, v in _state(original).items():
        assert torch.equal(_state(again)[k][2], v[2]), k
    assert torch.equal(_forward(again), _forward(original))


@pytest.mark.parametrize("shorthand", ["fp8_per_tensor", "fp8_per_block", "mxfp8", "int8_per_channel_weight_only"])
@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_expert_count_extrapolation_equals_the_full_derivation(arch, shorthand, tiny_moe):
    """Fused experts are probed with 1 and 2 experts and extrapolated to E (the full per-expert
    probe costs E quantizer calls on the meta device): the same specs as probing all E."""
    model = oqcore.load(tiny_moe(arch), shorthand)
    moe = [w for w in model.oq_state.wrappers.values() if type(w).__name__ == "QuantizedMoE"]
    assert moe and all(w.layout.num_experts > 3 for w in moe)
    for w in moe:
        assert _derive_any(w, _on_meta) == _derive(w, _on_meta)
