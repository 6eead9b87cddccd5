"""Torch reference quantizers of oq-plugin-int8: the definition of the numbers.

vLLM's symmetric int8 convention (``experts_int8`` / online int8, and its per-token activation
quantizer), applied along the last dim:

    amax  = max(|x|) over the last dim          (float32)
    scale = amax / 127                          (float32 dequantization multiplier)
    q     = clamp(round_half_even(x / scale), -127, 127)  as int8

A row whose ``scale`` is 0 (all zeros, or so tiny that ``amax / 127`` underflows) gets
``scale = torch.finfo(torch.float32).eps`` (compressed-tensors' rule), so it quantizes to exact zeros
instead of ``0 / 0 = NaN``.

compressed-tensors' int8 presets divide by 127.5 and clamp to ``[-128, 127]``; we do not: the
grid stays symmetric (``-128`` never appears), which is what vLLM's int8 kernels expect.

The same row-wise rule serves both keys: per-channel weights (``[N, K]`` -> scale ``[N, 1]``, or
``[E, N, K]`` -> ``[E, N, 1]``: one scale set per expert, never shared) and per-token dynamic
activations (``[M, K]`` -> ``[M, 1]``).

Externally reduced amax (tensor parallelism, :attr:`oqcore.QuantizerImpl.takes_amax`): the
quantizers take ``amax=``, the float32 max ``|x|`` of each row over the whole (unsharded) tensor,
shaped like the scale (``[..., N, 1]``, :func:`oqcore.groups.amax_grid` of the per-channel group).
It replaces the row amax computed from ``x``, so a column slice of a row-split weight gets exactly
the bytes and scales it has in the quantized whole tensor.
"""

from __future__ import annotations

import torch

INT8_MAX = 127
"""Largest magnitude on the symmetric grid (``-128`` is never produced)."""

ZERO_ROW_SCALE = torch.finfo(torch.float32).eps
"""Scale given to a row whose ``amax / 127`` is 0 (compressed-tensors' choice)."""


def check_amax(amax: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """An externally reduced row ``amax`` for ``x [..., K]``, as float32 on ``x``'s device, after
    checking its shape is ``[..., 1]`` (one entry per row). Raises ``ValueError`` naming both
    shapes otherwise (a caller's bug: the core reduces amax in this layout)."""
    want = (*x.shape[:-1], 1)
    if not isinstance(amax, torch.Tensor) or tuple(amax.shape) != want:
        got = list(amax.shape) if isinstance(amax, torch.Tensor) else type(amax).__name__
        raise ValueError(f"int8 amax for a tensor of shape {list(x.shape)} must have one entry per row, {list(want)}, got {got}")
    return amax.to(device=x.device, dtype=torch.float32)


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """``amax / 127`` in float32, zero scales replaced by eps (the row rule of the module docstring)."""
    scale = amax.float() / INT8_MAX
    return torch.where(scale == 0, torch.full_like(scale, ZERO_ROW_SCALE), scale)


def rowwise_scale(x: torch.Tensor) -> torch.Tensor:
    """``amax(|x|) / 127`` over the last dim, float32, keepdim (zero scales replaced by eps).

    ``x``: any float dtype, ``[..., K]``; returns ``[..., 1]`` float32.
    """
    amax = x.float().abs().amax(dim=-1, keepdim=True)
    scale = amax / INT8_MAX
    return torch.where(scale == 0, torch.full_like(scale, ZERO_ROW_SCALE), scale)


def quantize_int8_rowwise(
    x: torch.Tensor, options=None, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization with one float32 scale per row (last dim reduced).

    ``x``: ``[N, K]`` / ``[E, N, K]`` weights or ``[M, K]`` activations, any float dtype (upcast to
    float32 first). Returns ``(qdata int8, same shape as x; scale float32 [..., 1])`` with
    ``x ~= qdata * scale``. ``options`` is unused (the int8 methods take none). ``amax``: an
    externally reduced row amax (float32 ``[..., 1]``, see the module docstring) used instead of
    ``x`` 's own; ``ValueError`` for another shape. ``torch.round`` rounds half to even. Empty
    inputs return empty tensors.
    """
    x32 = x.float()
    a = None if amax is None else check_amax(amax, x)
    if x32.numel() == 0:
        empty = torch.empty(x.shape, dtype=torch.int8, device=x.device)
        if a is not None:
            return empty, scale_from_amax(a)
        return empty, torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    scale = rowwise_scale(x32) if a is None else scale_from_amax(a)
    q = torch.round(x32 / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16, options=None) -> torch.Tensor:
    """``qdata * scale`` computed in float32 (exact per element before the cast), returned in ``dtype``.

    ``qdata`` int8 ``[..., K]``; ``scale`` float32 broadcastable (``[..., 1]``).
    """
    return (qdata.to(torch.float32) * scale.to(torch.float32)).to(dtype)
