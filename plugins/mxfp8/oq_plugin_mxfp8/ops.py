"""torch.library custom op that keeps the mxfp8 reference forward compilable by ``torch.compile``.

``oq_mxfp8::e8m0_to_float32``: the float32 multipliers of e8m0 scale bytes
(:func:`oq_plugin_mxfp8.quant.exponent_to_scale`). A ``float8_e8m0fnu`` tensor that enters an
inductor graph (a layer's ``weight_scale``) cannot be read by inductor's C++ backend on torch 2.13:
even ``scale.view(torch.uint8)`` compiles to a kernel taking an e8m0 pointer, and code generation
fails with ``KeyError: torch.float8_e8m0fnu`` (the dtype has no C++ type there). Handed to an opaque
op, the ``uint8`` view of the scale is a reinterpretation of the buffer (no kernel reads e8m0), for
a weight's scale as for the activation scale a fake-quantization produces inside the graph; the op's
output is float32 (1/32 of the weight's elements) and the rest of the dequantization stays fused.
Exact: the same integer bit operations as eager. Imported only while Dynamo traces
(``torch.compiler.is_compiling()``).
"""

from __future__ import annotations

import torch


@torch.library.custom_op("oq_mxfp8::e8m0_to_float32", mutates_args=())
def e8m0_to_float32(bits: torch.Tensor) -> torch.Tensor:
    """``2**(byte - 127)`` as float32 for the uint8 view ``bits`` of e8m0 scales; byte 0 -> ``2**-126``, 255 -> NaN."""
    from oq_plugin_mxfp8.quant import exponent_to_scale

    return exponent_to_scale(bits)


@e8m0_to_float32.register_fake
def _e8m0_to_float32_fake(scale):
    return scale.new_empty(scale.shape, dtype=torch.float32)
