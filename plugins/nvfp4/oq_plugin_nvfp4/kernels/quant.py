"""Triton NVFP4 quantizer, byte for byte the torch reference :func:`oq_plugin_nvfp4.quant.quantize_nvfp4`
(compressed-tensors 0.20.1's NVFP4 bytes) for finite input.

The global scale needs the amax of the whole tensor (of each expert) before any block can be
scaled, so it is computed first by the reference's own torch code
(:func:`oq_plugin_nvfp4.quant.compute_global_scale`: one reduction, one float32 scalar per tensor
or expert), or taken from ``global_scale``; one Triton pass then does the rest, every rounding
reproduced exactly: ``s = fl(g * fl(amax_b / 6))`` (``div_rn``: Triton's default float32 division
is approximate on GPUs), clamped to 448 and rounded to e4m3 with integer arithmetic
(:func:`oq_plugin_mxfp8.kernels.quant.encode_e4m3`), zero -> 0.125, ``t = fl(s / g)``,
``y = fl(x / t)`` (``div_rn``), clamped to +-6 and rounded to e2m1 by the thresholds
(:func:`oq_plugin_mxfp4.kernels.quant.encode_e2m1`), ``-0.0`` -> code 0 as compressed-tensors.
The even and odd elements of each 16-block are loaded as two halves of 8, so a byte is
``code(even) | code(odd) << 4``.

Non-finite input (rejected before weights get here; an activation could carry it) gives NaN
block scales and unspecified codes; the reference's NaN codes depend on which NaN payload the
CPU's division returns, which a GPU does not reproduce.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from oq_plugin_mxfp4.kernels.quant import encode_e2m1
from oq_plugin_mxfp8.kernels.quant import encode_e4m3

from oq_plugin_nvfp4.kernels.gemm import e4m3_to_f32
from oq_plugin_nvfp4.keys import NV_BLOCK
from oq_plugin_nvfp4.quant import _check_global, _check_k, compute_global_scale


@triton.jit
def _nvfp4_quant_kernel(
    x_ptr,
    g_ptr,
    q_ptr,
    s_ptr,
    R,
    NBLK,
    ROWS_PER_G,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """x ``[R, NBLK*16]`` (any float dtype) -> q ``[R, NBLK*8]`` packed e2m1 bytes, s ``[R, NBLK]``
    e4m3 bytes; row r uses the global scale ``g[r // ROWS_PER_G]`` (one per expert). Program
    (i, j) handles rows ``i*BLOCK_R..`` and 16-blocks ``j*BLOCK_B..``."""
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    blks = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    pair = tl.arange(0, 8)
    K = NBLK * 16
    row_ok = rows < R
    mask = row_ok[:, None, None] & (blks[None, :, None] < NBLK)
    offs = rows[:, None, None].to(tl.int64) * K + blks[None, :, None] * 16 + 2 * pair[None, None, :]
    x0 = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_ptr + offs + 1, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows // ROWS_PER_G, mask=row_ok, other=1.0)[:, None]
    amax = tl.maximum(tl.max(tl.abs(x0), axis=2), tl.max(tl.abs(x1), axis=2))
    s = g * tl.math.div_rn(amax, 6.0)
    s = tl.where(s != s, s, tl.minimum(s, 448.0))
    s8 = encode_e4m3(s)
    sf = e4m3_to_f32(s8)
    s8 = tl.where(sf == 0.0, 0x20, s8)  # compressed-tensors: a zero scale becomes 0.125 (e4m3 0x20)
    sf = tl.where(sf == 0.0, 0.125, sf)
    t = tl.math.div_rn(sf, g)[:, :, None]
    y0 = tl.math.div_rn(x0, t)
    y1 = tl.math.div_rn(x1, t)
    y0 = tl.where(y0 != y0, y0, tl.minimum(tl.maximum(y0, -6.0), 6.0))
    y1 = tl.where(y1 != y1, y1, tl.minimum(tl.maximum(y1, -6.0), 6.0))
    c0 = tl.where(y0 == 0.0, 0, encode_e2m1(y0))  # sign(-0.0) is +0 in compressed-tensors
    c1 = tl.where(y1 == 0.0, 0, encode_e2m1(y1))
    q_offs = rows[:, None, None].to(tl.int64) * (K // 2) + blks[None, :, None] * 8 + pair[None, None, :]
    tl.store(q_ptr + q_offs, (c0 | (c1 << 4)).to(tl.uint8), mask=mask)
    s_offs = rows[:, None].to(tl.int64) * NBLK + blks[None, :]
    tl.store(s_ptr + s_offs, s8.to(tl.uint8), mask=row_ok[:, None] & (blks[None, :] < NBLK))


def quantize_nvfp4_triton(
    w: torch.Tensor, options=None, *, global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`oq_plugin_nvfp4.quant.quantize_nvfp4`: same signature, shapes and (for
    finite input) bytes.

    ``w``: ``[K]``, ``[N, K]`` / ``[M, K]`` (one global scale) or ``[E, N, K]`` (one per expert),
    float32 / bf16 / fp16, K a multiple of 16. Returns ``(qdata uint8 [..., K/2], scale
    float8_e4m3fn [..., K/16], global_scale float32 [1] or [E, 1])``. ``global_scale`` overrides
    the computed one (float32, that shape). Raises ``ValueError`` as the reference does (K, more
    than 3 dims, a global scale of the wrong shape / dtype). ``options``: unused (NVFP4 has none).
    Runs on CUDA, or on the CPU under ``TRITON_INTERPRET=1``.
    """
    _check_k(w)
    g = compute_global_scale(w) if global_scale is None else _check_global(global_scale, w)
    shape = w.shape
    x = w.contiguous().reshape(-1, shape[-1])
    R, K = x.shape
    nblk = K // NV_BLOCK
    q = torch.empty((R, K // 2), dtype=torch.uint8, device=w.device)
    s = torch.empty((R, nblk), dtype=torch.uint8, device=w.device)
    rows_per_g = max(R // g.numel(), 1)  # [E, N, K]: N rows per expert; otherwise one scale for all
    BLOCK_R, BLOCK_B = 16, 4
    if R and nblk:
        grid = (triton.cdiv(R, BLOCK_R), triton.cdiv(nblk, BLOCK_B))
        _nvfp4_quant_kernel[grid](
            x, g.reshape(-1).contiguous(), q, s, R, nblk, rows_per_g, BLOCK_R=BLOCK_R, BLOCK_B=BLOCK_B
        )
    q = q.reshape(*shape[:-1], K // 2)
    return q, s.view(torch.float8_e4m3fn).reshape(*shape[:-1], nblk), g
