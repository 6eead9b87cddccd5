"""Eager torch formulas the peers use to quantize a weight, for comparison with oqcore's quantizers.

Each function takes a bf16 weight ``[N, K]`` or an expert stack ``[E, N, K]`` and returns
``(qdata, scale)``. They are written the way the peers write them (not byte-for-byte checked here:
the suite measures speed; oqcore's tests check bytes):

- ``vllm_*``: vLLM's native torch paths (``QuantFP8.forward_native``-style amax -> scale ->
  ``x * scale.reciprocal()`` -> clamp -> cast; ``per_block_cast_to_fp8`` with zero padding to
  128x128; int8 ``round(x / (amax / 127))``; the MX rule ``2 ** floor(log2(amax))``). MoE stacks
  with a per-tensor or per-block scale loop over the experts, as vLLM does.
- ``ct_*``: compressed-tensors ``calculate_qparams`` (fed the min/max an observer computes) +
  ``quantize`` on a float32 copy, looping over experts for 3D stacks.
- ``torchao_to_mx``: torchao's ``to_mx(..., RCEIL)`` (the same bytes as oqcore's mxfp8).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # vLLM's _FP8_MIN_SCALING_FACTOR

Fn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _per_expert(fn: Fn) -> Fn:
    """Run a 2D formula on each expert of a 3D stack (vLLM and compressed-tensors both loop)."""

    def run(w: torch.Tensor):
        """``fn`` on a 2D weight, or on each expert of a 3D stack."""
        if w.dim() == 2:
            return fn(w)
        outs = [fn(w[e]) for e in range(w.shape[0])]
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])

    run.__doc__ = fn.__doc__
    return run


@_per_expert
def vllm_fp8_per_tensor(w: torch.Tensor):
    """vLLM per-tensor fp8: one float32 scale ``amax / 448``."""
    amax = w.abs().max().to(torch.float32)
    scale = (amax / FP8_MAX).clamp(min=MIN_SCALE)
    q = (w.to(torch.float32) * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def vllm_fp8_per_channel(w: torch.Tensor):
    """vLLM per-channel (per-row) fp8: ``amax`` over the last dim."""
    amax = w.abs().amax(dim=-1, keepdim=True).to(torch.float32)
    scale = (amax / FP8_MAX).clamp(min=MIN_SCALE)
    q = (w.to(torch.float32) * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


@_per_expert
def vllm_fp8_per_block(w: torch.Tensor, block: int = 128):
    """vLLM ``per_block_cast_to_fp8``: zero-pad to 128x128 blocks, amax per block, scale, cast."""
    m, n = w.shape
    pm, pn = -(-m // block) * block, -(-n // block) * block
    padded = torch.zeros((pm, pn), dtype=w.dtype)
    padded[:m, :n] = w
    view = padded.view(pm // block, block, pn // block, block)
    amax = view.abs().float().amax(dim=(1, 3), keepdim=True).clamp(1e-4)
    q = (view * (FP8_MAX / amax)).to(FP8)
    return q.view_as(padded)[:m, :n].contiguous(), (amax / FP8_MAX).view(pm // block, pn // block)


def vllm_int8_per_channel(w: torch.Tensor):
    """vLLM's torch int8 (symmetric, per row): ``round(w / (amax / 127))`` clamped to +-127."""
    x = w.to(torch.float32)
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127.0).clamp(min=1e-10)
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


def vllm_mxfp8(w: torch.Tensor):
    """vLLM's torch MX rule: blocks of 32 along K, scale ``2 ** floor(log2(amax))`` (no offset),
    elements clamped to +-448, e8m0 exponents stored as uint8."""
    x = w.to(torch.float32).unflatten(-1, (w.shape[-1] // 32, 32))
    amax = x.abs().amax(dim=-1, keepdim=True)
    exp = torch.floor(torch.log2(amax.clamp(min=2.0**-127))).clamp(-127, 127)
    q = (x * torch.exp2(-exp)).clamp(-FP8_MAX, FP8_MAX).to(FP8).flatten(-2)
    return q, (exp.squeeze(-1) + 127).to(torch.uint8)


def _ct_args(strategy: str, num_bits_type: str):
    from compressed_tensors.quantization import QuantizationArgs

    kw = {"block_structure": [128, 128]} if strategy == "block" else {}
    return QuantizationArgs(num_bits=8, type=num_bits_type, symmetric=True, strategy=strategy, **kw)


def _ct(strategy: str, num_bits_type: str = "float") -> Fn:
    """compressed-tensors ``calculate_qparams`` + ``quantize`` for one strategy, on float32."""
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = _ct_args(strategy, num_bits_type)
    out_dtype = FP8 if num_bits_type == "float" else torch.int8

    def run2d(w: torch.Tensor):
        """compressed-tensors' quantization of one 2D weight (replaced by the f-string below)."""
        x = w.float()
        if strategy == "tensor":
            mn, mx = torch.aminmax(x)
        elif strategy == "channel":
            mn, mx = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
        else:
            n, k = x.shape
            nb, kb = -(-n // 128), -(-k // 128)
            p = F.pad(x, (0, kb * 128 - k, 0, nb * 128 - n)).reshape(nb, 128, kb, 128)
            mn, mx = p.amin(dim=(1, 3)), p.amax(dim=(1, 3))
        scale, zp = calculate_qparams(mn, mx, args)
        return quantize(x, scale, zp, args, dtype=out_dtype), scale

    run2d.__doc__ = f"compressed-tensors {strategy} {num_bits_type}8: calculate_qparams + quantize (float32)"
    return _per_expert(run2d)


def torchao_to_mx() -> Fn:
    """torchao ``to_mx(w, float8_e4m3fn, 32, RCEIL)``."""
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import to_mx

    def run(w: torch.Tensor):
        """torchao's MX cast of ``w``: ``(data, scale)``."""
        scale, data = to_mx(w.contiguous(), FP8, 32, ScaleCalculationMode.RCEIL)
        return data, scale

    return run


def baselines(key_name: str) -> dict[str, Callable[[], Fn]]:
    """Factories of the peer implementations for an oqcore weight key name, by implementation label.

    A factory may raise ImportError (optional library missing): the caller records it.
    """
    table: dict[str, dict[str, Callable[[], Fn]]] = {
        "fp8_per_tensor_static": {
            "vllm eager": lambda: vllm_fp8_per_tensor,
            "compressed-tensors": lambda: _ct("tensor"),
        },
        "fp8_per_channel_static": {
            "vllm eager": lambda: vllm_fp8_per_channel,
            "compressed-tensors": lambda: _ct("channel"),
        },
        "fp8_per_block_static": {
            "vllm eager": lambda: vllm_fp8_per_block,
            "compressed-tensors": lambda: _ct("block"),
        },
        "int8_per_channel_static": {
            "vllm eager": lambda: vllm_int8_per_channel,
            "compressed-tensors": lambda: _ct("channel", "int"),
        },
        "mxfp8": {
            "vllm eager": lambda: vllm_mxfp8,
            "torchao to_mx": torchao_to_mx,
        },
    }
    return table.get(key_name, {})
