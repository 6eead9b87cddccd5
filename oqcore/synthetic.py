"""Small real-architecture checkpoints for demos, tests and benchmarks (no network needed).

Tiny MoE causal LMs are built with transformers from a config (Mixtral, Qwen3-MoE, OLMoE and
GPT-OSS layouts), randomly initialized with a fixed seed and saved with ``save_pretrained``, so the
on-disk layout is the architecture's real one (per-expert tensors for Mixtral/Qwen3-MoE/OLMoE,
fused transposed experts with biases for GPT-OSS). Default sizes are deliberately not multiples of
128 (hidden 160, intermediate 96) but are multiples of 32, as MXFP8 needs.
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS: dict[str, dict] = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96, head_dim=40),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=40),
}

DENSE_ARCHS: dict[str, dict] = {"llama": {}, "qwen3": {}}
"""Dense causal LMs :func:`make_tiny_dense` builds (transformers' own tensor-parallel plans)."""


def make_tiny_moe(
    arch: str,
    out: str | Path,
    *,
    hidden_size: int = 160,
    intermediate_size: int = 96,
    num_layers: int = 2,
    num_experts: int | None = None,
    vocab_size: int = 300,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int | None = None,
) -> Path:
    """Build a random ``arch`` MoE causal LM (one of :data:`ARCHS`) and save it to ``out``.

    Sizes are in elements; ``num_experts`` overrides the default 4; ``head_dim`` the
    architecture's default (40, or hidden / heads). The weights are transformers' own random init
    from the CPU generator seeded with ``seed``, so the same arguments give the same bytes; the
    caller's global random state is left as it was.
    Raises :class:`oqcore.UnknownKeyError` (a ``ValueError`` too) for an unknown ``arch``.
    """
    if arch not in ARCHS:
        from oqcore.errors import UnknownKeyError

        raise UnknownKeyError.for_name(arch, ARCHS, what="architecture", field="arch")
    extra = dict(ARCHS[arch])
    if num_experts is not None:
        extra["num_local_experts" if "num_local_experts" in extra else "num_experts"] = num_experts
    if "moe_intermediate_size" in extra:
        extra["moe_intermediate_size"] = intermediate_size
    return _build(arch, out, extra, hidden_size, intermediate_size, num_layers, vocab_size, seed, dtype,
                  num_attention_heads, num_key_value_heads, head_dim)


def make_tiny_dense(
    arch: str,
    out: str | Path,
    *,
    hidden_size: int = 160,
    intermediate_size: int = 96,
    num_layers: int = 2,
    vocab_size: int = 300,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int | None = None,
) -> Path:
    """Build a random dense ``arch`` causal LM (one of :data:`DENSE_ARCHS`: ``llama``, ``qwen3``)
    and save it to ``out``; arguments and determinism as :func:`make_tiny_moe`.
    Raises :class:`oqcore.UnknownKeyError` for an unknown ``arch``."""
    if arch not in DENSE_ARCHS:
        from oqcore.errors import UnknownKeyError

        raise UnknownKeyError.for_name(arch, DENSE_ARCHS, what="architecture", field="arch")
    return _build(arch, out, dict(DENSE_ARCHS[arch]), hidden_size, intermediate_size, num_layers, vocab_size, seed,
                  dtype, num_attention_heads, num_key_value_heads, head_dim)


def _build(arch, out, extra, hidden_size, intermediate_size, num_layers, vocab_size, seed, dtype, heads, kv_heads, head_dim) -> Path:
    """Build ``arch`` from a config with ``extra`` fields, seeded, and save it to ``out``."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if head_dim is not None:
        extra["head_dim"] = head_dim
    cfg = AutoConfig.for_model(
        arch,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab_size,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        **extra,
    )
    # transformers initializes from the global CPU generator; seed it inside fork_rng so the
    # caller's random state is back as it was when this returns (CPU only: the model is built there).
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    out = Path(out)
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
    finally:
        if was:
            hf_logging.enable_progress_bar()
    return out


def perturbed_copy(src: str | Path, out: str | Path, *, scale: float = 0.05, seed: int = 1) -> Path:
    """A second checkpoint of the same model: every floating tensor ``w + scale * std(w) * noise``
    (as an RL step would produce), written with the same names; the other files are copied."""
    import shutil

    from safetensors.torch import save_file

    from oqcore.loading.checkpoint import iter_checkpoint

    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, t in iter_checkpoint(src):
        if t.is_floating_point() and t.numel() > 1:
            noise = torch.randn(t.shape, generator=g)
            t = (t.float() + scale * t.float().std() * noise).to(t.dtype)
        tensors[name] = t
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and not f.name.endswith(".index.json"):
            shutil.copy2(f, out / f.name)
    return out
