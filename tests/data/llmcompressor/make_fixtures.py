"""Regenerate the llm-compressor checkpoints in this folder (test data; not a test module).

The folders next to this script were written by llm-compressor itself, so that
``tests/test_import_llmcompressor.py`` checks ``oqcore.load`` against real artifacts of the other
tool (``tests/ct_reference.py`` only reuses compressed-tensors' compressors). llm-compressor pins
older compressed-tensors / transformers than the project, so it cannot be a test dependency: the
fixtures were generated once, with

    llmcompressor 0.14.0.1, compressed-tensors 0.19.0, transformers 5.17.0, torch 2.13.0+cpu

(the exact versions are also recorded in ``versions.json``), and are committed.

To regenerate (writes every fixture folder and ``versions.json`` beside this file, replacing them)::

    python -m venv /tmp/lcvenv && /tmp/lcvenv/bin/pip install llmcompressor==0.14.0.1
    /tmp/lcvenv/bin/python tests/data/llmcompressor/make_fixtures.py

or only some folders: ``make_fixtures.py dense_NVFP4A16 moe_NVFP4A16`` (the FP4 ones,
``FP4_FIXTURES``, were added this way with the same versions).

What is written (``FIXTURES``):

- two bf16 source models made by transformers from a fixed seed (``make_source``; ``DENSE_SOURCE``:
  LlamaForCausalLM, hidden 128, intermediate 128, 2 layers, vocab 64, untied lm_head;
  ``MOE_SOURCE``: Qwen3MoeForCausalLM, hidden 128, 2 experts of intermediate 128 (so 128x128
  blocks split gate from up), top-1, 2 layers). They are not committed: the tests rebuild them
  with ``make_source`` (transformers 5.17 and 5.24 give the same bytes from the seed) and check
  the rebuilt high-precision tensors against the ones stored in the fixtures; ``versions.json``
  records the sha256 of each source's tensors;
- for each scheme, the source quantized by llm-compressor's own entry point, saved as it saves:
  ``llmcompressor.model_free_ptq`` for the data-free schemes (what its examples use), and
  ``oneshot`` + ``QuantizationModifier`` with a 2-sample calibration set of random token ids for
  ``FP8`` (static activation scales need calibration; model_free_ptq refuses them). The ignore
  lists are the ones llm-compressor's examples pass: ``model.embed_tokens`` and ``lm_head`` for
  model_free_ptq (its ``Linear`` target matches every 2D weight by name), ``lm_head`` for oneshot,
  plus the MoE routers ``re:.*mlp.gate$``.

Nothing here is imported by the tests: llmcompressor is imported inside the functions only.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 0

# transformers config arguments of the two source models (bf16, random init from SEED)
DENSE_SOURCE = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "vocab_size": 64,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
# Every in-features is a multiple of 128: model_free_ptq 0.14.0.1 crashes on FP8_BLOCK when K % 128
# != 0 (it saves the un-padded weight as a non-contiguous slice: safetensors refuses it).
MOE_SOURCE = {
    "model_type": "qwen3_moe",
    "hidden_size": 128,
    "intermediate_size": 128,
    "moe_intermediate_size": 128,
    "num_experts": 2,
    "num_experts_per_tok": 1,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "vocab_size": 64,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

DENSE_IGNORE = ["model.embed_tokens", "lm_head"]
MOE_IGNORE = ["model.embed_tokens", "lm_head", "re:.*mlp.gate$"]

# folder -> (source, scheme, entry point). Scheme names: compressed-tensors presets, except
# W8A16_CHANNEL (int8 per-channel symmetric weight-only) and FP8_W8A16 (the FP8 preset's
# per-tensor weights without activations), which have no preset and are built in `_scheme`.
FIXTURES: dict[str, tuple[str, str, str]] = {
    "dense_FP8_DYNAMIC": ("dense", "FP8_DYNAMIC", "model_free_ptq"),
    "dense_FP8_BLOCK": ("dense", "FP8_BLOCK", "model_free_ptq"),
    "dense_MXFP8": ("dense", "MXFP8", "model_free_ptq"),
    "dense_MXFP8A16": ("dense", "MXFP8A16", "model_free_ptq"),
    "dense_W8A16": ("dense", "W8A16", "model_free_ptq"),
    "dense_W8A16_CHANNEL": ("dense", "W8A16_CHANNEL", "model_free_ptq"),
    "dense_FP8_W8A16": ("dense", "FP8_W8A16", "model_free_ptq"),
    "dense_FP8": ("dense", "FP8", "oneshot"),
    "moe_FP8_DYNAMIC": ("moe", "FP8_DYNAMIC", "model_free_ptq"),
    "moe_FP8_BLOCK": ("moe", "FP8_BLOCK", "model_free_ptq"),
    "moe_MXFP8": ("moe", "MXFP8", "model_free_ptq"),
    "moe_W8A16_CHANNEL": ("moe", "W8A16_CHANNEL", "model_free_ptq"),
    "moe_FP8_W8A16": ("moe", "FP8_W8A16", "model_free_ptq"),
}

# The 4-bit float presets (issue 14), written by the same entry point: compressed-tensors'
# nvfp4-pack-quantized (NVFP4A16: e2m1 + float8_e4m3fn scales per 16 + a float32 global scale)
# and mxfp4-pack-quantized (MXFP4A16 / MXFP4: e2m1 + e8m0 exponents per 32; MXFP4 also declares
# dynamic mxfp4 input activations). model_free_ptq fuses the global scales of q/k/v and of a dense
# MLP's gate/up (its DEFAULT_FUSED_MAPPINGS), not of the MoE experts' gate/up: each expert's gate
# and up keep their own global scale (the case oqcore must requantize to one per expert).
FP4_FIXTURES: dict[str, tuple[str, str, str]] = {
    "dense_NVFP4A16": ("dense", "NVFP4A16", "model_free_ptq"),
    "dense_MXFP4A16": ("dense", "MXFP4A16", "model_free_ptq"),
    "dense_MXFP4": ("dense", "MXFP4", "model_free_ptq"),
    "moe_NVFP4A16": ("moe", "NVFP4A16", "model_free_ptq"),
    "moe_MXFP4A16": ("moe", "MXFP4A16", "model_free_ptq"),
}
FIXTURES.update(FP4_FIXTURES)


def _scheme(name: str):
    """The compressed-tensors QuantizationScheme (or preset name) for a FIXTURES scheme."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme

    if name == "W8A16_CHANNEL":
        args = QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True, dynamic=False)
        return QuantizationScheme(targets=["Linear"], weights=args)
    if name == "FP8_W8A16":
        return QuantizationScheme(targets=["Linear"], weights=preset_name_to_scheme("FP8", ["Linear"]).weights)
    return name


def make_source(kind: str, out: Path) -> Path:
    """Build the bf16 source model ``kind`` ("dense" / "moe") from SEED and save it to ``out``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(DENSE_SOURCE if kind == "dense" else MOE_SOURCE)
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    return out


def _calibration_set(vocab_size: int):
    """Two samples of 16 random token ids (no data set download; the scales only need some input)."""
    import torch
    from datasets import Dataset

    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(3, vocab_size, (2, 16), generator=gen).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 16 for _ in ids]})


def _tokenizer(vocab_size: int):
    """A word-level tokenizer over ``vocab_size`` made-up tokens, built in memory: oneshot requires a
    processor whenever a data set is given, even one already tokenized (it is not saved)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def quantize(src: Path, out: Path, kind: str, scheme: str, entry: str) -> None:
    """Quantize ``src`` with llm-compressor's ``entry`` point and save it to ``out``."""
    import torch

    if entry == "model_free_ptq":
        from llmcompressor import model_free_ptq

        model_free_ptq(
            str(src), str(out), scheme=_scheme(scheme), ignore=DENSE_IGNORE if kind == "dense" else MOE_IGNORE,
            device="cpu",
        )  # fmt: skip
        return
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    ignore = ["lm_head"] + ([] if kind == "dense" else ["re:.*mlp.gate$"])
    recipe = QuantizationModifier(targets="Linear", scheme=_scheme(scheme), ignore=ignore)
    oneshot(
        model=model, processor=_tokenizer(model.config.vocab_size),
        dataset=_calibration_set(model.config.vocab_size), recipe=recipe,
        num_calibration_samples=2, max_seq_length=16, shuffle_calibration_samples=False,
    )  # fmt: skip
    model.save_pretrained(out, save_compressed=True)


def tensors_sha256(folder: Path) -> str:
    """sha256 over a checkpoint's tensors (names, dtypes, shapes, bytes, in name order)."""
    import hashlib

    from safetensors.torch import load_file

    h = hashlib.sha256()
    tensors = load_file(folder / "model.safetensors")
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def main(only: list[str] | None = None) -> None:
    """Write the fixture folders named in ``only`` (every one in ``FIXTURES`` if ``None``) and
    ``versions.json`` (its ``fixtures`` table lists every fixture; the versions are this run's)."""
    import tempfile

    import compressed_tensors
    import llmcompressor
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        sources = {kind: make_source(kind, Path(tmp) / f"source_{kind}") for kind in ("dense", "moe")}
        for name, (kind, scheme, entry) in FIXTURES.items():
            if only is not None and name not in only:
                continue
            out = HERE / name
            shutil.rmtree(out, ignore_errors=True)
            quantize(sources[kind], out, kind, scheme, entry)
        source_sha = {kind: tensors_sha256(d) for kind, d in sources.items()}
    versions = {
        "llmcompressor": llmcompressor.__version__,
        "compressed_tensors": compressed_tensors.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "source_tensors_sha256": source_sha,
        "fixtures": {k: {"source": v[0], "scheme": v[1], "entry_point": v[2]} for k, v in FIXTURES.items()},
    }
    (HERE / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")


if __name__ == "__main__":
    # ``make_fixtures.py NAME ...`` regenerates only those folders (e.g. the FP4 ones)
    main(sys.argv[1:] or None)
