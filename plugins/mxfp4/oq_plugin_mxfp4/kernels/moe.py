"""Triton fused-MoE grouped GEMM for MXFP4 experts (the structure of vLLM's ``fused_moe`` kernel and
of :mod:`oq_plugin_mxfp8.kernels.moe`).

The ``T * top_k`` (token, slot) pairs are sorted by expert and each expert's run is padded to a
multiple of ``BLOCK_M`` (:func:`oqcore.routing.align_by_expert`, vLLM's ``moe_align_block_size``);
one program computes one (row block, N tile), all of whose rows belong to the same expert, so it
streams that expert's packed e2m1 tile with its per-32 e8m0 scales inside the K loop, decoding the
nibbles in registers as :mod:`oq_plugin_mxfp4.kernels.gemm`. The forward is: gate-up GEMM (+ bias),
the layer's ``apply_gate`` in float32 (torch), down GEMM (+ bias) times the routing weight, sum
over top-k. W4A8 / W4A4 quantize both GEMM inputs (``x`` once, the gated intermediate once) to
MXFP8 / MXFP4 with :func:`oq_plugin_mxfp8.kernels.quant.quantize_mxfp8_triton` /
:func:`oq_plugin_mxfp4.kernels.quant.quantize_mxfp4_triton`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from oq_plugin_mxfp8.kernels.gemm import e8m0_to_f32
from oq_plugin_mxfp8.kernels.quant import quantize_mxfp8_triton

from oq_plugin_mxfp4.kernels.gemm import MX_BLOCK, a_format, block_dot_f32, block_product, load_e2m1_tile
from oq_plugin_mxfp4.kernels.quant import quantize_mxfp4_triton
from oqcore.routing import align_by_expert


@triton.jit
def _mxfp4_moe_kernel(
    a_ptr,
    as_ptr,
    b_ptr,
    bs_ptr,
    bias_ptr,
    c_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    weights_ptr,
    num_valid,
    N,
    K,
    A_ROW_DIV: tl.constexpr,
    A_FMT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MUL_WEIGHT: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Rows ``s = sorted_ids[i]`` (pairs ``token * top_k + slot``; ``s >= num_valid`` is padding)
    read ``a[s // A_ROW_DIV]`` and write ``c[s] = a_row @ dequant(b[e]).T (+ bias[e]) (* weights[s])``
    with ``e = expert_ids[block]``. ``b [E, N, K/2]`` packed e2m1, ``bs [E, N, K/32]`` e8m0 bytes;
    ``c`` float32; ``a`` in the format ``A_FMT`` (:func:`oq_plugin_mxfp4.kernels.gemm.block_product`)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = rows < num_valid
    arow = (rows // A_ROW_DIV).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, 32)
    mask_n = rn < N
    nblk = K // 32
    b_rows = b_ptr + expert * N * (K // 2) + rn[None, :].to(tl.int64) * (K // 2)
    bs_base = bs_ptr + expert * N * nblk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(nblk):
        code = load_e2m1_tile(b_rows, kb * 32, rk, mask_n[None, :])
        sb = e8m0_to_f32(tl.load(bs_base + rn.to(tl.int64) * nblk + kb, mask=mask_n, other=127))
        acc += block_product(a_ptr, as_ptr, arow, valid, K, kb, rk, code, A_FMT, F32_DOT) * sb[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * N + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if MUL_WEIGHT:
        acc = acc * tl.load(weights_ptr + rows, mask=valid, other=0.0).to(tl.float32)[:, None]
    tl.store(c_ptr + rows[:, None].to(tl.int64) * N + rn[None, :], acc, mask=valid[:, None] & mask_n[None, :])


def _grouped_gemm(
    a, a_scale, w, w_scale, bias, out, sorted_ids, expert_ids, weights, a_row_div, block_m, block_n
) -> None:
    N, K = w.shape[1], w.shape[2] * 2
    grid = (expert_ids.numel(), triton.cdiv(N, block_n))
    if grid[0] == 0:
        return
    fmt = a_format(a, a_scale)
    _mxfp4_moe_kernel[grid](
        a,
        a_scale.view(torch.uint8) if a_scale is not None else a,
        w.view(torch.uint8),
        w_scale.view(torch.uint8),
        bias if bias is not None else out,
        out,
        sorted_ids,
        expert_ids,
        weights if weights is not None else out,
        out.shape[0],
        N,
        K,
        A_ROW_DIV=a_row_div,
        A_FMT=fmt,
        HAS_BIAS=bias is not None,
        MUL_WEIGHT=weights is not None,
        F32_DOT=block_dot_f32(fmt, a),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
    )


def check_moe_operands(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, w13_bias, w2_bias, block, scale_what):
    """``(T, E, H, I)`` of a fused-MoE call with packed 4-bit experts, or ``ValueError`` naming the
    operand whose shape is wrong: ``x [T, H]``, ``topk_ids`` / ``topk_weights [T, k]``,
    ``w13 [E, 2I, H/2]``, ``w13_scale [E, 2I, H/block]``, ``w2 [E, H, I/2]``,
    ``w2_scale [E, H, I/block]``, biases ``[E, 2I]`` / ``[E, H]`` or None; H and I multiples of
    ``block``. Shared with oq-plugin-nvfp4."""
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            f"expected x [T, H], w13 [E, 2I, H/2], w2 [E, H, I/2], got {tuple(x.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}"
        )
    T, H = x.shape
    E, two_i = w13.shape[0], w13.shape[1]
    I = two_i // 2
    if two_i % 2 or H % block or I % block or not H or not I:
        raise ValueError(
            f"H = {H} and I = {two_i / 2:g} must be positive multiples of {block} (one {scale_what} scale per {block} elements along K)"
        )
    want = {
        "topk_ids": (topk_ids, (T, topk_ids.shape[-1] if topk_ids.dim() == 2 else -1)),
        "topk_weights": (topk_weights, (T, topk_ids.shape[-1] if topk_ids.dim() == 2 else -1)),
        "w13": (w13, (E, 2 * I, H // 2)),
        "w13_scale": (w13_scale, (E, 2 * I, H // block)),
        "w2": (w2, (E, H, I // 2)),
        "w2_scale": (w2_scale, (E, H, I // block)),
        "w13_bias": (w13_bias, (E, 2 * I)),
        "w2_bias": (w2_bias, (E, H)),
    }
    for name, (t, shape) in want.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(
                f"{name} must have shape {list(shape)} (x {list(x.shape)}, E={E}, I={I}), got {list(t.shape)}"
            )
    for name in ("w13", "w13_scale", "w2", "w2_scale"):
        if want[name][0].element_size() != 1:
            raise ValueError(f"{name} must hold bytes (packed e2m1 codes or 8-bit scales), got {want[name][0].dtype}")
    return T, E, H, I


def activation_format(act_mx) -> str | None:
    """``act_mx`` of :func:`fused_moe_mxfp4` as ``None`` (W4A16), ``"mxfp8"`` (W4A8) or ``"mxfp4"``
    (W4A4); ``ValueError`` for anything else."""
    if act_mx is None or act_mx is False:
        return None
    if act_mx is True or act_mx == "mxfp8":
        return "mxfp8"
    if act_mx == "mxfp4":
        return "mxfp4"
    raise ValueError(f"act_mx must be False / None (W4A16), True or 'mxfp8' (W4A8) or 'mxfp4' (W4A4), got {act_mx!r}")


def fused_moe_mxfp4(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    apply_gate,
    w13_bias: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    act_mx: bool | str = False,
    options=None,
    *,
    block_m: int = 16,
    block_n: int = 32,
) -> torch.Tensor:
    """Routed experts forward: ``x [T, H]`` -> ``[T, H]`` in ``x.dtype``.

    ``w13 [E, 2I, H/2]`` / ``w2 [E, H, I/2]`` packed e2m1 bytes (uint8, element ``2j`` in the low
    nibble of byte ``j``) with e8m0 scales (float8_e8m0fnu or uint8) ``[E, 2I, H/32]`` /
    ``[E, H, I/32]``; biases ``[E, 2I]`` / ``[E, H]`` (any float dtype, added in float32) or None;
    ``topk_ids`` / ``topk_weights`` ``[T, k]`` (ids outside ``[0, E)`` are skipped); ``apply_gate``
    maps the float32 ``[T*k, 2I]`` gate-up output to ``[T*k, I]`` (whatever the gate-up column
    order is, e.g. GPT-OSS's interleaved gate / up: the kernel does not look at it).

    ``act_mx``: ``True`` or ``"mxfp8"``: quantize the GEMM inputs (``x`` once, the gated
    intermediate once) to MXFP8 with ``options.scale_mode`` (``"rceil"`` when ``options`` is None or
    has none) and run fp8 x fp8 dots (W4A8); ``"mxfp4"``: quantize them to MXFP4 the same way
    (:func:`oq_plugin_mxfp4.kernels.quant.quantize_mxfp4_triton`, W4A4; the blocks are per row, so
    quantizing all tokens at once gives each token the bytes it gets alone); ``False``: the inputs
    stay in ``x.dtype`` (W4A16: the down GEMM's input is the gated intermediate cast to
    ``x.dtype``, as a bf16 model's tensor-core path does).

    ``ValueError`` when a shape does not match (H and I must be positive multiples of 32) or for
    another ``act_mx``.
    """
    check_moe_operands(x, topk_ids, topk_weights, w13, w13_scale, w2, w2_scale, w13_bias, w2_bias, MX_BLOCK, "e8m0")
    T, H = x.shape
    top_k = topk_ids.shape[1]
    E, two_i, _ = w13.shape
    act = activation_format(act_mx)
    sorted_ids, expert_ids = align_by_expert(topk_ids, E, block_m)
    x = x.contiguous()
    quantize = {"mxfp8": quantize_mxfp8_triton, "mxfp4": quantize_mxfp4_triton}.get(act)
    if quantize is not None:
        a, a_s = quantize(x, options)
    else:
        a, a_s = x, None
    w13, w13_scale, w2, w2_scale = (t.contiguous() for t in (w13, w13_scale, w2, w2_scale))
    w13_bias = w13_bias.contiguous() if w13_bias is not None else None
    w2_bias = w2_bias.contiguous() if w2_bias is not None else None
    g = torch.zeros((T * top_k, two_i), dtype=torch.float32, device=x.device)
    _grouped_gemm(a, a_s, w13, w13_scale, w13_bias, g, sorted_ids, expert_ids, None, top_k, block_m, block_n)
    h = apply_gate(g)
    if quantize is not None:
        h, h_s = quantize(h.contiguous(), options)
    else:
        h, h_s = h.to(x.dtype).contiguous(), None
    y = torch.zeros((T * top_k, H), dtype=torch.float32, device=x.device)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    _grouped_gemm(h, h_s, w2, w2_scale, w2_bias, y, sorted_ids, expert_ids, weights, 1, block_m, block_n)
    return y.view(T, top_k, H).sum(1).to(x.dtype)
