"""Triton fp8 quantizers, byte-identical to the torch reference (:mod:`oq_plugin_fp8.quant`).

One kernel covers every grouping: each program owns ``BLOCK_R`` rows of one column group
(``GROUP_C`` columns: 128 for blocks / 1x128 groups, the whole row for per-channel / per-token),
computes the group amax, the scale (``amax / 448`` with ``tl.div_rn``, zero -> float32 eps) and
writes fp8 in the same pass over its group (reading it twice from cache, never re-launching).
Per-tensor scales need a global reduction first: the amax is reduced by torch (exact, a max),
the kernel then quantizes with the given scale.

Numbers: ``tl.div_rn`` is IEEE division like torch's ``/`` (Triton's ``/`` on CUDA is not
correctly rounded). The fp8 rounding is done in float32 by :func:`round_to_fp8_grid`, so the final
``.to(float8e4nv)`` cast is exact: Triton 3.9's interpreter mis-rounds casts whose rounding
carries into the next exponent (125.2 -> 64 instead of 128).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from oq_plugin_fp8.quant import FP8_DTYPE, FP8_MAX, SCALE_EPS, Grouping, scale_from_amax


@triton.jit
def round_to_fp8_grid(v):
    """Round float32 ``v`` (already clamped to +-448) to the nearest float8_e4m3fn value, ties to
    even, in float32 arithmetic. Sign (and -0.0) preserved bitwise, as torch's cast does."""
    bits = v.to(tl.uint32, bitcast=True)
    sign = bits & 0x80000000
    mag_bits = bits & 0x7FFFFFFF
    a = mag_bits.to(tl.float32, bitcast=True)
    # unbiased exponent; e4m3fn normals start at 2^-6, below that the spacing is fixed at 2^-9
    e = (mag_bits >> 23).to(tl.int32) - 127
    e = tl.maximum(e, -6)
    ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((127 - (e - 3)) << 23).to(tl.float32, bitcast=True)
    m = a * inv_ulp  # exact: a power-of-two scaling, m in [0, 16]
    # adding 2^23 leaves a unit spacing, so the IEEE add rounds m to an integer, ties to even
    r = (m + 8388608.0) - 8388608.0
    out = (r * ulp).to(tl.uint32, bitcast=True) | sign
    return out.to(tl.float32, bitcast=True)


@triton.jit
def _fp8_group_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    R,
    C,
    GROUP_C,
    stride_xb,
    stride_xr,
    stride_qb,
    stride_qr,
    stride_sb,
    stride_sr,
    stride_sc,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    REDUCE_ROWS: tl.constexpr,
    SCALE_GIVEN: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_c = tl.program_id(2)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    c0 = pid_c * GROUP_C
    c_end = tl.minimum(c0 + GROUP_C, C)
    x_base = x_ptr + pid_b * stride_xb + rows[:, None] * stride_xr
    q_base = q_ptr + pid_b * stride_qb + rows[:, None] * stride_qr
    s_rows = s_ptr + pid_b * stride_sb + rows * stride_sr + pid_c * stride_sc
    if SCALE_GIVEN:
        scale = tl.load(s_rows, mask=rmask, other=1.0)
    else:
        amax = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c in range(c0, c_end, BLOCK_C):
            cols = c + tl.arange(0, BLOCK_C)
            m = rmask[:, None] & (cols < c_end)[None, :]
            x = tl.load(x_base + cols[None, :], mask=m, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        if REDUCE_ROWS:
            amax = tl.zeros([BLOCK_R], dtype=tl.float32) + tl.max(amax, axis=0)
        scale = tl.div_rn(amax, tl.full([BLOCK_R], 448.0, tl.float32))
        scale = tl.where(scale == 0.0, 1.1920928955078125e-07, scale)
        if REDUCE_ROWS:
            first = tl.arange(0, BLOCK_R) == 0
            tl.store(s_ptr + pid_b * stride_sb + pid_r * stride_sr + pid_c * stride_sc + rows * 0, scale, mask=first)
        else:
            tl.store(s_rows, scale, mask=rmask)
    for c in range(c0, c_end, BLOCK_C):
        cols = c + tl.arange(0, BLOCK_C)
        m = rmask[:, None] & (cols < c_end)[None, :]
        x = tl.load(x_base + cols[None, :], mask=m, other=0.0).to(tl.float32)
        v = tl.div_rn(x, tl.broadcast_to(scale[:, None], [BLOCK_R, BLOCK_C]))
        v = tl.where(v == 0.0, 0.0, v)  # -0.0 -> +0.0, as the reference's "+ 0.0" zero point
        v = tl.clamp(v, -448.0, 448.0)
        v = round_to_fp8_grid(v)
        tl.store(q_base + cols[None, :], v.to(tl.float8e4nv), mask=m)


def _as3d(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(-1, w.shape[-2], w.shape[-1]).contiguous()


def quantize_grouped(w: torch.Tensor, g: Grouping) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`oq_plugin_fp8.quant.quantize_grouped`: same shapes, same bytes.

    ``w [..., R, C]`` in any float dtype (read and converted to float32 inside the kernel).
    """
    assert abs(SCALE_EPS - 1.1920928955078125e-07) == 0 and FP8_MAX == 448.0
    x = _as3d(w)
    B, R, C = x.shape
    gr, gc = g.extents(R, C)
    nr, nc = -(-R // gr), -(-C // gc)
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    if B * R * C == 0:
        from oq_plugin_fp8.quant import quantize_grouped as reference

        return reference(w, g)
    if g.tensor_scale:
        # per-tensor: exact torch max reduction, then one quantizing pass with the scale given
        scale = scale_from_amax(x.abs().amax(dim=(-2, -1)).float())  # [B]
        block_r = 32
        grid = (B, triton.cdiv(R, block_r), 1)
        _fp8_group_quant_kernel[grid](
            x, q, scale, R, C, C, x.stride(0), x.stride(1), q.stride(0), q.stride(1), 1, 0, 0,
            BLOCK_R=block_r, BLOCK_C=128, REDUCE_ROWS=False, SCALE_GIVEN=True,
        )
        out_scale = scale.reshape(*w.shape[:-2], 1)
    else:
        s = torch.empty((B, nr, nc), dtype=torch.float32, device=x.device)
        block = gr == 128
        block_r = 128 if block else 32
        grid = (B, triton.cdiv(R, block_r), nc)
        _fp8_group_quant_kernel[grid](
            x, q, s, R, C, gc, x.stride(0), x.stride(1), q.stride(0), q.stride(1), s.stride(0), s.stride(1), s.stride(2),
            BLOCK_R=block_r, BLOCK_C=128 if block else 64, REDUCE_ROWS=block, SCALE_GIVEN=False,
        )
        out_scale = s.reshape(*w.shape[:-2], nr, nc)
    return q.reshape(w.shape), out_scale


def quantize_rows_with_scale(x: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """Quantize ``x [M, K]`` with a given float32 scale per row ``row_scale [M]`` (used for MoE
    per-tensor activations, whose scale is per expert and so differs between a token's slots)."""
    x = x.contiguous()
    M, K = x.shape
    q = torch.empty(x.shape, dtype=FP8_DTYPE, device=x.device)
    if M == 0:
        return q
    rs = row_scale.float().contiguous()
    _fp8_group_quant_kernel[(1, triton.cdiv(M, 32), 1)](
        x, q, rs, M, K, K, 0, x.stride(0), 0, q.stride(0), 0, 1, 0,
        BLOCK_R=32, BLOCK_C=64, REDUCE_ROWS=False, SCALE_GIVEN=True,
    )
    return q
