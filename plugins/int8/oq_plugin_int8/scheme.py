"""The int8 scheme record: int8 per-channel weights, weight-only by default or W8A8 per-token.

One :class:`oqcore.Scheme` states every fact of the scheme once; the core derives the method
classes, the quantizer candidates and the reference forward backend from it.
"""

from __future__ import annotations

from oqcore import KeyFormat, QuantizerImpl, Scheme
from oq_toolkit.quantizers import compiled_quantizer, native_cpu_quantizer, triton_quantizer

from oq_plugin_int8 import keys as k
from oq_plugin_int8.backends import backends
from oq_plugin_int8.compiled import quantize_int8_rowwise_compiled
from oq_plugin_int8.cpu import quantize_int8_rowwise_checked
from oq_plugin_int8.quant import dequantize_int8, quantize_int8_rowwise


def _triton_quantize(x, options=None):
    from oq_plugin_int8.kernels.quant import quantize_int8_rowwise_triton

    return quantize_int8_rowwise_triton(x, options)


# The row-wise rule is the same for per-channel weights and per-token activations: one set of
# implementations (same bytes as the torch reference, :mod:`oq_plugin_int8.quant`) for both keys.
# The reference and the C kernel take an externally reduced row amax (takes_amax: tensor parallelism).
IMPLEMENTATIONS = (
    QuantizerImpl(
        "torch", quantize_int8_rowwise, takes_amax=True, description="vLLM's symmetric +-127 row-wise rule in float32"
    ),
    triton_quantizer(_triton_quantize, "oq_plugin_int8.kernels", "one-pass Triton row-wise quantizer"),
    native_cpu_quantizer(quantize_int8_rowwise_checked, "C row-wise quantizer (oq_plugin_int8.cpu)", takes_amax=True),
    compiled_quantizer(quantize_int8_rowwise_compiled, "torch.compile of the row-wise graph"),
)

_CT = {"num_bits": 8, "type": "int", "symmetric": True}  # compressed-tensors QuantizationArgs fields

WEIGHT = KeyFormat(
    k.kInt8StaticChannelSym, dequantize_int8, IMPLEMENTATIONS, element="int8",
    compressed_tensors={**_CT, "strategy": "channel", "dynamic": False},
)
"""``weight [N, K]`` int8 + ``weight_scale [N, 1]`` float32 (``[E, N, 1]`` per expert stack)."""
PER_TOKEN = KeyFormat(
    k.kInt8DynamicTokenSym, dequantize_int8, IMPLEMENTATIONS, element="int8",
    compressed_tensors={**_CT, "strategy": "token", "dynamic": True},
)
"""Dynamic activations ``[M, K]`` -> int8 + ``[M, 1]`` float32 scales, on every call."""

SCHEME = Scheme(
    "int8",
    WEIGHT,
    activations=(None, PER_TOKEN),
    default_activation=None,  # weight-only, as vLLM's online int8
    backends=backends,
    # weight-only: int8 packed four per int32 (W8A16); with int8 activations: int8 as stored (W8A8)
    compressed_tensors_format={None: "pack-quantized", k.kInt8DynamicTokenSym: "int-quantized"},
    description="int8 per-channel weights (W8A16 by default, W8A8 with int8_per_token)",
)
