"""Hook implementations of oq-plugin-fp8 (entry point ``fp8`` in the ``oqcore`` group)."""

from oqcore import hookimpl
from oq_plugin_fp8 import keys as k


@hookimpl
def oq_register_quant_keys(register):
    """The six fp8 keys of :data:`oq_plugin_fp8.keys.KEYS`: static ones as weights and (calibrated)
    activations, dynamic ones as activations only."""
    for name, (key, weight, description) in k.KEYS.items():
        if weight:
            register(name, key, description=description)
        else:
            register(name, activation=key, description=description)


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
def oq_register_schemes(register):
    """One scheme per fp8 weight key (:mod:`oq_plugin_fp8.scheme`); methods, quantizers and backends
    are derived from the records."""
    from oq_plugin_fp8.scheme import SCHEMES

    for scheme in SCHEMES:
        register(scheme)
