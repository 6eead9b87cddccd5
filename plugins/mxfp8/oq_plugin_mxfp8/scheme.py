"""The mxfp8 scheme record: OCP MX v1.0 fp8 (e4m3, one e8m0 exponent per 32 values along K).

One :class:`oqcore.Scheme` states every fact once; the core derives the method classes, the
quantizer candidates and the reference forward backend. What mxfp8 does differently from the
base methods is one shape rule (:func:`check_k`): every reduction dim is a multiple of 32.
"""

from __future__ import annotations

import torch

from oqcore import KeyFormat, OnlineLinearMethodBase, OnlineMoEMethodBase, QuantizerImpl, Scheme, UnsupportedLayerError
from oq_toolkit.quantizers import compiled_quantizer, native_cpu_quantizer, triton_quantizer

from oq_plugin_mxfp8 import keys as k
from oq_plugin_mxfp8.backends import backends
from oq_plugin_mxfp8.compiled import quantize_mxfp8_compiled
from oq_plugin_mxfp8.cpu import quantize_mxfp8_checked
from oq_plugin_mxfp8.quant import MX_BLOCK, Mxfp8Options, dequantize_mxfp8, quantize_mxfp8


def _triton_quantize(x, options=None):
    from oq_plugin_mxfp8.kernels.quant import quantize_mxfp8_triton

    return quantize_mxfp8_triton(x, options)


def block_rule(scheme: str, block: int):
    """The plan-time shape rule of a scheme with blocks of ``block`` values along K (``mxfp8``,
    and the fp4 schemes built on it): a method ``check_layer`` classmethod body ``(cls, name,
    layer)`` requiring every weight's reduction dim (K of a linear; H of gate-up and I of down for
    experts) to be a multiple of ``block``. Raises :class:`oqcore.UnsupportedLayerError` naming the
    layer and the size at fault."""

    def check(cls, name: str, layer: torch.nn.Module) -> None:
        """Every reduction dim a multiple of the block (see :func:`block_rule`)."""
        if cls.kind == "linear":
            n, kk = layer.out_features, layer.in_features
            if kk % block:
                raise UnsupportedLayerError(
                    name,
                    f"{scheme} needs in_features K divisible by {block}; weight [N, K] = [{n}, {kk}] has K={kk}. "
                    "Leave the layer unquantized (ignore) or use another scheme",
                )
            return
        (_, _, h), (_, _, i) = cls.weight_shapes(layer)
        bad = [f"{what}={v}" for what, v in (("H", h), ("I", i)) if v % block]
        if bad:
            raise UnsupportedLayerError(
                name,
                f"{scheme} experts need the hidden size H (K of gate_up_proj) and the intermediate size I "
                f"(K of down_proj) divisible by {block}; the experts have {', '.join(bad)}",
            )

    return check


check_k = block_rule("mxfp8", MX_BLOCK)
"""mxfp8's shape rule: every reduction dim a multiple of 32 (:func:`block_rule`)."""


class Mxfp8Linear(OnlineLinearMethodBase):
    """mxfp8's difference from the base linear method: :func:`check_k`."""

    check_layer = classmethod(check_k)


class Mxfp8MoE(OnlineMoEMethodBase):
    """mxfp8's difference from the base MoE method: :func:`check_k`."""

    check_layer = classmethod(check_k)


# The block rule is the same for static weights and dynamic activations: one set of
# implementations (same bytes as the torch reference, :mod:`oq_plugin_mxfp8.quant`) for both keys.
IMPLEMENTATIONS = (
    QuantizerImpl("torch", quantize_mxfp8, description="OCP MX v1.0 blocks, torchao to_mx's rules, float32"),
    triton_quantizer(_triton_quantize, "oq_plugin_mxfp8.kernels", "one-pass Triton mxfp8 quantizer"),
    native_cpu_quantizer(quantize_mxfp8_checked, "C mxfp8 quantizer (oq_plugin_mxfp8.cpu)"),
    compiled_quantizer(quantize_mxfp8_compiled, "torch.compile of the mxfp8 graph"),
)

# compressed-tensors' MXFP8: float 8-bit groups of 32 along K, e8m0 scales stored as uint8 exponents
_CT = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "group", "group_size": MX_BLOCK, "scale_dtype": "torch.uint8"}

WEIGHT = KeyFormat(k.kMxfp8Static, dequantize_mxfp8, IMPLEMENTATIONS, element="e4m3fn", compressed_tensors={**_CT, "dynamic": False})
"""``weight [N, K]`` float8_e4m3fn + ``weight_scale [N, K/32]`` float8_e8m0fnu."""
DYNAMIC = KeyFormat(k.kMxfp8Dynamic, dequantize_mxfp8, IMPLEMENTATIONS, element="e4m3fn", compressed_tensors={**_CT, "dynamic": True})
"""Activations ``[M, K]`` quantized on every call to the same layout."""

SCHEME = Scheme(
    "mxfp8",
    WEIGHT,
    activations=(None, DYNAMIC),
    default_activation=k.kMxfp8Dynamic,  # W8A8, as vLLM's online mxfp8
    options_model=Mxfp8Options,
    backends=backends,
    methods={"linear": Mxfp8Linear, "moe": Mxfp8MoE},
    compressed_tensors_format={None: "mxfp8-quantized", k.kMxfp8Dynamic: "mxfp8-quantized"},
    description="mxfp8 weights (OCP MX v1.0), mxfp8 activations by default",
)
