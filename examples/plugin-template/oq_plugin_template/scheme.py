"""The int4_g32 scheme: its key, reference quantizer, and the one Scheme record that states the rest.

``w ≈ q * scale`` with ``q`` in [-7, 7] (symmetric int4 without -8, stored in int8) and one float32
``scale = amax / 7`` per group of 32 consecutive input features; all-zero groups get
``finfo(float32).eps`` so dequantization never divides by zero.
"""

import torch

from oqcore import (
    GroupShape,
    KeyFormat,
    OnlineLinearMethodBase,
    QuantizerImpl,
    QuantKey,
    ScaleDesc,
    Scheme,
    UnsupportedLayerError,
)

GROUP = 32
QMAX = 7
kInt4G32 = QuantKey(torch.int4, ScaleDesc(torch.float32, True, GroupShape(1, GROUP)))


def quantize(w: torch.Tensor, options) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., N, K]`` (K divisible by 32) -> ``(q int8 [..., N, K], scale float32 [..., N, K/32])``.

    Raises ``ValueError`` (the core turns it into an UnsupportedLayerError naming the tensor) when
    K is not a multiple of 32."""
    if w.shape[-1] % GROUP:
        raise ValueError(f"int4_g32 needs K divisible by {GROUP}, got shape {tuple(w.shape)}")
    g = w.float().unflatten(-1, (-1, GROUP))
    scale = g.abs().amax(-1) / QMAX
    scale = torch.where(scale == 0, torch.finfo(torch.float32).eps, scale)
    q = (g / scale.unsqueeze(-1)).round().clamp(-QMAX, QMAX).to(torch.int8)
    return q.flatten(-2), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, options) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``[..., N, K]`` in ``dtype``."""
    return (q.float().unflatten(-1, (-1, GROUP)) * scale.unsqueeze(-1)).flatten(-2).to(dtype)


class Int4G32Linear(OnlineLinearMethodBase):
    """What this scheme does differently from the base linear method: a shape rule. The base class
    does create / process / apply through the format's quantizer and dequantizer."""

    @classmethod
    def check_layer(cls, name, layer):
        """K must be a multiple of the group size."""
        if layer.in_features % GROUP:
            raise UnsupportedLayerError(name, f"int4_g32 needs in_features divisible by {GROUP}, got {layer.in_features}")


FORMAT = KeyFormat(
    kInt4G32,
    dequantize,
    (QuantizerImpl("torch", quantize, description="float32 reference (the definition of the numbers)"),),
    tensors=("qdata", "scale"),  # stored as `weight` and `weight_scale`
    element="int4",
)

SCHEME = Scheme(
    "int4_g32",  # the core derives Int4G32LinearMethod from this record
    FORMAT,
    activations=(None,),  # weight-only: activations stay in the model dtype
    kinds=("linear",),
    methods={"linear": Int4G32Linear},
    description="int4 weight-only, symmetric, 1x32 groups",
)
