"""oqcore.load on the real all-MiniLM-L6-v2 (bundled): it must lose nothing beyond the format.

Reference figures (issue 4; round-to-nearest on this model, 32 sentences, bf16 reference): mean
embedding cosine int8 per-channel weight-only 0.9996, fp8 128x128 weight-only 0.9985, fp8 128x128
with 1x128 fp8 activations 0.9979, mxfp8 (rceil) weight-only 0.9984. oqcore must be within 0.0003.
"""

import pytest
import torch

import oqcore
from oqcore.fidelity import bundled_sentences, compare, reference_model
from oqcore.methods import OnlineMethodBase


@pytest.fixture(autouse=True)
def no_triton(monkeypatch):
    # Whole-model forwards run the CPU backends; Triton kernels are tested on small shapes elsewhere.
    monkeypatch.setenv("OQ_DISABLE_TRITON", "1")


@pytest.fixture(scope="module")
def reference(minilm):
    return reference_model(minilm, torch.bfloat16)


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"linear": {"weight": "int8_per_channel_static"}}, 0.9996),
        ({"linear": {"weight": "fp8_per_block_static", "activation": None}}, 0.9985),
        ("fp8_per_block", 0.9979),
        ({"linear": {"weight": "mxfp8", "activation": None}}, 0.9984),
    ],
    ids=["int8-wo", "fp8-block-wo", "fp8-block-w8a8", "mxfp8-wo"],
)
def test_minilm_embedding_cosine_matches_round_to_nearest(minilm, reference, config, expected):
    model = oqcore.load(minilm, config)
    fid = compare(model, reference, minilm)
    assert fid.kind == "encoder" and fid.samples == 32
    assert abs(fid.cosine - expected) <= 0.0003, fid.cosine


def test_minilm_report(minilm):
    model = oqcore.load(minilm, "fp8_per_block")
    rep = oqcore.report(model)
    assert rep.summary == "Quantized 37 layers of types: " + "; ".join(
        f"{t}: {n} (from linear: fp8_per_block_static)"
        for t, n in [("attention.self.query", 6), ("attention.self.key", 6), ("attention.self.value", 6),
                     ("attention.output.dense", 6), ("intermediate.dense", 6), ("output.dense", 6), ("pooler.dense", 1)]
    )
    (row,) = rep.rows
    assert (row.kind, row.weight, row.activation, row.quantizer, row.backend, row.count) == (
        "linear", "fp8_per_block_static", "fp8_per_block_dynamic", "cpu", "cpu", 37,
    )
    # 36 encoder linears + pooler: 21.3 M weights + 0.05 M biases, bf16 -> fp8 + bf16 bias + f32 block scales
    assert row.bytes_before == 21_570_816
    assert 0.50 < row.bytes_after / row.bytes_before < 0.51
    assert rep.seconds_total > 0 and rep.peak_rss >= rep.baseline_rss > 0
    text = str(rep)
    assert "linear  fp8_per_block_static  fp8_per_block_dynamic  cpu        cpu      37      20.6 MiB  10.3 MiB  0.50x" in text


def test_quantize_inplace_equals_online_load(minilm, reference):
    online = oqcore.load(minilm, "mxfp8")
    inplace = oqcore.quantize_(reference_model(minilm, torch.bfloat16), "mxfp8")
    ids = torch.randint(0, 30000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(online(input_ids=ids).last_hidden_state, inplace(input_ids=ids).last_hidden_state)
    assert oqcore.report(inplace).summary == oqcore.report(online).summary


def test_save_and_load_back_without_requantizing(minilm, tmp_path, monkeypatch):
    model = oqcore.load(minilm, {"linear": {"weight": "int8_per_channel_static"}})
    oqcore.save_quantized(model, tmp_path / "q")
    real = OnlineMethodBase.quantize_weight

    def forbidden(self, w, name):
        # the loader runs each method on the meta device to derive the tensor shapes it must find
        # in the folder (no numbers computed); quantizing real data would be re-quantizing
        if not w.is_meta:
            raise AssertionError("re-quantized on load")
        return real(self, w, name)

    monkeypatch.setattr(OnlineMethodBase, "quantize_weight", forbidden)
    back = oqcore.load(tmp_path / "q")
    ids = torch.randint(0, 30000, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, back(input_ids=ids).last_hidden_state)
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    with pytest.raises(oqcore.ConfigError, match=r"linear weight fp8_per_block_static conflicts with compressed-tensors checkpoint .*, which stores layer .* already quantized as int8_per_channel_static"):
        oqcore.load(tmp_path / "q", "fp8_per_block")


def test_bundled_sentences():
    s = bundled_sentences()
    assert len(s) == 32 and len(set(s)) == 32
