"""Backends of oq-plugin-mxfp4 for ``linear`` and ``moe`` layers with ``mxfp4`` weights.

Candidates are listed per activation key (vLLM's MXFP4 oracle after its activation filter: a
``moe.activation=mxfp8`` override keeps only the W4A8 variants, ``activation: null`` only the W4A16
ones; ``oq explain`` shows the rest as filtered out):

======  ========  ==================  ==========================================================
name    priority  activation          how
======  ========  ==================  ==========================================================
torch   0         none, mxfp8, mxfp4  the core's float32 dequantize-and-matmul reference (added by
                                      the core from the scheme record)
cpu     50        none, mxfp8, mxfp4  :func:`oq_toolkit.wgemm.wgemm` with e2m1 weight codes
                                      decoded in registers (e8m0 scales per 32); W4A8 quantizes
                                      activations with oq-plugin-mxfp8's C quantizer first, W4A4
                                      with this plugin's (codes re-encoded as e4m3, exactly); MoE
                                      loops over experts
triton  100       none, mxfp8, mxfp4  Triton GEMM / fused-MoE grouped GEMM decoding e2m1 nibbles in
                                      the K loop (:mod:`oq_plugin_mxfp4.kernels`); CUDA only
======  ========  ==================  ==========================================================
"""

from __future__ import annotations

import torch

from oqcore import Backend, linear_forward_from, moe_forward_from
from oq_toolkit.triton_support import guard_driver

from oq_plugin_mxfp4.keys import MX_BLOCK


def _triton_supported(activation_key):
    """The ``is_supported`` of the Triton backend for one activation key (W4A16 / W4A8 / W4A4):
    :mod:`oq_plugin_mxfp4.kernels.support` (compute capability, kernel packages, K % 32)."""
    from oq_plugin_mxfp4.keys import kMxfp4Dynamic

    def supported(layer: torch.nn.Module, device: torch.device) -> tuple[bool, str]:
        """Triton on CUDA at the mode's compute capability (or the interpreter in tests)."""
        from oq_plugin_mxfp4.kernels import support

        if activation_key is None:
            return support.triton_supported_w4a16(layer, device)
        if activation_key == kMxfp4Dynamic:
            return support.triton_supported_w4a4(layer, device)
        return support.triton_supported_w4a8(layer, device)

    return supported


def _triton_forward_linear(method, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` -> ``[..., N]`` in ``x.dtype`` through :func:`oq_plugin_mxfp4.kernels.gemm.mxfp4_gemm`."""
    from oq_plugin_mxfp4.kernels.gemm import mxfp4_gemm

    from oq_plugin_mxfp4.keys import kMxfp4Dynamic

    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if method.activation_key == kMxfp4Dynamic:
        from oq_plugin_mxfp4.kernels.quant import quantize_mxfp4_triton

        a, a_s = quantize_mxfp4_triton(x2, method.options)
    elif method.activation_key is not None:
        from oq_plugin_mxfp8.kernels.quant import quantize_mxfp8_triton

        a, a_s = quantize_mxfp8_triton(x2, method.options)
    else:
        a, a_s = x2, None
    y = mxfp4_gemm(a, a_s, layer.weight, layer.weight_scale, layer.bias)
    return y.to(x.dtype).reshape(*shape[:-1], layer.out_features)


def _triton_forward_moe(
    method, layer: torch.nn.Module, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> torch.Tensor:
    """Tokens ``x [T, H]`` -> ``[T, H]`` through :func:`oq_plugin_mxfp4.kernels.moe.fused_moe_mxfp4`."""
    from oq_plugin_mxfp4.keys import kMxfp4Dynamic
    from oq_plugin_mxfp4.kernels.moe import fused_moe_mxfp4

    has_bias = layer.layout.has_bias
    act = method.activation_key
    act_mx = False if act is None else ("mxfp4" if act == kMxfp4Dynamic else "mxfp8")
    return fused_moe_mxfp4(
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
        act_mx=act_mx,
        options=method.options,
    )


# ---- cpu (W4A16 and W4A8) --------------------------------------------------------------------------


def _cpu_supported(layer: torch.nn.Module, device: torch.device) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cpu":
        return False, f"the mxfp4 CPU kernel runs on the CPU, layer runs on {device.type}"
    # No compile here (plan time stays cheap): the kernel is built on the first forward.
    return True, "CPU: fused GEMM decoding e2m1 weight codes in registers (oq_toolkit.wgemm)"


def _cpu_matmul(method, x2: torch.Tensor, weight: dict, bias=None, out_dtype=torch.float32) -> torch.Tensor:
    """``x2 [M, K] @ W^T (+ bias)`` for one ``[N, K]`` mxfp4 weight (packed e2m1 ``weight["qdata"]
    [N, K/2]``, e8m0 ``weight["scale"] [N, K/32]``), float32 sums rounded once to ``out_dtype``
    (the :data:`oqcore.methods.Matmul` of the ``cpu`` backend).

    W4A8: ``x2`` quantized by oq-plugin-mxfp8's C quantizer (the mxfp8 reference's bytes), e4m3
    codes and e8m0 scales into the fused GEMM (exact products, float32 sums). W4A16 bf16
    activations: the fused GEMM on ``x2`` as it is. float32 / fp16 activations: the weight
    dequantized to float32 (the reference's numbers) and ``torch.mm``: the fused GEMM takes bf16."""
    from oq_toolkit import wgemm

    from oq_plugin_mxfp4.keys import kMxfp4Dynamic

    q, s = weight["qdata"], weight["scale"].contiguous()
    w_grid = (1, MX_BLOCK, s.shape[-1])
    if method.activation_key == kMxfp4Dynamic:
        from oq_plugin_mxfp4 import cpu
        from oq_plugin_mxfp4.fp4 import packed_to_e4m3

        # W4A4: every e2m1 value is an e4m3 value, so the activation codes re-encoded as e4m3 bytes
        # with their e8m0 scales are W4A8's operands, exactly (the fused GEMM takes no e2m1 activations)
        aq, sa = cpu.quantize_mxfp4(x2.contiguous(), method.options)
        a_grid = (1, MX_BLOCK, sa.shape[-1])
        return wgemm.wgemm(packed_to_e4m3(aq), wgemm.E4M3, sa, a_grid, q, wgemm.E2M1, s, w_grid, bias=bias, out_dtype=out_dtype)
    if method.activation_key is not None:
        from oq_plugin_mxfp8.cpu import quantize_mxfp8

        a, sa = quantize_mxfp8(x2.contiguous(), method.options)
        a_grid = (1, MX_BLOCK, sa.shape[-1])
        return wgemm.wgemm(a, wgemm.E4M3, sa, a_grid, q, wgemm.E2M1, s, w_grid, bias=bias, out_dtype=out_dtype)
    if x2.dtype == torch.bfloat16:
        return wgemm.wgemm(
            x2.contiguous(), wgemm.BF16, None, None, q, wgemm.E2M1, s, w_grid, bias=bias, out_dtype=out_dtype
        )
    from oq_plugin_mxfp4.quant import dequantize_mxfp4

    y = x2.float() @ dequantize_mxfp4(q, s, torch.float32, method.options).T
    return (y if bias is None else y + bias.float()).to(out_dtype)


def backends(kind: str, activation_key) -> list[Backend]:
    """The forward backends for ``kind`` (``"linear"`` or ``"moe"``) and one activation key (none:
    W4A16, mxfp8: W4A8, mxfp4: W4A4): triton and cpu for each."""
    from oq_plugin_mxfp4.keys import kMxfp4Dynamic

    w4a4 = activation_key == kMxfp4Dynamic
    if activation_key is None:
        mode, quantizer = "W4A16 (activations in the model dtype)", ""
    elif w4a4:
        mode, quantizer = "W4A4 (mxfp4 activations)", "activations quantized by the C mxfp4 quantizer, "
    else:
        mode, quantizer = "W4A8 (mxfp8 activations)", "activations quantized by the C mxfp8 quantizer, "
    cpu = Backend(
        "cpu",
        activation_key,
        _cpu_supported,
        50,
        description=f"mxfp4 {mode} on the CPU: {quantizer}fused GEMM decoding e2m1 in registers"
        + ("" if kind == "linear" else ", loop over experts"),
        forward=(linear_forward_from if kind == "linear" else moe_forward_from)(_cpu_matmul),
    )
    return [
        Backend(
            "triton",
            activation_key,
            _triton_supported(activation_key),
            100,
            description=f"Triton mxfp4 {'GEMM' if kind == 'linear' else 'fused-MoE grouped GEMM'}, {mode}",
            forward=guard_driver(_triton_forward_linear if kind == "linear" else _triton_forward_moe),
        ),
        cpu,
    ]
