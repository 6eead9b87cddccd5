"""A packed 4-bit toy scheme written as a third-party author would, on contract v2 only.

``toy4``: int4 values in [-7, 7] stored two per byte (``qdata`` uint8 ``[N, K/2]``, element ``2k`` in
the low nibble, ``2k+1`` in the high one, two's complement), one float16 scale per 16 consecutive
values along K relative to a per-tensor float32 ``global_scale`` (NVFP4's two-level layout with
simpler numbers)::

    global_scale = max(amax(|w|), tiny) / (7 * 64)            float32 [1]     (per expert: [E, 1])
    scale_g      = fp16(amax_g / 7 / global_scale)             float16 [N, K/16]
    q            = clamp(round(w / (float(scale_g) * global_scale)), -7, 7)
    w_hat        = q * float(scale_g) * global_scale

The tests install this file as distribution ``oq-plugin-toy4`` (entry point ``toy4``) and run its
whole lifecycle; nothing under ``oqcore/`` knows about it. Two quantizer implementations
(``torch`` reference and ``toy4-lut``, same bytes) and one forward backend (``toy4-unpack``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oqcore import (
    Backend,
    GroupShape,
    KeyFormat,
    OnlineLinearMethodBase,
    QuantizerImpl,
    QuantKey,
    ScaleDesc,
    Scheme,
    UnsupportedLayerError,
    hookimpl,
)

GROUP = 16
QMAX = 7
TOY4 = QuantKey(
    torch.int4,
    ScaleDesc(torch.float16, True, GroupShape(1, GROUP)),
    scale2=ScaleDesc(torch.float32, True, GroupShape.PER_TENSOR),
)
TINY = torch.finfo(torch.float32).tiny


def _check_k(w: torch.Tensor) -> None:
    if w.shape[-1] % GROUP:
        raise ValueError(f"toy4 needs K divisible by {GROUP}, got shape {tuple(w.shape)}")


def _scales(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = w.float().reshape(*w.shape[:-1], w.shape[-1] // GROUP, GROUP)
    gs = (x.abs().amax().clamp(min=TINY) / (QMAX * 64)).reshape(1)
    scale = (x.abs().amax(-1) / QMAX / gs).to(torch.float16)
    return x, scale, gs


def _q(x: torch.Tensor, scale: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    div = (scale.float() * gs).unsqueeze(-1)
    div = torch.where(div == 0, 1.0, div)
    return torch.round(x / div).clamp(-QMAX, QMAX).to(torch.int8)


def pack(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], ``[..., K]`` (K even) -> uint8 ``[..., K/2]``, low nibble first."""
    u = q.to(torch.uint8) & 0xF
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack(p: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., K/2]`` -> int8 ``[..., K]`` (sign-extended nibbles)."""
    lo, hi = (p & 0xF).to(torch.int8), (p >> 4).to(torch.int8)
    v = torch.stack((lo, hi), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    return (v ^ 8) - 8


def quantize(w: torch.Tensor, options=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: ``w [N, K]`` -> ``(qdata uint8 [N, K/2], scale float16 [N, K/16], global_scale float32 [1])``."""
    _check_k(w)
    x, scale, gs = _scales(w)
    q = _q(x, scale, gs).reshape(w.shape)
    return pack(q), scale, gs


_LUT = torch.arange(16, dtype=torch.uint8)


def quantize_lut(w: torch.Tensor, options=None) -> dict[str, torch.Tensor]:
    """Same bytes as :func:`quantize` by another path (nibbles through a lookup table), by name."""
    _check_k(w)
    x, scale, gs = _scales(w)
    q = _q(x, scale, gs).reshape(w.shape)
    nib = _LUT[(q.to(torch.int64) & 0xF)]
    return {"global_scale": gs, "qdata": nib[..., 0::2] | (nib[..., 1::2] << 4), "scale": scale}


def dequantize(qdata, scale, global_scale, dtype, options=None) -> torch.Tensor:
    """``q * scale * global_scale`` per 16-group, ``[..., K]`` in ``dtype`` (float32 math)."""
    q = unpack(qdata).float()
    k = q.shape[-1]
    s = scale.float().repeat_interleave(GROUP, dim=-1)[..., :k] * global_scale.float().unsqueeze(-1)
    return (q * s).to(dtype)


def lut_supported(device, shape, dtype):
    if device.type != "cpu":
        return False, f"toy4-lut runs on the CPU, not {device.type}"
    return True, "CPU lookup-table packer"


def unpack_forward(method, layer, x):
    """Weight-only: unpack the weight to float32 once per call, ``F.linear`` in float32."""
    w = dequantize(layer.weight, layer.weight_scale, layer.weight_global_scale, torch.float32)
    bias = layer.bias.float() if layer.bias is not None else None
    return F.linear(x.float(), w, bias).to(x.dtype)


class Toy4Linear(OnlineLinearMethodBase):
    """What toy4 does differently for linears: K must be a multiple of the group."""

    @classmethod
    def check_layer(cls, name, layer):
        if layer.in_features % GROUP:
            raise UnsupportedLayerError(name, f"toy4 needs in_features divisible by {GROUP}, got {layer.in_features}")


FORMAT = KeyFormat(
    TOY4,
    dequantize,
    (
        QuantizerImpl("torch", quantize, description="reference"),
        QuantizerImpl("toy4-lut", quantize_lut, priority=10, is_supported=lut_supported, description="lookup packer"),
    ),
    tensors=("qdata", "scale", "global_scale"),
    values_per_element=2,
    element="int4",
)


def backends(kind, activation_key):
    if kind != "linear":
        return []
    return [Backend("toy4-unpack", activation_key, priority=10, forward=unpack_forward, description="unpack + F.linear")]


SCHEME = Scheme(
    "toy4",
    FORMAT,
    activations=(None,),
    backends=backends,
    methods={"linear": Toy4Linear},
    description="toy packed int4, two-level scales",
)


@hookimpl
def oq_register_quant_keys(register):
    register("toy4", weight=TOY4, description="toy packed int4")


@hookimpl
def oq_register_shorthands(register):
    register("toy4", linear={"weight": "toy4"}, moe={"weight": "toy4"})


@hookimpl
def oq_register_schemes(register):
    register(SCHEME)

