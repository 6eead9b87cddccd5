"""Triton fused-MoE grouped GEMM for NVFP4 experts, weight-only (W4A16) or with NVFP4 activations
(W4A4, quantized per expert as the reference's expert loop does): the structure of
:mod:`oq_plugin_mxfp4.kernels.moe` (vLLM's ``fused_moe``: pairs sorted by expert and padded to
``BLOCK_M`` by :func:`oqcore.routing.align_by_expert`, one program per (row block, N tile) of one
expert) with the tile decode of :mod:`oq_plugin_nvfp4.kernels.gemm` (e2m1 times its e4m3 block
scale, exact, multiplied into the tile before the dot) and one float32 global scale per expert
(compressed-tensors' convention, a quantization multiplier: the accumulator is divided by it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from oq_plugin_mxfp4.kernels.moe import check_moe_operands
from oq_plugin_mxfp8.kernels.gemm import f32_dot

from oq_plugin_nvfp4.kernels.gemm import NV_BLOCK, load_nvfp4_tile, tile_dot
from oqcore.routing import align_by_expert


@triton.jit
def _nvfp4_moe_kernel(
    a_ptr,
    as_ptr,
    ag_ptr,
    b_ptr,
    bs_ptr,
    g_ptr,
    bias_ptr,
    c_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    weights_ptr,
    num_valid,
    N,
    K,
    A_ROW_DIV: tl.constexpr,
    A_FP4: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Rows ``s = sorted_ids[i]`` (pairs ``token * top_k + slot``; ``s >= num_valid`` is padding)
    read ``a[s // A_ROW_DIV]`` and write ``c[s] = a_row @ dequant(b[e]).T (+ bias[e]) (* weights[s])``
    with ``e = expert_ids[block]``. ``b [E, N, K/2]`` packed e2m1, ``bs [E, N, K/16]`` e4m3 bytes,
    ``g [E]`` float32 global scales; ``c`` float32. A_FP4: ``a`` packed e2m1 with e4m3 bytes ``as``
    and one float32 global scale per ``a`` row in ``ag`` (:func:`oq_plugin_nvfp4.kernels.gemm.tile_dot`)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = rows < num_valid
    arow = (rows // A_ROW_DIV).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_n = rn < N
    b_rows = b_ptr + expert * N * (K // 2) + rn[None, :].to(tl.int64) * (K // 2)
    bs_rows = bs_ptr + expert * N * (K // 16) + rn[None, :].to(tl.int64) * (K // 16)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        b = load_nvfp4_tile(b_rows, bs_rows, k0, K, rk, mask_n[None, :])
        acc += tile_dot(a_ptr, as_ptr, arow[:, None], valid[:, None], k0, K, rk, b, A_FP4, F32_DOT)
    acc = acc / tl.load(g_ptr + expert)
    if A_FP4:
        acc = acc / tl.load(ag_ptr + arow, mask=valid, other=1.0)[:, None]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * N + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if MUL_WEIGHT:
        acc = acc * tl.load(weights_ptr + rows, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(c_ptr + rows[:, None].to(tl.int64) * N + rn[None, :], acc, mask=valid[:, None] & mask_n[None, :])


def _grouped_gemm(
    a, a_fp4, w, w_scale, w_global, bias, out, sorted_ids, expert_ids, weights, a_row_div, block_m, block_n
) -> None:
    """One grouped GEMM launch; ``a_fp4``: None, or ``(scale bytes, per-row global scales)`` of
    packed e2m1 activations ``a``."""
    N, K = w.shape[1], w.shape[2] * 2
    grid = (expert_ids.numel(), triton.cdiv(N, block_n))
    if grid[0] == 0:
        return
    if a_fp4 is not None:
        from oq_toolkit.triton_support import interpreter_enabled

        f32 = interpreter_enabled()  # bf16 dots on the decoded tiles, but the interpreter's bf16 dot is broken
    else:
        f32 = f32_dot(a.dtype)
    _nvfp4_moe_kernel[grid](
        a,
        a_fp4[0] if a_fp4 is not None else a,
        a_fp4[1] if a_fp4 is not None else w_global,
        w.view(torch.uint8),
        w_scale.view(torch.uint8),
        w_global,
        bias if bias is not None else out,
        out,
        sorted_ids,
        expert_ids,
        weights if weights is not None else out,
        out.shape[0],
        N,
        K,
        A_ROW_DIV=a_row_div,
        A_FP4=a_fp4 is not None,
        HAS_BIAS=bias is not None,
        MUL_WEIGHT=weights is not None,
        F32_DOT=f32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=32,
    )


def quantize_pairs_per_expert(rows: torch.Tensor, pair_expert: torch.Tensor, num_experts: int):
    """NVFP4-quantize pair rows ``rows [P, K]`` the way the reference's per-expert loop does: each
    expert's rows with one global scale from their own amax (:func:`oq_plugin_nvfp4.quant.compute_global_scale`
    of the stacked rows routed to it; ``pair_expert [P]``, rows routed outside ``[0, E)`` get scale
    1 and are never read). Returns ``(codes uint8 [P, K/2], scale bytes uint8 [P, K/16], global
    float32 [P])``: what quantizing each expert's rows alone gives, row for row."""
    from oq_plugin_nvfp4.kernels.quant import _nvfp4_quant_kernel
    from oq_plugin_nvfp4.quant import global_scale_from_amax

    P, K = rows.shape
    ok = (pair_expert >= 0) & (pair_expert < num_experts)
    e = torch.where(ok, pair_expert, num_experts).long()
    row_amax = rows.float().abs().amax(-1) if K else torch.zeros(P, device=rows.device)
    amax = torch.zeros(num_experts + 1, dtype=torch.float32, device=rows.device)
    amax = amax.scatter_reduce(0, e, row_amax, reduce="amax", include_self=True)
    g_row = global_scale_from_amax(amax)[e].contiguous()
    q = torch.empty((P, K // 2), dtype=torch.uint8, device=rows.device)
    s = torch.empty((P, K // NV_BLOCK), dtype=torch.uint8, device=rows.device)
    if P and K:
        grid = (triton.cdiv(P, 16), triton.cdiv(K // NV_BLOCK, 4))
        _nvfp4_quant_kernel[grid](rows.contiguous(), g_row, q, s, P, K // NV_BLOCK, 1, BLOCK_R=16, BLOCK_B=4)
    return q, s, g_row


def _global(name: str, g: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The ``[E, 1]`` (or ``[E]``) per-expert global scales as a contiguous float32 ``[E]``."""
    if g.numel() != num_experts or g.dim() not in (1, 2) or g.shape[0] != num_experts:
        raise ValueError(
            f"{name} must hold one float32 global scale per expert, [{num_experts}, 1], got shape {list(g.shape)}"
        )
    return g.reshape(num_experts).to(torch.float32).contiguous()


def fused_moe_nvfp4(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w13_global: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    w2_global: torch.Tensor,
    apply_gate,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    *,
    act_fp4: bool = False,
    block_m: int = 16,
    block_n: int = 32,
) -> torch.Tensor:
    """Routed experts forward (W4A16, or W4A4 with ``act_fp4``): ``x [T, H]`` -> ``[T, H]`` in ``x.dtype``.

    ``w13 [E, 2I, H/2]`` / ``w2 [E, H, I/2]`` packed e2m1 bytes (uint8, element ``2j`` in the low
    nibble of byte ``j``) with float8_e4m3fn block scales (or their uint8 bytes) ``[E, 2I, H/16]`` /
    ``[E, H, I/16]`` and float32 global scales ``w13_global`` / ``w2_global [E, 1]`` (one per expert,
    compressed-tensors' convention: expert ``e``'s weight is ``e2m1(q) * scale.float() / global[e]``);
    biases ``[E, 2I]`` / ``[E, H]`` (any float dtype, added in float32) or None; ``topk_ids`` /
    ``topk_weights`` ``[T, k]`` (ids outside ``[0, E)`` are skipped); ``apply_gate`` maps the float32
    ``[T*k, 2I]`` gate-up output to ``[T*k, I]`` (any gate / up column order). The down GEMM's
    input is the gated intermediate cast to ``x.dtype``, as a bf16 model's tensor-core path does.

    ``act_fp4`` (W4A4): both GEMM inputs NVFP4-quantized as the reference's per-expert loop does
    (:func:`quantize_pairs_per_expert`: each expert's tokens, and each expert's float32 gated
    intermediate, with one global scale from their own amax), packed e2m1 tiles decoded in the
    kernel, each row's global scale on the accumulator.

    ``ValueError`` when a shape does not match (H and I must be positive multiples of 16).
    """
    check_moe_operands(
        x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, w13_bias, w2_bias, NV_BLOCK, "float8_e4m3fn"
    )
    T, H = x.shape
    top_k = topk_ids.shape[1]
    E, two_i, _ = w13.shape
    g13 = _global("w13_global", w13_global, E)
    g2 = _global("w2_global", w2_global, E)
    sorted_ids, expert_ids = align_by_expert(topk_ids, E, block_m)
    x = x.contiguous()
    w13, w13_scale, w2, w2_scale = (t.contiguous() for t in (w13, w13_scale, w2, w2_scale))
    w13_bias = w13_bias.contiguous() if w13_bias is not None else None
    w2_bias = w2_bias.contiguous() if w2_bias is not None else None
    g = torch.zeros((T * top_k, two_i), dtype=torch.float32, device=x.device)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    y = torch.zeros((T * top_k, H), dtype=torch.float32, device=x.device)
    if act_fp4:
        pair_expert = topk_ids.reshape(-1)
        aq, a_s, a_g = quantize_pairs_per_expert(x.repeat_interleave(top_k, 0), pair_expert, E)
        _grouped_gemm(
            aq, (a_s, a_g), w13, w13_scale, g13, w13_bias, g, sorted_ids, expert_ids, None, 1, block_m, block_n
        )
        # the reference quantizes the float32 gate output of each expert's tokens
        hq, h_s, h_g = quantize_pairs_per_expert(apply_gate(g).contiguous(), pair_expert, E)
        _grouped_gemm(
            hq, (h_s, h_g), w2, w2_scale, g2, w2_bias, y, sorted_ids, expert_ids, weights, 1, block_m, block_n
        )
    else:
        _grouped_gemm(x, None, w13, w13_scale, g13, w13_bias, g, sorted_ids, expert_ids, None, top_k, block_m, block_n)
        h = apply_gate(g).to(x.dtype).contiguous()
        _grouped_gemm(h, None, w2, w2_scale, g2, w2_bias, y, sorted_ids, expert_ids, weights, 1, block_m, block_n)
    return y.view(T, top_k, H).sum(1).to(x.dtype)
