"""Hook implementations of oq-plugin-fp8 (entry point ``fp8`` in the ``oqcore`` group)."""

from oqcore import hookimpl
from oq_plugin_fp8 import keys as k


@hookimpl
def oq_register_quant_keys(register):
    """Static keys are valid as weights and (calibrated) activations; dynamic ones only as activations."""
    register("fp8_per_tensor_static", k.kFp8StaticTensorSym, description="fp8, one float32 scale per tensor")
    register("fp8_per_tensor_dynamic", activation=k.kFp8DynamicTensorSym, description="fp8, one scale per tensor per call")
    register("fp8_per_token", activation=k.kFp8DynamicTokenSym, description="fp8, one scale per token per call")
    register("fp8_per_channel_static", k.kFp8StaticChannelSym, description="fp8, one scale per output channel")
    register("fp8_per_block_static", k.kFp8Static128BlockSym, description="fp8, one scale per 128x128 weight block")
    register(
        "fp8_per_block_dynamic", activation=k.kFp8Dynamic128Sym, description="fp8, one scale per 1x128 activation group"
    )


@hookimpl
def oq_register_shorthands(register):
    """vLLM's online shorthands: the weight key for both kinds, activation left to the method."""
    for name, weight in (
        ("fp8_per_tensor", "fp8_per_tensor_static"),
        ("fp8_per_channel", "fp8_per_channel_static"),
        ("fp8_per_block", "fp8_per_block_static"),
    ):
        register(name, linear={"weight": weight}, moe={"weight": weight}, description=f"{weight} for linear and moe")


@hookimpl
def oq_register_methods(register):
    """One linear and one MoE method per fp8 weight key (per tensor, per channel, 128x128 blocks)."""
    from oq_plugin_fp8.linear import LINEAR_METHODS
    from oq_plugin_fp8.moe import MOE_METHODS

    for cls in LINEAR_METHODS:
        register("linear", cls.weight_key, cls)
    for cls in MOE_METHODS:
        register("moe", cls.weight_key, cls)


@hookimpl
def oq_register_quantizers(register):
    """The torch references (the definition of the numbers) for all six keys, and the Triton,
    compiled (torch.compile, CPU) and cpu (C kernel) quantizers (same bytes) for the same keys. Kernels are compiled
    only when first called."""
    from oq_plugin_fp8.quant import GROUPINGS, TORCH_QUANTIZERS

    for name, (quantize, dequantize) in TORCH_QUANTIZERS.items():
        register(name, "torch", quantize, dequantize)
    for name, grouping in GROUPINGS.items():
        quantize, dequantize = _lazy_triton_pair(grouping)
        register(name, "triton", quantize, dequantize)
    # CPU fused quantizers (torch.compile); oq_plugin_fp8.compiled imports no compiler machinery
    # at import time and compiles on the first call per shape
    from oq_plugin_fp8.compiled import compiled_quantizers

    for name, (quantize, dequantize) in compiled_quantizers().items():
        register(name, "compiled", quantize, dequantize)
    # C quantizers (oq_plugin_fp8.cpu's kernel library, built once per machine and cached; the
    # torch reference without a compiler or with OQ_COMPILE=0): same bytes, built on first call
    from oq_plugin_fp8.cpu import fp8_cpu_quantizers

    for name, (quantize, dequantize) in fp8_cpu_quantizers().items():
        # finds NaN/Inf in its own amax pass; quantizes a whole expert stack in one call
        register(name, "cpu", quantize, dequantize, checks_finite=True, whole_stack=True)


def _lazy_triton_pair(grouping):
    # the kernels module imports triton: defer it to the first call
    def quantize(w, options=None):
        """Triton quantizer for the grouping (imports triton on first call)."""
        from oq_plugin_fp8.kernels.quantize import quantize_grouped

        return quantize_grouped(w, grouping)

    def dequantize(qdata, scale, dtype, options=None):
        """The reference dequantizer for the grouping."""
        from oq_plugin_fp8.quant import dequantize_grouped

        return dequantize_grouped(qdata, scale, dtype, grouping)

    quantize.__doc__ = f"Triton fp8 quantizer ({grouping}); bytes equal the torch reference."
    dequantize.__doc__ = "``qdata.float() * scale`` broadcast over the groups, cast to ``dtype``."
    return quantize, dequantize


@hookimpl
def oq_backend_candidates(kind, weight_key):
    """``torch`` (reference) and ``triton`` backends for each supported activation key."""
    from oq_plugin_fp8.backends import candidates

    return candidates(kind, weight_key)
