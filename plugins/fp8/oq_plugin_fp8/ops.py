"""torch.library custom ops that keep the fp8 forwards correct under ``torch.compile``.

Imported only while Dynamo traces a forward (``torch.compiler.is_compiling()``); eager calls never
go through the dispatcher. Each op runs the eager function it wraps, so compiled and eager give the
same bytes; its fake implementation only states output shapes and dtypes. Why each exists
(torch 2.13, CPU, inductor's C++ backend; reproduced with a few-line graph, see
``tests/test_compile_forward.py``):

- ``oq_fp8::linear`` (the fused dequantize-and-GEMV C kernel of :mod:`oq_plugin_fp8.cpu`, called
  through ctypes with ``data_ptr()`` arguments). Traced by Dynamo, the ``data_ptr()`` of a tensor
  made inside the graph (``x.float().contiguous()``) is taken from a graph output that Dynamo then
  frees before the ctypes call runs after the graph break: the kernel reads freed memory and the
  forward returns garbage (batch 1: errors of 1e13). An opaque op hands the kernel live tensors and
  removes the graph breaks.
- ``oq_fp8::quantize_grouped`` / ``oq_fp8::dequantize_grouped`` on shapes with *partial* scale
  groups (128x128 weight blocks or 1x128 activation groups where N or K is not a multiple of 128).
  Inductor's C++ "loop split" (``CppScheduling.try_loop_split``) rewrites a loop ``k < K`` whose
  index holds ``k // 128`` into ``K // 128`` full blocks of 128 and drops the remainder: the last
  ``K % 128`` elements are never written and hold uninitialized memory (NaN or 1e38 in a forward).
  Whole groups are unaffected (the split is exact), so only partial shapes take the opaque op and
  every other shape stays fused by inductor.
"""

from __future__ import annotations

import torch

from oq_plugin_fp8.quant import FP8_DTYPE, Grouping


@torch.library.custom_op("oq_fp8::linear", mutates_args=())
def linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, kind: int, gr: int, gc: int, ld: int) -> torch.Tensor:
    """:func:`oq_plugin_fp8.cpu.fp8_linear` as one op: ``x [M, K]``, ``q [N, K]`` fp8 bytes,
    ``scale`` grid (float32 or e8m0 bytes, ``kind``) -> float32 ``[M, N]``."""
    from oq_plugin_fp8.cpu import fp8_linear_eager

    return fp8_linear_eager(x, q, scale.contiguous(), kind, gr, gc, ld)


@linear.register_fake
def _linear_fake(x, q, scale, kind, gr, gc, ld):
    return x.new_empty((x.shape[0], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("oq_fp8::quantize_grouped", mutates_args=())
def quantize_grouped(w: torch.Tensor, rows: int, cols: int, tensor_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`oq_plugin_fp8.quant.quantize_grouped` (eager) for ``Grouping(rows, cols, tensor_scale)``."""
    from oq_plugin_fp8.quant import quantize_grouped_eager

    q, s = quantize_grouped_eager(w, Grouping(rows, cols, tensor_scale))
    return q.contiguous(), s.contiguous()


@quantize_grouped.register_fake
def _quantize_grouped_fake(w, rows, cols, tensor_scale):
    g = Grouping(rows, cols, tensor_scale)
    r, c = w.shape[-2], w.shape[-1]
    gr, gc = g.extents(r, c)
    grid = (1,) if tensor_scale else (-(-r // gr), -(-c // gc))
    return w.new_empty(w.shape, dtype=FP8_DTYPE), w.new_empty((*w.shape[:-2], *grid), dtype=torch.float32)


@torch.library.custom_op("oq_fp8::dequantize_grouped", mutates_args=())
def dequantize_grouped(
    qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, rows: int, cols: int, tensor_scale: bool
) -> torch.Tensor:
    """:func:`oq_plugin_fp8.quant.dequantize_grouped` (eager) for ``Grouping(rows, cols, tensor_scale)``."""
    from oq_plugin_fp8.quant import dequantize_grouped_eager

    return dequantize_grouped_eager(qdata, scale, dtype, Grouping(rows, cols, tensor_scale)).contiguous()


@dequantize_grouped.register_fake
def _dequantize_grouped_fake(qdata, scale, dtype, rows, cols, tensor_scale):
    return qdata.new_empty(qdata.shape, dtype=dtype)
