"""Triton fused-MoE grouped GEMM for fp8 expert weights (after vLLM's ``fused_moe_kernel``).

The ``T * top_k`` (token, slot) pairs are sorted by expert and each expert's run is padded to a
multiple of ``BLOCK_M`` (:func:`oqcore.routing.align_by_expert`); one program computes one ``BLOCK_M x BLOCK_N``
tile of one expert block, reading the expert id of its block, gathering its rows of ``A`` and
writing its rows of ``C`` back in (token, slot) order. Scales as in :mod:`.gemm`, with every
weight scale indexed by expert first; activation scales are per row of ``A`` (``A_SCALE`` ``0``
none, ``2`` per row, ``3`` 1x128 groups). An optional per-expert bias ``[E, N]`` is added and the
routing weight multiplied in the epilogue (bias first, as the reference does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from oq_plugin_fp8.kernels.gemm import A_GROUP, A_NONE, B_BLOCK, B_CHANNEL, _fp8_k_step, _interpreting


@triton.jit
def _fused_moe_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    as_ptr,
    bs_ptr,
    bias_ptr,
    topk_w_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    num_valid,
    N,
    K,
    EM,
    A_DIV,
    stride_am,
    stride_ak,
    stride_be,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    stride_as_m,
    stride_as_k,
    stride_bs_e,
    stride_bs_n,
    stride_bs_k,
    stride_bias_e,
    A_SCALE: tl.constexpr,
    B_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MUL_ROUTED_WEIGHT: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= EM:
        return
    slots = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    smask = slots < num_valid
    rows = slots // A_DIV
    e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    b_base = b_ptr + e * stride_be
    bs_base = bs_ptr + e * stride_bs_e
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc = _fp8_k_step(
            acc, a_ptr, b_base, as_ptr, bs_base, rows, smask, offs_n, nmask, offs_k, k0, K,
            stride_am, stride_ak, stride_bn, stride_bk, stride_as_m, stride_as_k, stride_bs_n, stride_bs_k,
            A_SCALE, B_SCALE, IEEE_DOT, BLOCK_K,
        )
    if A_SCALE == 2:
        acc = acc * tl.load(as_ptr + rows * stride_as_m, mask=smask, other=0.0)[:, None]
    if B_SCALE == 1:
        acc = acc * tl.load(bs_base)
    if B_SCALE == 2:
        acc = acc * tl.load(bs_base + offs_n * stride_bs_n, mask=nmask, other=0.0)[None, :]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + e * stride_bias_e + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if MUL_ROUTED_WEIGHT:
        acc = acc * tl.load(topk_w_ptr + slots, mask=smask, other=0.0).to(tl.float32)[:, None]
    c = c_ptr + slots[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=smask[:, None] & nmask[None, :])


def fused_moe_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    a_mode: int,
    a_div: int,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    w_mode: int,
    sorted_ids: torch.Tensor,
    expert_ids: torch.Tensor,
    num_valid: int,
    *,
    bias: torch.Tensor | None = None,
    topk_weights: torch.Tensor | None = None,
    block_m: int,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One grouped GEMM: ``C[s] = A[s // a_div] @ W[expert(s)].T (+ bias[expert(s)]) (* topk_weights[s])``
    for every valid slot ``s`` of the ``num_valid`` (token, slot) pairs; ``C [num_valid, N]``.

    ``w [E, N, K]`` fp8 with scales ``[E, 1]`` / ``[E, N, 1]`` / ``[E, ceil(N/128), ceil(K/128)]``;
    ``a [rows, K]`` fp8 with per-row (``[rows, 1]``) or 1x128 group scales, or high precision
    (``a_mode = A_NONE``). Rows of ``C`` of skipped slots are zero.
    """
    E, N, K = w.shape
    c = torch.zeros((num_valid, N), dtype=out_dtype, device=a.device)
    EM = sorted_ids.numel()
    if EM == 0 or N == 0:
        return c
    grouped = a_mode == A_GROUP or w_mode == B_BLOCK
    block_k = 128 if grouped else 64
    block_n = 64
    ws = w_scale.float().contiguous()
    a_s = a_scale.float().contiguous() if a_scale is not None else ws
    sam, sak = (a_s.stride(0), a_s.stride(1)) if a_mode != A_NONE else (0, 0)
    if w_mode == B_BLOCK:
        sbe, sbn, sbk = ws.stride(0), ws.stride(1), ws.stride(2)
    elif w_mode == B_CHANNEL:
        sbe, sbn, sbk = ws.stride(0), ws.stride(1), 0
    else:
        sbe, sbn, sbk = ws.stride(0), 0, 0
    grid = (EM // block_m, triton.cdiv(N, block_n))
    _fused_moe_kernel[grid](
        a, w, c, a_s, ws,
        bias if bias is not None else ws,
        topk_weights.reshape(-1).contiguous() if topk_weights is not None else ws,
        sorted_ids, expert_ids, num_valid, N, K, EM, a_div,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), c.stride(0), c.stride(1),
        sam, sak, sbe, sbn, sbk, bias.stride(0) if bias is not None else 0,
        A_SCALE=a_mode, B_SCALE=w_mode, HAS_BIAS=bias is not None,
        MUL_ROUTED_WEIGHT=topk_weights is not None,
        IEEE_DOT=a_mode == A_NONE and (a.dtype == torch.float32 or _interpreting(a)),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return c


__all__ = ["A_GROUP", "A_NONE", "fused_moe_gemm"]
