"""The mxfp4 scheme record: OCP MX v1.0 FP4 (e2m1 elements two per byte, one e8m0 exponent per 32
values along K).

Activations: none (W4A16, the default, as vLLM's online MXFP4 MoE), ``mxfp8`` (W4A8: the mxfp8
plugin's dynamic key and format, used as that plugin declares it; vLLM's ``moe.activation=mxfp8``
override of its MXFP4 MoE backends) or ``mxfp4`` (W4A4, dynamic 1x32 blocks). Shape rule: every
reduction dim a multiple of 32 (oq-plugin-mxfp8's :func:`~oq_plugin_mxfp8.scheme.block_rule`).
"""

from __future__ import annotations

from oqcore import KeyFormat, OnlineLinearMethodBase, OnlineMoEMethodBase, QuantizerImpl, Scheme
from oq_toolkit.quantizers import compiled_quantizer, native_cpu_quantizer, triton_quantizer

from oq_plugin_mxfp8.scheme import DYNAMIC as MXFP8_DYNAMIC
from oq_plugin_mxfp8.scheme import block_rule

from oq_plugin_mxfp4 import keys as k
from oq_plugin_mxfp4.backends import backends
from oq_plugin_mxfp4.compiled import quantize_mxfp4_compiled
from oq_plugin_mxfp4.cpu import quantize_mxfp4_checked
from oq_plugin_mxfp4.quant import Mxfp4Options, dequantize_mxfp4, quantize_mxfp4

check_k = block_rule("mxfp4", k.MX_BLOCK)


def _triton_quantize(x, options=None):
    from oq_plugin_mxfp4.kernels.quant import quantize_mxfp4_triton

    return quantize_mxfp4_triton(x, options)


class Mxfp4Linear(OnlineLinearMethodBase):
    """mxfp4's difference from the base linear method: K a multiple of 32."""

    check_layer = classmethod(check_k)


class Mxfp4MoE(OnlineMoEMethodBase):
    """mxfp4's difference from the base MoE method: H and I multiples of 32."""

    check_layer = classmethod(check_k)


# One block rule for static weights and dynamic activations: one set of implementations.
IMPLEMENTATIONS = (
    QuantizerImpl("torch", quantize_mxfp4, description="OCP MX v1.0 fp4 blocks, torchao to_mx's rules, float32"),
    triton_quantizer(_triton_quantize, "oq_plugin_mxfp4.kernels", "one-pass Triton mxfp4 quantizer"),
    native_cpu_quantizer(quantize_mxfp4_checked, "C mxfp4 quantizer (oq_plugin_mxfp4.cpu)"),
    compiled_quantizer(quantize_mxfp4_compiled, "torch.compile of the mxfp4 graph"),
)

# compressed-tensors' MXFP4 preset: float 4-bit groups of 32 along K, e8m0 scales as uint8 exponents
_CT = {
    "num_bits": 4,
    "type": "float",
    "symmetric": True,
    "strategy": "group",
    "group_size": k.MX_BLOCK,
    "scale_dtype": "torch.uint8",
}

WEIGHT = KeyFormat(
    k.kMxfp4Static,
    dequantize_mxfp4,
    IMPLEMENTATIONS,
    values_per_element=2,
    element="e2m1",
    compressed_tensors={**_CT, "dynamic": False},
)
"""``weight [N, K/2]`` uint8 (two e2m1 codes per byte, the even element in the low nibble) +
``weight_scale [N, K/32]`` float8_e8m0fnu."""
DYNAMIC = KeyFormat(
    k.kMxfp4Dynamic,
    dequantize_mxfp4,
    IMPLEMENTATIONS,
    values_per_element=2,
    element="e2m1",
    compressed_tensors={**_CT, "dynamic": True},
)
"""Activations ``[M, K]`` quantized on every call to the same layout (W4A4)."""

SCHEME = Scheme(
    "mxfp4",
    WEIGHT,
    activations=(None, MXFP8_DYNAMIC, DYNAMIC),
    default_activation=None,
    options_model=Mxfp4Options,
    backends=backends,
    methods={"linear": Mxfp4Linear, "moe": Mxfp4MoE},
    # compressed-tensors' mxfp4-pack-quantized holds the weights whatever the activations
    compressed_tensors_format={a: "mxfp4-pack-quantized" for a in (None, MXFP8_DYNAMIC.key, k.kMxfp4Dynamic)},
    description="mxfp4 weights (OCP MX v1.0 e2m1), weight-only by default; mxfp8 (W4A8) or mxfp4 activations",
)
