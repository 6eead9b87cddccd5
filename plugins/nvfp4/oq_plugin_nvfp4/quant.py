"""Torch reference NVFP4 quantizer: the definition of the bytes every other backend must match.

Format (NVIDIA NVFP4, as compressed-tensors 0.20.1 writes it in ``nvfp4-pack-quantized``
checkpoints): the last dim K is cut into blocks of 16 consecutive elements; each block has one
``float8_e4m3fn`` scale, the tensor (each expert of an ``[E, N, K]`` stack) one float32 global
scale; elements are e2m1 (:mod:`oq_plugin_mxfp4.fp4`), two per byte, element ``2j`` in the low
nibble of byte ``j``.

Storage: ``qdata`` uint8 ``[..., K/2]``, ``scale`` float8_e4m3fn ``[..., K/16]``, ``global_scale``
float32 ``[1]`` (``[E, 1]`` for an ``[E, N, K]`` stack). ``global_scale`` is compressed-tensors'
``weight_global_scale``: a QUANTIZATION multiplier ``448 * 6 / amax``, so
``w ~= e2m1(q) * (scale.float() / global_scale)``.

The rules, step for step as compressed-tensors computes them for a float32 tensor
(``generate_gparam``, ``calculate_qparams`` with ``TENSOR_GROUP``/group 16/scale dtype e4m3, then
``quantize`` -> ``_quantize`` and ``pack_fp4_to_uint8``; every operation one float32 rounding):

1. ``amax = max|w|`` over the tensor (over each expert); ``g = fl(fl(1 / max(amax, 2**-126)) * 2688)``
   (``2688.0 / t`` on a tensor is ``t.reciprocal() * 2688`` in torch: the reciprocal, then the
   product, which differs from a true division in about a quarter of inputs); ``g = 1`` where that
   overflows (an all-zero or denormal tensor).
2. Per block: ``s = fl(g * fl(amax_b / 6))``, clamped to 448, rounded to e4m3 (nearest even; below
   ``2**-10`` it becomes 0); a zero scale becomes ``0.125`` (compressed-tensors' "eps" for e4m3,
   byte ``0x20``), so all-zero blocks get scale 0.125 and zero codes, never NaN.
3. Per element: ``t = fl(s / g)`` (one per block), ``y = fl(w / t)`` (a true division), clamped to
   +-6, e2m1 rounding (nearest, ties to even: :func:`oq_plugin_mxfp4.fp4.e2m1_encode`), except that
   ``y == -0.0`` gets code 0 (compressed-tensors takes the sign from ``torch.sign``, which is +0 for
   -0.0; a negative ``y`` that rounds to zero keeps code 8, ``-0``).

bf16 / fp16 inputs are upcast to float32 first (exact), as the other oqcore schemes do.
compressed-tensors computes ``g`` and ``amax_b / 6`` in the weight's dtype instead (the elements are
divided in float32 either way), so for bf16 weights llm-compressor's bytes differ: on the committed
llm-compressor NVFP4A16 fixtures (tests/data/llmcompressor, bf16 sources, given their fused global
scales) 0.5 % of the element bytes and 1.5 % of the scale bytes differ from ours, while
compressed-tensors' functions run on the bf16 tensors reproduce them exactly. For fp16 weights with
``max |w| < 2688 / 65504 ~ 0.041`` compressed-tensors' fp16 global scale overflows and falls back to
1.0 (block scales then underflow); computing in float32 avoids that.

torchao 0.18 (``torchao.prototype.mx_formats.nvfp4_tensor.nvfp4_quantize`` / ``NVFP4Tensor.to_nvfp4``
with ``per_tensor_scale = per_tensor_amax_to_scale(amax)``) writes the same layout with other
arithmetic:

- its per-tensor scale is a DEQUANTIZATION multiplier, ``fl(amax / 2688)`` (a true division), where
  compressed-tensors stores the quantization multiplier ``fl(fl(1 / amax) * 2688)``; the two are not
  exact reciprocals of each other (relative difference up to ~2**-23);
- block scale ``fl(fl(amax_b / 6) / per_tensor_scale)`` (a division) vs ``fl(g * fl(amax_b / 6))``;
- clamping: torchao clamps block scales to ``[2**-6, 448]`` (``finfo(e4m3).tiny``, the smallest
  NORMAL), so it never writes e4m3 subnormal scales (bytes 0x01-0x07) and an all-zero block gets
  ``0x08``; compressed-tensors keeps subnormal scales, and a scale that rounds to 0 (all-zero block,
  or below ``2**-10``) becomes 0.125 (``0x20``);
- elements: ``x * fl(fl(1 / per_tensor_scale) / s)`` (a multiplication by a reciprocal, as its MSLK
  Triton kernel) vs ``x / fl(s / g)`` (a true division);
- ``-0.0`` encodes as code 8 in torchao, 0 in compressed-tensors.

Measured on N(0, 1) 4096 x 4096, seeds 0-3: 0-1 of 1,048,576 scale bytes and 3-4 of 8,388,608
element bytes differ (the tests pin the individual cases); weight SQNR is the same, 20.44 dB.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from oq_plugin_mxfp4.fp4 import F4_MAX, dequantize_codes, e2m1_encode, pack_fp4
from oq_plugin_nvfp4.keys import NV_BLOCK

F8_MAX = 448.0
"""Largest float8_e4m3fn value: the block scale's clamp."""
GLOBAL_NUMERATOR = F8_MAX * F4_MAX
"""2688 = 448 * 6: ``global_scale = 2688 / amax`` maps the tensor maximum to the largest block scale."""
ZERO_SCALE = 0.125
"""The block scale written for a block whose scale rounds to zero (compressed-tensors' e4m3 eps)."""
F32_TINY = torch.finfo(torch.float32).tiny


class Nvfp4Options(BaseModel):
    """Options of the nvfp4 methods and quantizers (``QuantSpec.options``): none.

    NVFP4's rules are fixed by the format (compressed-tensors' bytes); compressed-tensors exposes
    no knob for them either (its observers choose the amax, which here is always the min-max one).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_k(w: torch.Tensor) -> None:
    if w.dim() < 1 or w.shape[-1] % NV_BLOCK:
        raise ValueError(
            f"nvfp4 needs the last dim divisible by {NV_BLOCK} (blocks of {NV_BLOCK} along K), got shape {tuple(w.shape)}"
        )
    if w.dim() > 3:
        raise ValueError(
            f"nvfp4 quantizes [K], [N, K] / [M, K] (one global scale) or [E, N, K] (one per expert), got shape {tuple(w.shape)}"
        )


def global_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' ``generate_gparam`` for NVFP4: float32 ``amax`` (>= 0, any shape) ->
    float32 global scales of the same shape, ``fl(fl(1 / max(amax, 2**-126)) * 2688)``, 1.0 where
    that is not finite.

    Use it to share one global scale between fused layers (q/k/v, gate/up: llm-compressor fuses
    their observers, and vLLM needs one scale per fused weight): pass the scale of the largest
    ``amax`` as ``global_scale`` to :func:`quantize_nvfp4`.
    """
    a = amax.to(torch.float32).clamp(min=F32_TINY)
    g = a.reciprocal() * GLOBAL_NUMERATOR  # what CT's `2688.0 / a` executes (Tensor.__rtruediv__)
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0)


def compute_global_scale(w: torch.Tensor) -> torch.Tensor:
    """float32 global scale of ``w``: ``[1]`` for ``[K]`` / ``[N, K]`` / ``[M, K]``, ``[E, 1]``
    (one per expert) for ``[E, N, K]``; :func:`global_scale_from_amax` of ``max |w|``."""
    x = w.to(torch.float32)
    shape = (w.shape[0], 1) if w.dim() == 3 else (1,)
    if w.numel() == 0:  # no values: compressed-tensors' fallback global scale (amax 0 -> 1.0)
        amax = torch.zeros(shape, dtype=torch.float32, device=w.device)
    else:
        amax = x.abs().reshape(shape[0], -1).amax(dim=1).reshape(shape)
    return global_scale_from_amax(amax)


def amax_shape(w: torch.Tensor) -> tuple[int, ...]:
    """The shape of an externally reduced amax for ``w``: the per-tensor grid of
    :func:`oqcore.groups.amax_grid`, ``[*lead, 1, 1]`` (``[1, 1]`` for ``[N, K]``, ``[E, 1, 1]``
    for an ``[E, N, K]`` stack; ``[1, 1]`` for a 1-D ``[K]`` too)."""
    return (*w.shape[:-2], 1, 1)


def global_scale_of_amax(amax: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The global scale (``[1]`` or ``[E, 1]``, float32) of ``w`` from an externally reduced
    ``amax`` (tensor parallelism: the max ``|w|`` of the whole tensor, of each expert, shaped
    :func:`amax_shape`): :func:`global_scale_from_amax`. Raises ``ValueError`` naming both shapes
    for another shape (a caller's bug: the core reduces amax in this layout)."""
    want = amax_shape(w)
    if not isinstance(amax, torch.Tensor) or tuple(amax.shape) != want:
        got = list(amax.shape) if isinstance(amax, torch.Tensor) else type(amax).__name__
        raise ValueError(f"nvfp4 amax for a tensor of shape {tuple(w.shape)} must have shape {list(want)} (per tensor), got {got}")
    g = global_scale_from_amax(amax.to(device=w.device))
    return g.reshape(w.shape[0], 1) if w.dim() == 3 else g.reshape(1)


def _global_view(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``g`` ([1] or [E, 1]) shaped to broadcast against ``[..., K/16, 16]`` blocks of ``w``."""
    return g.reshape(-1, *([1] * w.dim())) if w.dim() == 3 else g.reshape([1] * (w.dim() + 1))


def _check_global(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    want = (w.shape[0], 1) if w.dim() == 3 else (1,)
    if tuple(g.shape) != want or g.dtype != torch.float32:
        raise ValueError(
            f"nvfp4 global_scale for a tensor of shape {tuple(w.shape)} must be float32 of shape {list(want)}, "
            f"got {g.dtype} {list(g.shape)}"
        )
    return g


def quantize_nvfp4(
    w: torch.Tensor,
    options: BaseModel | None = None,
    *,
    global_scale: torch.Tensor | None = None,
    amax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``w`` to NVFP4 (compressed-tensors' bytes, see the module docstring for the rules).

    ``w``: ``[N, K]`` weights, ``[E, N, K]`` an expert stack or ``[M, K]`` activations (dynamic
    W4A4: the global scale comes from the input itself), float32 / bf16 / fp16 (upcast to
    float32). Returns ``(qdata uint8 [..., K/2], scale float8_e4m3fn [..., K/16], global_scale
    float32 [1] or [E, 1])`` with ``w ~= e2m1(qdata) * (scale.float() / global_scale)`` per block.

    ``global_scale`` overrides the computed one (same shape and dtype as the result's; e.g. one
    shared by fused q/k/v, from :func:`global_scale_from_amax`). ``amax``: an externally reduced
    amax (tensor parallelism, :attr:`oqcore.QuantizerImpl.takes_amax`: the max ``|w|`` of the
    whole tensor / of each expert, float32 shaped :func:`amax_shape`, ``[*lead, 1, 1]``); the
    global scale is made from it (:func:`global_scale_of_amax`), the 1x16 block scales from ``w``
    as always, so a slice of N or of K (on 16-element blocks) gets the bytes it has in the whole
    tensor. ``options``: :class:`Nvfp4Options` (no fields). Raises ``ValueError`` if K is not a
    multiple of 16, for more than 3 dims, for a ``global_scale`` or ``amax`` of the wrong
    shape/dtype, or for both given. NaN/Inf are not checked here (callers reject them; the ``cpu``
    implementation raises :class:`oqcore.NonFiniteError`). No data-dependent control flow (runs
    on meta tensors).
    """
    _check_k(w)
    if amax is not None:
        if global_scale is not None:
            raise ValueError("nvfp4: give global_scale or amax, not both (amax determines the global scale)")
        global_scale = global_scale_of_amax(amax, w)
    g = compute_global_scale(w) if global_scale is None else _check_global(global_scale, w)
    shape = w.shape
    x = w.to(torch.float32).reshape(*shape[:-1], shape[-1] // NV_BLOCK, NV_BLOCK)
    gb = _global_view(g, w)
    amax = x.abs().amax(-1, keepdim=True)
    s = gb * (amax / F4_MAX)  # CT calculate_qparams: max / (bit_range / 2), then global_scale * scales
    s8 = s.clamp(-F8_MAX, F8_MAX).to(torch.float8_e4m3fn)
    sf = s8.to(torch.float32)
    sf = torch.where(sf == 0, ZERO_SCALE, sf)  # CT: zero scales -> eps (0.125 for e4m3)
    y = x / (sf / gb)  # CT _quantize: scale = scale / global_scale; x / scale
    y = y.clamp(-F4_MAX, F4_MAX).reshape(shape)
    codes = e2m1_encode(y).masked_fill(y == 0, 0)  # CT: sign(-0.0) is +0 -> code 0
    return pack_fp4(codes), sf.squeeze(-1).to(torch.float8_e4m3fn), g


def dequantize_nvfp4(
    qdata: torch.Tensor,
    scale: torch.Tensor,
    global_scale: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    options: BaseModel | None = None,
) -> torch.Tensor:
    """``e2m1(qdata) * fl(scale / global_scale)`` per 16-block in float32 (compressed-tensors'
    ``_dequantize``: the scale is divided by the global scale first), then cast to ``dtype``.

    ``qdata`` uint8 ``[..., K/2]``; ``scale`` float8_e4m3fn ``[..., K/16]``; ``global_scale``
    float32 ``[1]`` (or ``[E, 1]`` for ``[E, N, K/2]`` qdata). Returns ``[..., K]``.
    """
    vals = dequantize_codes(qdata.view(torch.uint8), torch.float32)
    shape = vals.shape
    g = global_scale.to(torch.float32)
    g = g.reshape(-1, 1, 1) if qdata.dim() == 3 else g.reshape([1] * max(qdata.dim(), 1))
    t = scale.to(torch.float32) / g
    x = vals.reshape(*shape[:-1], shape[-1] // NV_BLOCK, NV_BLOCK) * t.unsqueeze(-1)
    return x.reshape(shape).to(dtype)
