"""Backends of oq-plugin-int8 for ``linear`` and ``moe`` layers with ``int8_per_channel_static`` weights.

=========  ========  ==================  =====================================================
name       priority  activation          how
=========  ========  ==================  =====================================================
torch      0         none, int8_per_token the core's float32 dequantize-and-matmul reference
                                         (added by the core from the scheme record)
cpu-int8   50        none                bf16 batches above 4 rows: the fused GEMM of
                                         ``oq_toolkit.wgemm`` (AMX / AVX512-BF16); smaller batches
                                         and other dtypes ``torch._weight_int8pack_mm``
cpu-int8   50        int8_per_token      activations quantized by the C row-wise quantizer (the
                                         reference's bytes), ``torch._int_mm`` (oneDNN int8 GEMM,
                                         exact int32 sums), scaled in float32
triton     100       none, int8_per_token Triton W8A16 / W8A8 GEMMs and fused-MoE grouped GEMM
=========  ========  ==================  =====================================================

Triton is imported only inside the forward functions (``oq_plugin_int8.kernels``).
"""

from __future__ import annotations

import torch

from oqcore import Backend, expert_loop, linear_forward_from, moe_forward_from
from oq_toolkit.triton_support import guard_driver, triton_support

TRITON_MIN_CAPABILITY = (8, 0)
"""int8 tensor-core dots (``mma`` s8) and bf16 dots: Ampere and newer."""

CPU_INT8_SCALE = "weight_scale_int8pack"
"""Name of the per-channel scale buffer ``[N]`` (``[E, N]`` per MoE projection, prefixed ``w13_`` /
``w2_``) in bf16, the dtype the op is fast in; ``weight_scale`` stays float32 ``[N, 1]``."""



# ---- cpu-int8 -------------------------------------------------------------------------------------


INT8PACK_K_MULTIPLE = 16
"""``torch._weight_int8pack_mm`` (torch 2.13 CPU) returns NaN/garbage or segfaults unless K is a
multiple of 16 (measured: K = 8, 24, 36, 37, 40, 56, 72 fail; 16, 32, 48, 64, 80, ... work; N and M
are free)."""


def _gemm_ks(layer: torch.nn.Module) -> dict[str, int]:
    # At plan time `layer` is the original module (nn.Linear / fused experts), later the wrapper.
    if hasattr(layer, "in_features"):
        return {"K": int(layer.in_features)}
    from oqcore.layers import moe_layout

    lay = getattr(layer, "layout", None) or moe_layout(layer)
    if lay is None:
        return {}
    return {"hidden size H": lay.hidden_size, "intermediate size I": lay.intermediate_size}


def _cpu_int8_supported(layer: torch.nn.Module, device: torch.device) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cpu":
        return False, f"torch._weight_int8pack_mm runs on the CPU, layer runs on {device.type}"
    if not hasattr(torch, "_weight_int8pack_mm"):
        return False, f"torch {torch.__version__} has no torch._weight_int8pack_mm"
    bad = {k: v for k, v in _gemm_ks(layer).items() if v % INT8PACK_K_MULTIPLE}
    if bad:
        found = ", ".join(f"{k}={v}" for k, v in bad.items())
        return False, f"torch._weight_int8pack_mm needs reduction dims divisible by {INT8PACK_K_MULTIPLE}, found {found}"
    return True, "CPU with torch._weight_int8pack_mm (int8 weight-only GEMM)"


def _int8pack_dtype(layer: torch.nn.Module) -> torch.dtype:
    # Always bf16 (x and scales must share a dtype): measured on this machine's 2 cores at
    # 4096x4096, M=1, the op takes 0.24 ms in bf16 but 16 ms in fp32 (fp32 F.linear: 2.9 ms), so
    # fp32 models also run it in bf16 (x and scales rounded to bf16; the tests bound the effect).
    return torch.bfloat16


def _cpu_int8_prepare_linear(method, layer: torch.nn.Module) -> None:
    scale = layer.weight_scale.detach().reshape(-1).to(_int8pack_dtype(layer)).contiguous()
    layer.register_buffer(CPU_INT8_SCALE, scale, persistent=False)


def _cpu_int8_prepare_moe(method, layer: torch.nn.Module) -> None:
    dt = _int8pack_dtype(layer)
    for proj in ("w13", "w2"):
        s = getattr(layer, f"{proj}_weight_scale").detach()
        layer.register_buffer(f"{proj}_{CPU_INT8_SCALE}", s.reshape(s.shape[0], -1).to(dt).contiguous(), persistent=False)


def _int8pack_mm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch._weight_int8pack_mm(x.to(scale.dtype).contiguous(), w, scale)


INT8PACK_MAX_M = 4
"""bf16 batches up to this size run ``torch._weight_int8pack_mm``, larger ones the fused GEMM.
Measured on this project's 2-core AMX machine (4096x4096, best of 40, ms; bf16 ``F.linear`` ~1.1):
M = 1, 2, 4, 6, 8: int8pack 0.53, 0.66, 0.89, 1.67, 1.66; wgemm 0.93, 0.95, 0.95, 0.91, 0.94 (int8pack
reads the codes once at memory speed for a few rows; wgemm decodes to bf16 tiles for AMX)."""


def _weight_only_matmul(x2: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, scale_bf16: torch.Tensor, bias=None, out_dtype=torch.float32) -> torch.Tensor:
    """``x2 [M, K] @ (w * w_scale)^T (+ bias)`` for int8 ``w [N, K]`` with per-channel float32
    ``w_scale [N, 1]``, summed in float32, one rounding to ``out_dtype``: bf16 batches above
    :data:`INT8PACK_MAX_M` through the fused GEMM (:func:`oq_toolkit.wgemm.wgemm`: int8 codes and bf16
    values multiply exactly, float32 sums and scales, bias and rounding in its epilogue: the reference
    within float32 rounding); smaller batches and other dtypes through ``torch._weight_int8pack_mm``
    with the prepared bf16 scales ``scale_bf16 [N]`` (activations, scales and its output in bf16:
    the tests bound the effect)."""
    if x2.dtype == torch.bfloat16 and x2.shape[0] > INT8PACK_MAX_M:
        from oq_toolkit import wgemm

        scale = w_scale.float().contiguous()
        return wgemm.wgemm(x2.contiguous(), wgemm.BF16, None, None, w, wgemm.INT8, scale, (1, x2.shape[-1], 1), bias=bias, out_dtype=out_dtype)
    y = _int8pack_mm(x2, w, scale_bf16).float()
    return (y if bias is None else y + bias.float()).to(out_dtype)


def _cpu_int8_forward_linear(method, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` -> ``[..., N]`` through :func:`_weight_only_matmul` (bias added to the float32
    sum, one rounding to ``x.dtype``)."""
    shape = x.shape
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float32) else torch.float32
    scale_bf16 = getattr(layer, CPU_INT8_SCALE)
    y = _weight_only_matmul(x.reshape(-1, shape[-1]), layer.weight, layer.weight_scale, scale_bf16, layer.bias, out_dtype)
    return y.to(x.dtype).reshape(*shape[:-1], layer.out_features)


def _cpu_int8_forward_moe(method, layer: torch.nn.Module, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Per-expert loop over the experts that received tokens: gate-up, ``layer.apply_gate`` on its
    float32 sums (its output in the model dtype: the kernels take bf16 activations), down, weighted
    sum (float32) over the top-k; each projection through :func:`_weight_only_matmul`."""
    s13 = getattr(layer, f"w13_{CPU_INT8_SCALE}")
    s2 = getattr(layer, f"w2_{CPU_INT8_SCALE}")
    has_bias = layer.layout.has_bias

    def expert(e: int, xe: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on its tokens ``xe [T_e, H]`` -> float32 ``[T_e, H]``."""
        b13 = layer.gate_up_proj_bias[e] if has_bias else None
        h = _weight_only_matmul(xe, layer.w13_weight[e], layer.w13_weight_scale[e], s13[e], b13)
        g = layer.apply_gate(h).to(xe.dtype)
        b2 = layer.down_proj_bias[e] if has_bias else None
        return _weight_only_matmul(g, layer.w2_weight[e], layer.w2_weight_scale[e], s2[e], b2)

    out = expert_loop(x, topk_ids, topk_weights, layer.layout.num_experts, expert)
    return out.to(x.dtype)


# ---- cpu-int8, W8A8 ---------------------------------------------------------------------------------


INT_MM_MAX_K = (2**31 - 1) // (127 * 127)
"""Largest reduction dim whose int8 x int8 dot product cannot overflow ``torch._int_mm`` 's int32
accumulator (133144: every int8 code is within [-127, 127] for both operands)."""


def _int_mm_supported(layer: torch.nn.Module, device: torch.device) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cpu":
        return False, f"the W8A8 int8 CPU path runs on the CPU, layer runs on {device.type}"
    bad = {k: v for k, v in _gemm_ks(layer).items() if v > INT_MM_MAX_K}
    if bad:
        found = ", ".join(f"{k}={v}" for k, v in bad.items())
        return False, f"int32 accumulation overflows for reduction dims above {INT_MM_MAX_K}, found {found}"
    return True, "CPU: C per-token int8 quantizer + torch._int_mm (oneDNN int8 GEMM)"


def _int_mm_matmul(method, x2: torch.Tensor, weight: dict, bias=None, out_dtype=torch.float32) -> torch.Tensor:
    """W8A8 ``x2 [M, K]`` (any float dtype) x int8 ``weight["qdata"] [N, K]`` with float32
    per-channel ``weight["scale"] [N, 1]`` (the :data:`oqcore.methods.Matmul` of W8A8
    ``cpu-int8``): ``x2`` quantized per token by the C quantizer (bytes and scales of the
    reference), the int8 dot products summed exactly in int32 by ``torch._int_mm``, then
    ``acc * x_scale * w_scale (+ bias)`` in float32, one rounding to ``out_dtype``. The reference
    ``F.linear(q_x * s_x, q_w * s_w)`` rounds each product and partial sum in float32: the two
    agree within float32 rounding."""
    from oq_plugin_int8.cpu import quantize_int8_rowwise_cpu

    q, s = quantize_int8_rowwise_cpu(x2.contiguous())
    y = torch._int_mm(q, weight["qdata"].t()).float().mul_(s).mul_(weight["scale"].reshape(1, -1).float())
    return (y if bias is None else y.add_(bias.float())).to(out_dtype)


# ---- triton ---------------------------------------------------------------------------------------


def _triton_supported(layer: torch.nn.Module, device: torch.device) -> tuple[bool, str]:
    return triton_support(device, TRITON_MIN_CAPABILITY, kernel_package="oq_plugin_int8.kernels")


def _triton_quantize_act(x: torch.Tensor):
    from oq_plugin_int8.kernels.quant import quantize_int8_rowwise_triton

    return quantize_int8_rowwise_triton(x)


def _triton_forward_linear(method, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """W8A16 (activation none) or W8A8 (int8_per_token, activations quantized by the Triton
    quantizer) Triton GEMM. ``x [..., K]`` -> ``[..., N]`` in ``x.dtype``."""
    from oq_plugin_int8.kernels.gemm import compute_dtype, int8_gemm

    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(compute_dtype(x.dtype))
    if method.activation_key is None:
        y = int8_gemm(x2, layer.weight, layer.weight_scale, layer.bias, out_dtype=x.dtype)
    else:
        q, s = _triton_quantize_act(x2)
        y = int8_gemm(q, layer.weight, layer.weight_scale, layer.bias, x_scale=s, out_dtype=x.dtype)
    return y.reshape(*shape[:-1], layer.out_features)


def _triton_forward_moe(method, layer: torch.nn.Module, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Fused-MoE grouped GEMMs (gate-up, ``layer.apply_gate``, down with routing weights, combine)."""
    from oq_plugin_int8.kernels.fused_moe import fused_moe_int8

    has_bias = layer.layout.has_bias
    return fused_moe_int8(
        x,
        layer.w13_weight,
        layer.w13_weight_scale,
        layer.w2_weight,
        layer.w2_weight_scale,
        topk_ids,
        topk_weights,
        layer.apply_gate,
        w13_bias=layer.gate_up_proj_bias if has_bias else None,
        w2_bias=layer.down_proj_bias if has_bias else None,
        quantize_act=None if method.activation_key is None else _triton_quantize_act,
    )


# ---- candidates -----------------------------------------------------------------------------------


def backends(kind: str, activation_key) -> list[Backend]:
    """The forward backends for ``kind`` (``"linear"`` or ``"moe"``) and one activation key (``None``
    or ``int8_per_token``) of the int8 scheme: ``triton`` and ``cpu-int8`` for both; the core adds
    the ``torch`` reference."""
    linear = kind == "linear"
    what = "weight-only" if activation_key is None else "W8A8, per-token int8 activations"
    out = [
        Backend(
            name="triton",
            activation_key=activation_key,
            is_supported=_triton_supported,
            priority=100,
            description=(
                f"Triton {'W8A16' if activation_key is None else 'W8A8'} int8 GEMM" if linear else f"Triton fused-MoE int8 grouped GEMM ({what})"
            ),
            forward=guard_driver(_triton_forward_linear if linear else _triton_forward_moe),
        )
    ]
    if activation_key is None:
        out.append(
            Backend(
                name="cpu-int8",
                activation_key=None,
                is_supported=_cpu_int8_supported,
                priority=50,
                description="torch._weight_int8pack_mm on CPU (int8 weight-only" + (")" if linear else ", loop over experts)"),
                forward=_cpu_int8_forward_linear if linear else _cpu_int8_forward_moe,
                prepare=_cpu_int8_prepare_linear if linear else _cpu_int8_prepare_moe,
            )
        )
    else:
        out.append(
            Backend(
                name="cpu-int8",
                activation_key=activation_key,
                is_supported=_int_mm_supported,
                priority=50,
                description="W8A8 on CPU: C per-token int8 quantizer + torch._int_mm" + ("" if linear else ", loop over experts"),
                forward=(linear_forward_from if linear else moe_forward_from)(_int_mm_matmul),
            )
        )
    return out
