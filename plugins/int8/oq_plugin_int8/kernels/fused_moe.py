"""Triton fused-MoE grouped GEMM for int8 per-channel expert weights (vLLM's ``fused_moe`` scheme).

Token slots (``T * top_k`` of them, slot ``t * top_k + j`` = token ``t``'s j-th expert) are sorted by
expert and each expert's run padded to a multiple of ``BLOCK_M`` (:func:`oqcore.routing.align_by_expert`, vLLM's
``moe_align_block_size``); one program computes one ``(BLOCK_M slots of one expert, BLOCK_N
outputs)`` tile, reading the expert's int8 weights ``[E, N, K]`` directly, so no weights are gathered
or copied. Padding slots hold a sentinel (``T * top_k``) and are masked out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from oq_plugin_int8.kernels.gemm import _int8_k_step, compute_dtype, dot_precision, interpret_bf16

from oqcore.routing import align_by_expert


@triton.jit
def _fused_moe_int8_kernel(
    a_ptr,
    a_scale_ptr,
    b_ptr,
    b_scale_ptr,
    bias_ptr,
    c_ptr,
    topk_w_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    N,
    K,
    num_slots,
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_bse,
    stride_biase,
    stride_cm,
    stride_cn,
    TOP_K: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    W8A8: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INTERPRET_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_ids_ptr + offs_m)
    slot_mask = slots < num_slots
    # Rows of `a`: the token for the first GEMM (a = x [T, K], TOP_K = k), the slot itself for
    # the second (a = intermediate [T * k, K], TOP_K = 1).
    rows = slots // TOP_K
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    b_base = b_ptr + expert * stride_be
    if W8A8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc = _int8_k_step(
            acc, a_ptr, b_base, rows, slot_mask, offs_n, n_mask, offs_k, k0, K,
            stride_am, stride_ak, stride_bn, stride_bk, W8A8, DOT_PRECISION, INTERPRET_BF16,
        )
    b_scale = tl.load(b_scale_ptr + expert * stride_bse + offs_n, mask=n_mask, other=0.0)
    if W8A8:
        a_scale = tl.load(a_scale_ptr + rows, mask=slot_mask, other=0.0)
        res = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    else:
        res = acc * b_scale[None, :]
    if HAS_BIAS:
        res += tl.load(bias_ptr + expert * stride_biase + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if MUL_ROUTED_WEIGHT:
        w = tl.load(topk_w_ptr + slots, mask=slot_mask, other=0.0).to(tl.float32)
        res = res * w[:, None]
    tl.store(c_ptr + slots[:, None] * stride_cm + offs_n[None, :] * stride_cn, res.to(c_ptr.dtype.element_ty), mask=slot_mask[:, None] & n_mask[None, :])


def fused_moe_int8_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    out: torch.Tensor,
    sorted_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    top_k: int,
    block_m: int,
    bias: torch.Tensor | None = None,
    topk_weights: torch.Tensor | None = None,
    a_scale: torch.Tensor | None = None,
) -> None:
    """One grouped GEMM: ``out[s] = (a[s // top_k] @ W[e(s)].T * scale[e(s)] (+ bias[e(s)])) (* topk_w[s])``
    for every routed slot ``s``; rows of ``out`` for unrouted slots are left untouched.

    ``a [rows, K]`` bf16/fp16/fp32 (or int8 with per-row float32 ``a_scale`` for W8A8), ``w [E, N, K]``
    int8, ``w_scale [E, N, 1]`` float32, ``bias [E, N]``, ``topk_weights [T, k]``, ``out [T * k, N]``.
    """
    E, N, K = w.shape
    if expert_ids.numel() == 0:
        return
    ws = w_scale.reshape(E, N).float()
    if not ws.is_contiguous():
        ws = ws.contiguous()
    tw = topk_weights.reshape(-1) if topk_weights is not None else ws
    block_n, block_k = 32, 64
    grid = (expert_ids.numel(), triton.cdiv(N, block_n))
    _fused_moe_int8_kernel[grid](
        a, a_scale.reshape(-1) if a_scale is not None else ws, w, ws, bias if bias is not None else ws, out, tw,
        sorted_ids, expert_ids,
        N, K, out.shape[0],
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), ws.stride(0),
        bias.stride(0) if bias is not None else 0, out.stride(0), out.stride(1),
        TOP_K=top_k, MUL_ROUTED_WEIGHT=topk_weights is not None, HAS_BIAS=bias is not None, W8A8=a_scale is not None,
        DOT_PRECISION=dot_precision(a.dtype), INTERPRET_BF16=interpret_bf16(a.dtype), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )


def fused_moe_int8(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    quantize_act=None,
) -> torch.Tensor:
    """Routed experts: gate-up GEMM, ``gate`` (``[S, 2I] -> [S, I]``, the layer's activation), down
    GEMM with the routing weights applied, then the sum over each token's top-k.

    ``x [T, H]``, ``w13 [E, 2I, H]`` / ``w2 [E, H, I]`` int8 with ``[E, N, 1]`` float32 scales,
    ``topk_ids`` / ``topk_weights [T, k]``. ``quantize_act`` (``x -> (int8, scale [rows, 1])``)
    selects W8A8; ``None`` is weight-only. The gate-up result is kept in float32 (the gate runs in
    float32 as in the reference) and cast to the compute dtype for the down GEMM. Returns ``[T, H]``
    in ``x.dtype``.
    """
    T, H = x.shape
    k = topk_ids.shape[1]
    E = w13.shape[0]
    cd = compute_dtype(x.dtype)
    block_m = 16
    sorted_ids, expert_ids = align_by_expert(topk_ids, E, block_m)
    a = x.to(cd).contiguous()
    a_scale = None
    if quantize_act is not None:
        a, a_scale = quantize_act(a)
    inter = torch.zeros((T * k, w13.shape[1]), dtype=torch.float32, device=x.device)
    fused_moe_int8_gemm(a, w13, w13_scale, inter, sorted_ids, expert_ids, k, block_m, bias=w13_bias, a_scale=a_scale)
    h = gate(inter).to(cd).contiguous()
    h_scale = None
    if quantize_act is not None:
        h, h_scale = quantize_act(h)
    out = torch.zeros((T * k, H), dtype=torch.float32, device=x.device)
    fused_moe_int8_gemm(h, w2, w2_scale, out, sorted_ids, expert_ids, 1, block_m, bias=w2_bias, topk_weights=topk_weights.contiguous(), a_scale=h_scale)
    return out.view(T, k, H).sum(dim=1).to(x.dtype)
