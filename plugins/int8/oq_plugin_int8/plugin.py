"""Hook implementations of oq-plugin-int8 (entry point ``int8`` in the ``oqcore`` group).

Cheap to import: the core only. The scheme record (:mod:`oq_plugin_int8.scheme`) is imported inside
the hook; Triton kernels and the C library only when they first run.
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
def oq_register_schemes(register):
    """The int8 scheme (:mod:`oq_plugin_int8.scheme`): methods, quantizers and backends derived from it."""
    from oq_plugin_int8.scheme import SCHEME

    register(SCHEME)
