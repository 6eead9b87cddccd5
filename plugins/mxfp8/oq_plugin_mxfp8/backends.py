"""Backends of oq-plugin-mxfp8 for ``linear`` and ``moe`` layers with ``mxfp8`` weights.

======  ========  ============  ================================================================
name    priority  activation    how
======  ========  ============  ================================================================
torch   0         none, mxfp8   the core's float32 dequantize-and-matmul reference (runs anywhere;
                                added by the core from the scheme record)
cpu     50        none, mxfp8   :mod:`oq_plugin_fp8.cpu`: fused dequantize-and-GEMV C kernel (fp8
                                bytes and e8m0 scale bytes read once, decoded in registers), tiled
                                dequantize + ``torch.mm`` for large batches; per-expert loop for MoE;
                                W8A8 quantizes activations with the C mxfp8 quantizer first
triton  100       none, mxfp8   Triton MXFP8 GEMM / fused-MoE grouped GEMM (per-32 scales in the
                                K loop); W8A8 quantizes activations with the one-pass Triton quantizer
======  ========  ============  ================================================================

Triton is imported only inside the forward functions (``oq_plugin_mxfp8.kernels``).
"""

from __future__ import annotations

import torch

from oqcore import Backend, linear_forward_from, moe_forward_from
from oq_toolkit.triton_support import guard_driver, triton_support

TRITON_MIN_CAPABILITY = (8, 9)
"""The kernels load float8_e4m3fn and, for W8A8, run fp8 x fp8 ``tl.dot`` (per-32 scales applied
to the float32 partial products, not the native block-scaled MX dots of sm_100): Ada / Hopper and newer."""


def _triton_supported(layer: torch.nn.Module, device: torch.device) -> tuple[bool, str]:
    ok, why = triton_support(device, TRITON_MIN_CAPABILITY, kernel_package="oq_plugin_mxfp8.kernels")
    what = "float8_e4m3fn tl.dot with per-32 e8m0 scales in the K loop (needs sm_89+)"
    return ok, f"{why}; {what}"


def _triton_forward_linear(method, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` -> ``[..., N]`` in ``x.dtype`` through :func:`oq_plugin_mxfp8.kernels.gemm.mxfp8_gemm`
    (float32 accumulation, bias added in float32)."""
    from oq_plugin_mxfp8.kernels.gemm import mxfp8_gemm
    from oq_plugin_mxfp8.kernels.quant import quantize_mxfp8_triton

    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if method.activation_key is not None:
        a, a_s = quantize_mxfp8_triton(x2, method.options)
    else:
        a, a_s = x2, None
    y = mxfp8_gemm(a, a_s, layer.weight, layer.weight_scale, layer.bias)
    return y.to(x.dtype).reshape(*shape[:-1], layer.out_features)


def _triton_forward_moe(
    method, layer: torch.nn.Module, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """Tokens ``x [T, H]`` -> ``[T, H]`` through :func:`oq_plugin_mxfp8.kernels.moe.fused_moe_mxfp8`
    (gate-up grouped GEMM, ``layer.apply_gate``, down grouped GEMM, weighted top-k sum)."""
    from oq_plugin_mxfp8.kernels.moe import fused_moe_mxfp8

    has_bias = layer.layout.has_bias
    return fused_moe_mxfp8(
        x,
        topk_ids,
        topk_weights,
        layer.w13_weight,
        layer.w13_weight_scale,
        layer.w2_weight,
        layer.w2_weight_scale,
        layer.apply_gate,
        w13_bias=layer.gate_up_proj_bias.contiguous() if has_bias else None,
        w2_bias=layer.down_proj_bias.contiguous() if has_bias else None,
        act_mx=method.activation_key is not None,
        options=method.options,
    )


# ---- cpu (W8A16 and W8A8) --------------------------------------------------------------------------


def _cpu_supported(layer: torch.nn.Module, device: torch.device) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cpu":
        return False, f"the mxfp8 CPU kernels run on the CPU, layer runs on {device.type}"
    # No compile here (plan time stays cheap): the kernel is built on the first forward.
    return True, "CPU: fused mxfp8 dequantize-and-GEMV C kernel, tiled dequantize + torch.mm for large batches"


def _cpu_matmul(method, x2: torch.Tensor, weight: dict, bias=None, out_dtype=torch.float32) -> torch.Tensor:
    """``x2 [M, K] @ W^T (+ bias)`` for one ``[N, K]`` mxfp8 weight (e4m3 codes ``weight["qdata"]``,
    e8m0 ``weight["scale"] [N, K/32]``), summed in float32 and rounded once to ``out_dtype`` (the
    :data:`oqcore.methods.Matmul` of the ``cpu`` backend).

    W8A8: ``x2`` quantized by the C mxfp8 quantizer (the ``cpu`` quantizer implementation of the
    activation key: the reference's bytes), codes and e8m0 scales handed to the fused GEMM
    (:func:`oq_toolkit.wgemm.wgemm`: exact products, float32 sums, so the reference within float32
    rounding). W8A16 bf16 activations: the fused GEMM on ``x2`` as it is. float32/fp16 activations:
    oq-plugin-fp8's float32 kernel with e8m0 scales (the GEMM would round them to bf16). The scale
    bytes are read as they are (no float32 copy)."""
    from oq_toolkit import wgemm

    from oq_plugin_mxfp8.quant import MX_BLOCK

    q, s = weight["qdata"], weight["scale"].contiguous()
    w_grid = (1, MX_BLOCK, s.shape[-1])
    if method.activation_key is not None:
        from oq_plugin_mxfp8.cpu import quantize_mxfp8

        a, sa = quantize_mxfp8(x2.contiguous(), method.options)
        a_grid = (1, MX_BLOCK, sa.shape[-1])
        return wgemm.wgemm(a, wgemm.E4M3, sa, a_grid, q, wgemm.E4M3, s, w_grid, bias=bias, out_dtype=out_dtype)
    if x2.dtype == torch.bfloat16:
        return wgemm.wgemm(x2.contiguous(), wgemm.BF16, None, None, q, wgemm.E4M3, s, w_grid, bias=bias, out_dtype=out_dtype)
    from oq_plugin_fp8 import cpu  # the same e4m3 elements: one float32 kernel, owned by oq-plugin-fp8

    y = cpu.fp8_linear(x2, q, s, cpu.SCALE_E8M0, 1, MX_BLOCK, s.shape[-1])
    return (y if bias is None else y + bias.float()).to(out_dtype)


def backends(kind: str, activation_key) -> list[Backend]:
    """The forward backends for ``kind`` (``"linear"`` or ``"moe"``) and one activation key
    (``None``: W8A16, or mxfp8: W8A8): triton and cpu for both. The core adds the ``torch``
    reference."""
    mode = "W8A8 (mxfp8 activations)" if activation_key is not None else "W8A16 (activations in the model dtype)"
    out = [
        Backend(
            "triton",
            activation_key,
            _triton_supported,
            100,
            description=f"Triton mxfp8 {'GEMM' if kind == 'linear' else 'fused-MoE grouped GEMM'}, {mode}",
            forward=guard_driver(_triton_forward_linear if kind == "linear" else _triton_forward_moe),
        )
    ]
    out.append(
        Backend(
            "cpu",
            activation_key,
            _cpu_supported,
            50,
            description=f"mxfp8 {mode} on the CPU: "
            + ("" if activation_key is None else "activations quantized by the C mxfp8 quantizer, ")
            + "fused dequantize-and-GEMV C kernel"
            + ("" if kind == "linear" else ", loop over experts"),
            forward=(linear_forward_from if kind == "linear" else moe_forward_from)(_cpu_matmul),
        )
    )
    return out
