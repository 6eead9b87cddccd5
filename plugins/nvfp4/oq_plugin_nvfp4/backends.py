"""Backends of oq-plugin-nvfp4 for ``linear`` and ``moe`` layers with ``nvfp4`` weights.

======  ========  ============  ================================================================
name    priority  activation    how
======  ========  ============  ================================================================
torch   0         none, nvfp4   the core's float32 dequantize-and-matmul reference (added by the
                                core from the scheme record)
cpu     50        none, nvfp4   :func:`oq_toolkit.wgemm.wgemm` with e2m1 weight codes and e4m3
                                block scales decoded in registers, times ``1 / global_scale``;
                                W4A4 quantizes activations with the C nvfp4 quantizer (codes x
                                block scales, exact in bf16); MoE loops over experts
triton  100       none, nvfp4   Triton GEMM / fused-MoE grouped GEMM decoding e2m1 nibbles and
                                e4m3 scales in the K loop (:mod:`oq_plugin_nvfp4.kernels`); CUDA
                                sm_80+ only
======  ========  ============  ================================================================
"""

from __future__ import annotations

import torch

from oqcore import Backend, linear_forward_from, moe_forward_from
from oq_toolkit.triton_support import guard_driver

from oq_plugin_nvfp4.keys import NV_BLOCK


def _triton_forward_linear(method, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` -> ``[..., N]`` in ``x.dtype`` through :func:`oq_plugin_nvfp4.kernels.gemm.nvfp4_gemm`."""
    from oq_plugin_nvfp4.kernels.gemm import nvfp4_gemm

    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if method.activation_key is None:
        y = nvfp4_gemm(x2, layer.weight, layer.weight_scale, layer.weight_global_scale, layer.bias)
    else:
        from oq_plugin_nvfp4.kernels.quant import quantize_nvfp4_triton

        q, s, g = quantize_nvfp4_triton(x2)
        y = nvfp4_gemm(
            q, layer.weight, layer.weight_scale, layer.weight_global_scale, layer.bias, a_scale=s, a_global=g
        )
    return y.to(x.dtype).reshape(*shape[:-1], layer.out_features)


def _triton_forward_moe(
    method, layer: torch.nn.Module, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """Tokens ``x [T, H]`` -> ``[T, H]`` through :func:`oq_plugin_nvfp4.kernels.moe.fused_moe_nvfp4`."""
    from oq_plugin_nvfp4.kernels.moe import fused_moe_nvfp4

    has_bias = layer.layout.has_bias
    return fused_moe_nvfp4(
        x,
        topk_ids,
        topk_weights,
        layer.w13_weight,
        layer.w13_weight_scale,
        layer.w13_weight_global_scale,
        layer.w2_weight,
        layer.w2_weight_scale,
        layer.w2_weight_global_scale,
        layer.apply_gate,
        w13_bias=layer.gate_up_proj_bias.contiguous() if has_bias else None,
        w2_bias=layer.down_proj_bias.contiguous() if has_bias else None,
        act_fp4=method.activation_key is not None,
    )


def _cpu_supported(layer: torch.nn.Module, device: torch.device) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cpu":
        return False, f"the nvfp4 CPU kernel runs on the CPU, layer runs on {device.type}"
    return True, "CPU: fused GEMM decoding e2m1 codes and e4m3 block scales in registers (oq_toolkit.wgemm)"


def _cpu_matmul(method, x2: torch.Tensor, weight: dict, bias=None, out_dtype=torch.float32) -> torch.Tensor:
    """``x2 [M, K] @ W^T (+ bias)`` for one ``[N, K]`` nvfp4 weight (packed e2m1 ``qdata [N, K/2]``,
    e4m3 ``scale [N, K/16]``, float32 ``global_scale [1]``), float32 sums times ``1 / global_scale``,
    rounded once to ``out_dtype`` (the ``cpu`` backend's :data:`oqcore.methods.Matmul`). bf16
    activations run the fused GEMM; float32 / fp16 ones the float32 dequantized weight and ``torch.mm``."""
    from oq_toolkit import wgemm

    q, s, g = weight["qdata"], weight["scale"].contiguous(), weight["global_scale"]
    grid = (1, NV_BLOCK, s.shape[-1])
    inv_g = 1.0 / g.float().reshape(-1)[0]
    if method.activation_key is not None:
        from oq_plugin_mxfp4.fp4 import dequantize_codes

        from oq_plugin_nvfp4 import cpu

        # W4A4: e2m1 x e4m3 block scale has at most 6 significant bits (exact in bf16); the
        # activation's 1 / global_scale joins the weight's in the one output multiplier
        aq, a_s, a_g = cpu.quantize_nvfp4(x2.contiguous(), method.options)
        vals = dequantize_codes(aq).reshape(aq.shape[0], -1, NV_BLOCK) * a_s.float().unsqueeze(-1)
        a = vals.reshape(aq.shape[0], -1).to(torch.bfloat16)
        mul = float(inv_g * (1.0 / a_g.float().reshape(-1)[0]))
        return wgemm.wgemm(
            a, wgemm.BF16, None, None, q, wgemm.E2M1, s, grid, bias=bias, out_dtype=out_dtype, w_scale_mul=mul
        )
    if x2.dtype == torch.bfloat16:
        return wgemm.wgemm(
            x2.contiguous(),
            wgemm.BF16,
            None,
            None,
            q,
            wgemm.E2M1,
            s,
            grid,
            bias=bias,
            out_dtype=out_dtype,
            w_scale_mul=float(inv_g),
        )
    from oq_plugin_nvfp4.quant import dequantize_nvfp4

    y = x2.float() @ dequantize_nvfp4(q, s, g, torch.float32).T
    return (y if bias is None else y + bias.float()).to(out_dtype)


def backends(kind: str, activation_key) -> list[Backend]:
    """The forward backends for ``kind`` and one activation key (none: W4A16, dynamic nvfp4: W4A4):
    triton and cpu for each."""
    mode = "W4A16" if activation_key is None else "W4A4 (activations quantized by the C nvfp4 quantizer)"
    cpu = Backend(
        "cpu",
        activation_key,
        _cpu_supported,
        50,
        description=f"nvfp4 {mode} on the CPU: fused GEMM decoding e2m1 and e4m3 scales in registers"
        + ("" if kind == "linear" else ", loop over experts"),
        forward=(linear_forward_from if kind == "linear" else moe_forward_from)(_cpu_matmul),
    )
    triton = Backend(
        "triton",
        activation_key,
        _triton_supported(activation_key),
        100,
        description=f"Triton nvfp4 {'GEMM' if kind == 'linear' else 'fused-MoE grouped GEMM'}, {mode}",
        forward=guard_driver(_triton_forward_linear if kind == "linear" else _triton_forward_moe),
    )
    return [triton, cpu]


def _triton_supported(activation_key):
    """The ``is_supported`` of the Triton backend for W4A16 or W4A4: :mod:`oq_plugin_nvfp4.kernels.support`
    (compute capability, kernel package, K % 16)."""

    def supported(layer: torch.nn.Module, device: torch.device) -> tuple[bool, str]:
        """Triton on CUDA sm_80+ (or the interpreter in tests)."""
        from oq_plugin_nvfp4.kernels import support

        return (support.triton_supported if activation_key is None else support.triton_supported_w4a4)(layer, device)

    return supported
