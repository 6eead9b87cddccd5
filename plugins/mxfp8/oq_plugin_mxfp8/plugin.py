"""Hook implementations of oq-plugin-mxfp8 (entry point ``mxfp8`` in the ``oqcore`` group).

Cheap to import: the core only. Method classes, quantizers and backends are imported inside the
hooks; Triton kernels only when a Triton quantizer or forward first runs.
"""

from oqcore import hookimpl
from oq_plugin_mxfp8 import keys as k


@hookimpl
def oq_register_quant_keys(register):
    """``mxfp8``: static 1x32 e8m0 blocks as a weight, dynamic as an activation."""
    register("mxfp8", weight=k.kMxfp8Static, activation=k.kMxfp8Dynamic, description="OCP MX v1.0 fp8, 1x32 e8m0 blocks")


@hookimpl
def oq_register_shorthands(register):
    """``mxfp8`` for linear and moe, activation left to the method (mxfp8 by default)."""
    register("mxfp8", linear={"weight": "mxfp8"}, moe={"weight": "mxfp8"}, description="mxfp8 for linear and moe")


@hookimpl
def oq_register_methods(register):
    """:class:`Mxfp8LinearMethod` and :class:`Mxfp8MoEMethod` for the ``mxfp8`` weight key."""
    from oq_plugin_mxfp8.linear import Mxfp8LinearMethod
    from oq_plugin_mxfp8.moe import Mxfp8MoEMethod

    register("linear", k.kMxfp8Static, Mxfp8LinearMethod)
    register("moe", k.kMxfp8Static, Mxfp8MoEMethod)


def _triton_quantize(x, options):
    from oq_plugin_mxfp8.kernels.quant import quantize_mxfp8_triton

    return quantize_mxfp8_triton(x, options)


@hookimpl
def oq_register_quantizers(register):
    """The torch reference (:mod:`oq_plugin_mxfp8.quant`) and the one-pass Triton quantizer (same
    bytes) for both keys: the block rule is the same for static weights and dynamic activations.
    Also the compiled (torch.compile, CPU) quantizer, same bytes, compiled on its first call, and
    the cpu one (C kernel shared with oq-plugin-fp8), same bytes."""
    from oq_plugin_mxfp8.cpu import quantize_mxfp8_checked
    from oq_plugin_mxfp8.compiled import quantize_mxfp8_compiled
    from oq_plugin_mxfp8.quant import dequantize_mxfp8, quantize_mxfp8

    for key in (k.kMxfp8Static, k.kMxfp8Dynamic):
        register(key, "torch", quantize_mxfp8, dequantize_mxfp8)
        register(key, "triton", _triton_quantize, dequantize_mxfp8)
        register(key, "compiled", quantize_mxfp8_compiled, dequantize_mxfp8)
        # C kernel of oq_plugin_fp8.cpu (built on first call; the reference without a compiler)
        register(key, "cpu", quantize_mxfp8_checked, dequantize_mxfp8, checks_finite=True, whole_stack=True)


@hookimpl
def oq_backend_candidates(kind, weight_key):
    """torch (priority 0) and triton (100), each for activation none and mxfp8."""
    if weight_key != k.kMxfp8Static:
        return []
    from oq_plugin_mxfp8.backends import candidates

    return candidates(kind)
