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
