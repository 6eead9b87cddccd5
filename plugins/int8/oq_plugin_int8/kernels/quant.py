"""Triton int8 row-wise quantizer: one kernel launch, one program per row.

Serves both int8 keys (per-channel weights ``[N, K]`` / ``[E, N, K]``, per-token activations
``[M, K]``): the rule is the same along the last dim. Must produce the same bytes as
:func:`oq_plugin_int8.quant.quantize_int8_rowwise`, hence:

- divisions through ``tl.math.div_rn`` (IEEE round-to-nearest, like torch), because Triton's plain
  fp32 ``/`` may lower to an approximate division on CUDA;
- round-half-to-even (``torch.round``) through the ``(v + 1.5 * 2**23) - 1.5 * 2**23`` trick, exact in
  fp32 for ``|v| < 2**22`` (here ``|v| <= 127``), which behaves identically on CUDA and in the
  interpreter (no libdevice call needed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from oq_plugin_int8.quant import INT8_MAX, ZERO_ROW_SCALE

_RNE_MAGIC = 12582912.0  # 1.5 * 2**23: adding it leaves no fraction bits, so the FPU rounds half-even
_SINGLE_BLOCK_MAX_K = 8192


@triton.jit
def _int8_rowwise_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    K,
    stride_xm,
    stride_qm,
    QMAX: tl.constexpr,
    EPS: tl.constexpr,
    MAGIC: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SINGLE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    offs = tl.arange(0, BLOCK_K)
    if SINGLE:
        # The whole row fits one block: read it once, keep it in registers for the second step.
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
        scale = tl.math.div_rn(amax, QMAX)
        scale = tl.where(scale == 0.0, EPS, scale)
        v = tl.math.div_rn(x, scale)
        v = (v + MAGIC) - MAGIC
        v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
        tl.store(q_row + offs, v.to(tl.int8), mask=mask)
    else:
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = (k0 + offs) < K
            x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            acc = tl.maximum(acc, tl.abs(x))
        amax = tl.max(acc, axis=0)
        scale = tl.math.div_rn(amax, QMAX)
        scale = tl.where(scale == 0.0, EPS, scale)
        for k0 in range(0, K, BLOCK_K):
            mask = (k0 + offs) < K
            x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
            v = tl.math.div_rn(x, scale)
            v = (v + MAGIC) - MAGIC
            v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
            tl.store(q_row + k0 + offs, v.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, scale)


def quantize_int8_rowwise_triton(x: torch.Tensor, options=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`oq_plugin_int8.quant.quantize_int8_rowwise` (same bytes).

    ``x``: ``[..., K]`` float (bf16/fp16/fp32), on CUDA or on the CPU under ``TRITON_INTERPRET=1``.
    Returns ``(q int8 [..., K], scale float32 [..., 1])``.
    """
    shape = x.shape
    K = shape[-1]
    x2 = x.reshape(-1, K)
    if x2.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        x2 = x2.float()  # torch's reference upcasts the same way (round-to-nearest-even)
    if K > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    s = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M and K:
        single = K <= _SINGLE_BLOCK_MAX_K
        block = triton.next_power_of_2(K) if single else 2048
        _int8_rowwise_quant_kernel[(M,)](
            x2, q, s, K, x2.stride(0), q.stride(0),
            QMAX=float(INT8_MAX), EPS=float(ZERO_ROW_SCALE), MAGIC=_RNE_MAGIC, BLOCK_K=block, SINGLE=single,
        )
    return q.reshape(shape), s.reshape(*shape[:-1], 1)
