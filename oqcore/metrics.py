"""Error metrics used by tests, reports and benchmarks."""

from __future__ import annotations

import torch


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum(ref^2) / sum((ref - approx)^2))``,
    computed in float64. ``inf`` when the two are equal."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum()
    signal = ref.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity between the rows of ``a`` and ``b`` (``[M, D]``), in float64."""
    return float(torch.nn.functional.cosine_similarity(a.detach().double(), b.detach().double(), dim=-1).mean())
