"""Backend candidates of oq-plugin-fp8, per (layer kind, weight key, activation key).

- ``torch`` (priority 0): the float32 dequantize-and-matmul reference of the method base classes;
  runs anywhere (added by the core from the scheme record).
- ``triton`` (priority 100): the kernels in :mod:`oq_plugin_fp8.kernels`. W8A8 needs fp8
  tensor-core dots (CUDA capability >= 8.9); weight-only (W8A16) kernels upcast the fp8 tile and
  run on >= 8.0. On the CPU only under ``TRITON_INTERPRET=1`` (tests).
- ``scaled-mm`` (priority 50, linear, per-tensor/per-channel weights with per-tensor/per-token
  activations): ``torch._scaled_mm`` on CUDA capability >= 8.9, N and K divisible by 16.
- ``cpu`` (priority 50, linear and moe, weight-only and every dynamic activation key):
  :mod:`oq_plugin_fp8.cpu`, a fused fp8 dequantize-and-GEMV C kernel (bytes read once, converted in
  registers) for small batches and tiled dequantize + ``torch.mm`` for large ones; never a whole
  bf16 copy of a weight. W8A8 quantizes the activations with this plugin's C quantizer (the
  activation key's ``cpu`` quantizer implementation: the reference's bytes) first.

Kernels are imported inside the forward functions, so importing this module never imports Triton.
"""

from __future__ import annotations

import functools
from functools import partial

import torch

from oqcore import Backend, linear_forward_from, moe_forward_from
from oq_toolkit.triton_support import guard_driver, triton_support

from oq_plugin_fp8 import keys as k

W8A8_CAPABILITY = (8, 9)
W8A16_CAPABILITY = (8, 0)


def _gemm_mode(key, operand: str) -> int:
    """The Triton GEMM's scale mode of ``key`` as operand ``"a"`` (activations) or ``"b"`` (weights),
    derived from the key's grouping."""
    from oq_plugin_fp8.kernels import gemm
    from oq_plugin_fp8.quant import grouping_of

    g = grouping_of(key)
    if g.tensor_scale:
        return gemm.A_TENSOR if operand == "a" else gemm.B_TENSOR
    if (g.rows, g.cols) == (1, -1):
        return gemm.A_TOKEN if operand == "a" else gemm.B_CHANNEL
    return gemm.A_GROUP if operand == "a" else gemm.B_BLOCK


def _b_mode(weight_key) -> int:
    return _gemm_mode(weight_key, "b")


def _quantize_rows(x: torch.Tensor, act_key) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Dynamically quantize activations ``x [M, K]`` with the Triton quantizer: ``(q, scale, a_mode)``."""
    from oq_plugin_fp8.kernels.quantize import quantize_grouped
    from oq_plugin_fp8.quant import grouping_of

    q, s = quantize_grouped(x, grouping_of(act_key))
    return q, s, _gemm_mode(act_key, "a")


def linear_triton_forward(method, layer, x: torch.Tensor) -> torch.Tensor:
    """``x [..., K] -> [..., N]`` through :func:`oq_plugin_fp8.kernels.gemm.fp8_gemm`; W8A8 quantizes
    ``x`` with the Triton quantizer first. Float32 accumulation, output in ``x.dtype``."""
    from oq_plugin_fp8.kernels import gemm

    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    b_mode = _b_mode(method.weight_key)
    if method.activation_key is None:
        y = gemm.fp8_gemm(x2, None, gemm.A_NONE, layer.weight, layer.weight_scale, b_mode, layer.bias, x.dtype)
    else:
        q, s, a_mode = _quantize_rows(x2, method.activation_key)
        y = gemm.fp8_gemm(q, s, a_mode, layer.weight, layer.weight_scale, b_mode, layer.bias, x.dtype)
    return y.reshape(*shape[:-1], layer.out_features)


def _moe_activation(method, a: torch.Tensor, slot_expert: torch.Tensor, num_experts: int, top_k: int):
    """Prepare the A operand of one grouped GEMM: ``(a, a_scale, a_mode, a_div)``.

    ``a`` has one row per token (``top_k > 1``: a slot ``s`` reads row ``s // top_k``) or per slot.
    Per-tensor dynamic activations follow the reference: one scale per expert over the rows that
    expert receives, so a token is quantized once per slot (rows expanded, ``a_div = 1``).
    """
    from oq_plugin_fp8.kernels import gemm
    from oq_plugin_fp8.kernels.quantize import quantize_rows_with_scale
    from oq_plugin_fp8.quant import scale_from_amax

    act = method.activation_key
    if act is None:
        return a.contiguous(), None, gemm.A_NONE, top_k
    if act == k.kFp8DynamicTensorSym:
        rows = a.repeat_interleave(top_k, dim=0) if top_k > 1 else a
        valid = (slot_expert >= 0) & (slot_expert < num_experts)
        idx = torch.where(valid, slot_expert, torch.zeros_like(slot_expert)).long()
        row_amax = torch.where(valid, rows.float().abs().amax(dim=-1), torch.zeros((), device=a.device))
        expert_amax = torch.zeros(num_experts, dtype=torch.float32, device=a.device)
        expert_amax.scatter_reduce_(0, idx, row_amax, reduce="amax")
        row_scale = scale_from_amax(expert_amax)[idx]
        return quantize_rows_with_scale(rows, row_scale), row_scale[:, None].contiguous(), gemm.A_TOKEN, 1
    q, s, mode = _quantize_rows(a.contiguous(), act)
    return q, s, mode, top_k


def moe_triton_forward(method, layer, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Fused MoE: gate-up grouped GEMM, the layer's ``apply_gate`` (float32), down grouped GEMM with
    the routing weights, sum over the top-k. ``x [T, H]`` -> ``[T, H]`` in ``x.dtype``."""
    from oq_plugin_fp8.kernels.fused_moe import fused_moe_gemm
    from oqcore.routing import align_by_expert

    T, H = x.shape
    top_k = topk_ids.shape[1]
    E = layer.layout.num_experts
    block_m = 16
    sorted_ids, expert_ids = align_by_expert(topk_ids, E, block_m)
    n = topk_ids.numel()
    slot_expert = topk_ids.reshape(-1).long()
    w_mode = _b_mode(method.weight_key)
    has_bias = layer.layout.has_bias
    a, a_s, a_mode, a_div = _moe_activation(method, x, slot_expert, E, top_k)
    h = fused_moe_gemm(
        a, a_s, a_mode, a_div, layer.w13_weight, layer.w13_weight_scale, w_mode, sorted_ids, expert_ids, n,
        bias=layer.gate_up_proj_bias if has_bias else None, block_m=block_m, out_dtype=torch.float32,
    )
    g = layer.apply_gate(h).float()
    a2, a2_s, a2_mode, _ = _moe_activation(method, g, slot_expert, E, 1)
    y = fused_moe_gemm(
        a2, a2_s, a2_mode, 1, layer.w2_weight, layer.w2_weight_scale, w_mode, sorted_ids, expert_ids, n,
        bias=layer.down_proj_bias if has_bias else None, topk_weights=topk_weights.float(),
        block_m=block_m, out_dtype=torch.float32,
    )
    return y.view(T, top_k, H).sum(dim=1).to(x.dtype)


def scaled_mm_forward(method, layer, x: torch.Tensor) -> torch.Tensor:
    """W8A8 through ``torch._scaled_mm``: activations quantized by the torch reference quantizer
    (per tensor or per token), weight scale per tensor or per channel, float32 output, bias added
    in float32, cast to ``x.dtype``."""
    from oq_plugin_fp8.quant import grouping_of, quantize_grouped

    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    q, s = quantize_grouped(x2, grouping_of(method.activation_key))
    ws = layer.weight_scale.float()
    if method.activation_key == k.kFp8DynamicTensorSym and method.weight_key == k.kFp8StaticTensorSym:
        scale_a, scale_b = s.reshape(()), ws.reshape(())
    else:
        # _scaled_mm takes tensor-wise or row-wise scales for both operands, never one of each
        scale_a = s.reshape(-1, 1).expand(q.shape[0], 1).contiguous()
        scale_b = ws.reshape(1, -1).expand(1, layer.out_features).contiguous()
    y = torch._scaled_mm(q, layer.weight.t(), scale_a=scale_a.float(), scale_b=scale_b.float(), out_dtype=torch.float32)
    if layer.bias is not None:
        y = y + layer.bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], layer.out_features)


def _scaled_mm_supported(layer, device):
    device = torch.device(device)
    if device.type != "cuda":
        return False, (
            f"torch._scaled_mm is used on CUDA only (on {device.type} it runs, but far slower than bf16: "
            "the torch backend is the CPU path)"
        )
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    cap = torch.cuda.get_device_capability(device)
    if cap < W8A8_CAPABILITY:
        return False, f"torch._scaled_mm needs CUDA compute capability >= 8.9, found {cap[0]}.{cap[1]}"
    n, kk = getattr(layer, "out_features", 0), getattr(layer, "in_features", 0)
    if n % 16 or kk % 16:
        return False, f"torch._scaled_mm needs N and K divisible by 16, got N={n} K={kk}"
    return True, f"CUDA compute capability {cap[0]}.{cap[1]}"


SCALED_MM_ACTIVATIONS = (k.kFp8DynamicTensorSym, k.kFp8DynamicTokenSym)


# ---- cpu (weight-only and W8A8) ------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _grouping(key):
    """:func:`oq_plugin_fp8.quant.grouping_of`, once per key (forwards ask on every call)."""
    from oq_plugin_fp8.quant import grouping_of

    return grouping_of(key)


def _cpu_grid(weight_key, q: torch.Tensor, scale: torch.Tensor) -> tuple[int, int, int]:
    """``(gr, gc, ld)`` of :func:`oq_plugin_fp8.cpu.fp8_linear` / :func:`oq_toolkit.wgemm.wgemm`
    for one ``[N, K]`` weight and its scale: the group extents (from the key's grouping) and the
    scale grid's row stride."""
    gr, gc = _grouping(weight_key).extents(*q.shape)
    return gr, gc, scale.shape[-1] if scale.dim() == 2 else 1


def _cpu_supported(layer, device) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cpu":
        return False, f"the fp8 CPU kernels run on the CPU, layer runs on {device.type}"
    # No compile here (plan time stays cheap): the kernel is built on the first forward.
    return True, "CPU: fused fp8 GEMM C kernel (oq_toolkit.wgemm: AMX / AVX512-BF16 / portable)"


def quantize_activation_cpu(act_key, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """Dynamic fp8 activations ``x2 [M, K]`` -> ``(q float8_e4m3fn [M, K], scale float32, grid)``
    with the C quantizer (the ``cpu`` quantizer implementation of ``act_key``: the torch
    reference's bytes; the reference runs instead without a compiler) in the grouping of
    ``act_key`` (per tensor ``[1]``, per token ``[M, 1]``, 1x128 groups ``[M, ceil(K/128)]``);
    ``grid`` is the scale grid ``(rows, cols, ld)`` of :func:`oq_toolkit.wgemm.wgemm`."""
    from oq_plugin_fp8.cpu import quantize_fp8_grouped

    g = _grouping(act_key)
    q, s = quantize_fp8_grouped(x2.contiguous(), g)
    ar, ac = g.extents(*x2.shape)
    return q, s, (ar, ac, s.shape[-1] if s.dim() == 2 else 1)


def _cpu_matmul(method, x2: torch.Tensor, weight: dict, bias=None, out_dtype=torch.float32) -> torch.Tensor:
    """``x2 [M, K] @ W^T (+ bias)`` for one ``[N, K]`` fp8 weight (``weight["qdata"]`` codes, its
    float32 scale grid ``weight["scale"]``), summed in float32 and rounded once to ``out_dtype``
    (the :data:`oqcore.methods.Matmul` of the ``cpu`` backend).

    W8A8: ``x2`` quantized by the C quantizer, codes and scales handed to the fused GEMM
    (:func:`oq_toolkit.wgemm.wgemm`: exact products, float32 sums, bias and output rounding in its
    epilogue: the reference within float32 rounding). Weight-only bf16 activations: the fused GEMM on
    ``x2`` as it is. Weight-only float32/fp16 activations: the float32 kernel of
    :mod:`oq_plugin_fp8.cpu` (the GEMM would round them to bf16)."""
    from oq_toolkit import wgemm

    q, scale = weight["qdata"], weight["scale"].float().contiguous()
    w_grid = _cpu_grid(method.weight_key, q, scale)
    act = method.activation_key
    if act is not None:
        a, sa, a_grid = quantize_activation_cpu(act, x2)
        return wgemm.wgemm(a, wgemm.E4M3, sa, a_grid, q, wgemm.E4M3, scale, w_grid, bias=bias, out_dtype=out_dtype)
    if x2.dtype == torch.bfloat16:
        return wgemm.wgemm(x2.contiguous(), wgemm.BF16, None, None, q, wgemm.E4M3, scale, w_grid, bias=bias, out_dtype=out_dtype)
    from oq_plugin_fp8 import cpu

    y = cpu.fp8_linear(x2, q, scale, cpu.SCALE_FLOAT32, *w_grid)
    return (y if bias is None else y + bias.float()).to(out_dtype)


cpu_forward_linear = linear_forward_from(_cpu_matmul)
"""``cpu`` forward of linear layers: :func:`_cpu_matmul` on the layer's weight."""

cpu_forward_moe = moe_forward_from(_cpu_matmul)
"""``cpu`` forward of routed experts: :func:`_cpu_matmul` per expert (W8A8 quantizes each expert's
inputs on their own: per-tensor scales over the rows an expert gets, as the reference)."""


def _triton_supported(capability, layer, device):
    return triton_support(device, capability, kernel_package="oq_plugin_fp8.kernels")


def backends(weight_key, kind: str, act) -> list[Backend]:
    """The forward backends for ``kind`` and one activation key ``act`` of the scheme whose weight
    key is ``weight_key`` (bind it with ``functools.partial``): ``triton`` and ``cpu`` always,
    ``scaled-mm`` for W8A8 per-tensor/per-channel linears with per-tensor/per-token
    activations. The core adds the ``torch`` reference."""
    if act is not None and act.scale.static:
        # static (calibrated) input scales: only the torch reference, which the core adds, reads the
        # stored input_scale; the kernels here compute activation scales per call
        return []
    label = "weight-only" if act is None else "W8A8"
    cap = W8A16_CAPABILITY if act is None else W8A8_CAPABILITY
    out = [
        Backend(
            name="triton",
            activation_key=act,
            is_supported=partial(_triton_supported, cap),
            priority=100,
            forward=guard_driver(linear_triton_forward if kind == "linear" else moe_triton_forward),
            description=(
                f"fp8 {label} Triton "
                + ("scaled GEMM" if kind == "linear" else "fused MoE grouped GEMM")
                + f" (CUDA capability >= {cap[0]}.{cap[1]})"
            ),
        )
    ]
    out.append(
        Backend(
            name="cpu",
            activation_key=act,
            is_supported=_cpu_supported,
            priority=50,
            forward=cpu_forward_linear if kind == "linear" else cpu_forward_moe,
            description=f"fp8 {label} on the CPU: "
            + ("" if act is None else "activations quantized by the C quantizer, ")
            + "fused dequantize-and-GEMV C kernel"
            + ("" if kind == "linear" else ", loop over experts"),
        )
    )
    if kind == "linear" and weight_key != k.kFp8Static128BlockSym and act in SCALED_MM_ACTIVATIONS:
        out.append(
            Backend(
                name="scaled-mm",
                activation_key=act,
                is_supported=_scaled_mm_supported,
                priority=50,
                forward=scaled_mm_forward,
                description="fp8 W8A8 through torch._scaled_mm (CUDA capability >= 8.9)",
            )
        )
    return out
