"""The FP4 element format, e2m1 (OCP MX v1.0 section 5.3.3): encoding, decoding and two-per-byte packing.

One sign bit, two exponent bits (bias 1), one mantissa bit; no Inf or NaN. The 16 codes are
``sign << 3 | magnitude`` with magnitudes ``0, 0.5, 1, 1.5, 2, 3, 4, 6`` (codes 0-7): max 6.0.
Shared by every scheme with e2m1 elements (``mxfp4`` here, ``nvfp4`` in oq-plugin-nvfp4).

Packing (torchao ``pack_uint4``, compressed-tensors ``pack_fp4_to_uint8``, gpt-oss ``*_blocks``):
element ``2j`` of the last dim in the low nibble of byte ``j``, element ``2j + 1`` in the high
nibble, so ``[..., K]`` codes pack to ``uint8 [..., K/2]``.

Rounding is round-to-nearest, ties to the even code (the one whose mantissa bit is 0), as
torchao's ``f32_to_f4_unpacked``: ties 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2,
3.5 -> 4, 5 -> 4. The sign is the input's sign bit (so ``-0.0`` and negatives that round to zero
give code 8, ``-0``, as torchao; compressed-tensors' packer writes code 0 for an exact ``-0.0``
input, the one input where the two differ).
"""

from __future__ import annotations

import functools

import torch

F4_MAX = 6.0
"""Largest e2m1 magnitude."""

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""The value of each of the 16 codes."""

# (threshold, tie rounds up): a magnitude passing k thresholds gets code k. A tie goes to the even
# code: up where the upper neighbour's mantissa bit is 0 (codes 2, 4, 6), down otherwise.
_THRESHOLDS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (uint8, 0-15, one per element, unpacked) of float32 ``x``, rounded to nearest
    (ties to even) and saturated to +-6. Free of data-dependent control flow (runs on meta tensors).
    NaN encodes as code 0 or 8 by its sign bit (every comparison is false; the quantizers reject
    non-finite weights first and write torchao's NaN codes themselves)."""
    a = x.abs()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for t, tie_up in _THRESHOLDS:
        code += (a >= t if tie_up else a > t).to(torch.uint8)
    sign = x.contiguous().view(torch.int32) < 0 if x.dtype == torch.float32 else torch.signbit(x)
    return code | (sign.to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of e2m1 ``codes`` (uint8 0-15, unpacked) in ``dtype`` (exact in every float dtype)."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    return table[codes.long()].to(dtype)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """``uint8 [..., K]`` codes -> ``uint8 [..., K/2]`` (element ``2j`` in the low nibble of byte ``j``).
    Raises ``ValueError`` for an odd K."""
    if codes.dim() < 1 or codes.shape[-1] % 2:
        raise ValueError(f"fp4 packing needs an even last dim (two values per byte), got shape {tuple(codes.shape)}")
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """``uint8 [..., K/2]`` -> codes ``uint8 [..., K]`` (the inverse of :func:`pack_fp4`)."""
    packed = packed.view(torch.uint8)
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize_codes(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of packed e2m1 bytes ``uint8 [..., K/2]`` -> ``[..., K]`` in ``dtype`` (no scale)."""
    return e2m1_decode(unpack_fp4(packed), dtype)


@functools.cache
def _e4m3_pair_table() -> torch.Tensor:
    """int16 ``[256]``: for each packed byte, its two e2m1 values as float8_e4m3fn bytes (the even
    element in the low byte, so a little-endian int16 view is the pair in order)."""
    mag = torch.arange(8)
    # e2m1 magnitude m: 0 -> 0; 1 (0.5) -> e4m3 0x30; m >= 2 (2**((m >> 1) - 1) * (1 + (m & 1) / 2))
    # -> biased exponent (m >> 1) + 6, mantissa bit (m & 1) as e4m3's top mantissa bit
    e4 = torch.where(mag >= 2, (((mag >> 1) + 6) << 3) | ((mag & 1) << 2), torch.where(mag == 1, 0x30, 0))
    codes = torch.cat([e4, e4 | 0x80])
    b = torch.arange(256)
    return (codes[b & 15] | (codes[b >> 4] << 8)).to(torch.int16)


def packed_to_e4m3(packed: torch.Tensor) -> torch.Tensor:
    """Packed e2m1 bytes ``uint8 [M, K/2]`` (CPU) -> the same values as float8_e4m3fn ``[M, K]``
    (every e2m1 value is an e4m3 value: exact), for kernels that take e4m3 operands."""
    pairs = _e4m3_pair_table()[packed.view(torch.uint8).long()]
    return pairs.view(torch.uint8).view(torch.float8_e4m3fn).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
