"""How close a quantized model stays to its high-precision self, on bundled text.

- Encoders (sentence-embedding models such as all-MiniLM-L6-v2): mean-pooled sentence embeddings
  (sentence-transformers' pooling for that model) of 32 bundled sentences; the figure is the mean
  cosine similarity between the quantized and reference embeddings.
- Causal LMs: next-token logits on the same sentences; the figures are the logits' SQNR in dB
  and top-1 agreement (fraction of positions whose argmax token is the same).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from oqcore.metrics import mean_cosine, sqnr


def bundled_sentences() -> list[str]:
    """The 32 English sentences shipped with oqcore for fidelity checks."""
    text = resources.files("oqcore").joinpath("data/sentences.txt").read_text()
    return [s for s in text.splitlines() if s.strip()]


@dataclass
class Fidelity:
    """``kind`` is ``"encoder"`` (``cosine`` set) or ``"causal-lm"`` (``logits_sqnr_db``, ``top1_agreement``)."""

    kind: str
    samples: int
    cosine: float | None = None
    logits_sqnr_db: float | None = None
    top1_agreement: float | None = None

    def to_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)

    def __str__(self) -> str:
        if self.kind == "encoder":
            return f"mean embedding cosine vs bf16 on {self.samples} sentences: {self.cosine:.4f}"
        return (
            f"logits SQNR vs bf16: {self.logits_sqnr_db:.1f} dB, top-1 agreement {self.top1_agreement:.1%} "
            f"over {self.samples} positions"
        )


def _is_causal_lm(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForCausalLM")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json")


def _inputs(path: Path, model: nn.Module, sentences: list[str]) -> dict[str, torch.Tensor]:
    vocab = int(getattr(model.config, "vocab_size", 1000))
    if any((path / f).is_file() for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        batch = dict(tok(sentences, padding=True, truncation=True, max_length=64, return_tensors="pt"))
        if batch["input_ids"].numel() and int(batch["input_ids"].max()) < vocab:
            return batch
    # No usable tokenizer (synthetic models): the same deterministic token ids every time.
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (len(sentences), 24), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def compare(quantized: nn.Module, reference: nn.Module, path: str | Path, sentences: list[str] | None = None) -> Fidelity:
    """Compare ``quantized`` with ``reference`` (the same checkpoint in high precision) on
    ``sentences`` (default: :func:`bundled_sentences`), tokenized with the folder's tokenizer."""
    sentences = sentences or bundled_sentences()
    batch = _inputs(Path(path), reference, sentences)
    mask = batch["attention_mask"].bool()
    if _is_causal_lm(reference):
        a = reference(**batch).logits.float()[mask]
        b = quantized(**batch).logits.float()[mask]
        agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
        return Fidelity("causal-lm", int(mask.sum()), logits_sqnr_db=sqnr(a, b), top1_agreement=agree)
    a = reference(**batch).last_hidden_state.float()
    b = quantized(**batch).last_hidden_state.float()
    m = mask.unsqueeze(-1).float()
    ea, eb = (a * m).sum(1) / m.sum(1), (b * m).sum(1) / m.sum(1)
    return Fidelity("encoder", len(sentences), cosine=mean_cosine(ea, eb))


def reference_model(path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> nn.Module:
    """The plain transformers model of ``path`` in ``dtype`` (``from_pretrained``, the baseline of
    :func:`compare`)."""
    from transformers.utils import logging as hf_logging

    from oqcore.loading.meta import model_class

    cls = model_class(path)
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return cls.from_pretrained(str(path), dtype=dtype, local_files_only=True).to(device).eval()
    finally:
        if was:
            hf_logging.enable_progress_bar()
