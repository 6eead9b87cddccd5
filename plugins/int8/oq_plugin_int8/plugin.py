"""Hook implementations of oq-plugin-int8 (entry point ``int8`` in the ``oqcore`` group).

Cheap to import: torch and the core only; Triton kernels are imported by the backends' functions
when they first run.
"""

from oqcore import hookimpl
from oq_plugin_int8 import keys as k


@hookimpl
def oq_register_quant_keys(register):
    """``int8_per_channel_static`` (weights) and ``int8_per_token`` (dynamic activations)."""
    register("int8_per_channel_static", k.kInt8StaticChannelSym, description="int8, one scale per output channel")
    register("int8_per_token", activation=k.kInt8DynamicTokenSym, description="int8, one scale per token per call")


@hookimpl
def oq_register_shorthands(register):
    """``int8_per_channel_weight_only``: MoE experts only, truly weight-only (activation None)."""
    register(
        "int8_per_channel_weight_only",
        moe={"weight": "int8_per_channel_static", "activation": None},
        description="int8 per-channel weight-only MoE experts; linears stay unquantized",
    )


@hookimpl
def oq_register_methods(register):
    """:class:`Int8LinearMethod` and :class:`Int8MoEMethod` for ``int8_per_channel_static`` weights."""
    from oq_plugin_int8.linear import Int8LinearMethod
    from oq_plugin_int8.moe import Int8MoEMethod

    register("linear", k.kInt8StaticChannelSym, Int8LinearMethod)
    register("moe", k.kInt8StaticChannelSym, Int8MoEMethod)


def _triton_quantize(x, options):
    from oq_plugin_int8.kernels.quant import quantize_int8_rowwise_triton

    return quantize_int8_rowwise_triton(x, options)


@hookimpl
def oq_register_quantizers(register):
    """The torch reference (:mod:`oq_plugin_int8.quant`), the Triton quantizer, the compiled
    (torch.compile, CPU) quantizer and the C quantizer (``"cpu"``, :mod:`oq_plugin_int8.cpu`),
    all with the same bytes, for both keys: the row-wise rule is the same for per-channel weights
    and per-token activations. Nothing compiles before the first call."""
    from oq_plugin_int8.compiled import quantize_int8_rowwise_compiled
    from oq_plugin_int8.cpu import quantize_int8_rowwise_checked
    from oq_plugin_int8.quant import dequantize_int8, quantize_int8_rowwise

    for key in (k.kInt8StaticChannelSym, k.kInt8DynamicTokenSym):
        register(key, "torch", quantize_int8_rowwise, dequantize_int8)
        register(key, "triton", _triton_quantize, dequantize_int8)
        register(key, "compiled", quantize_int8_rowwise_compiled, dequantize_int8)
        # finds NaN/Inf in its own amax pass; quantizes a whole expert stack in one call
        register(key, "cpu", quantize_int8_rowwise_checked, dequantize_int8, checks_finite=True, whole_stack=True)


@hookimpl
def oq_backend_candidates(kind, weight_key):
    """torch (0), cpu-int8 (50, weight-only) and triton (100) for int8 per-channel weights."""
    if weight_key != k.kInt8StaticChannelSym:
        return []
    from oq_plugin_int8.backends import candidates

    return candidates(kind)
