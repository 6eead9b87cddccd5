"""Hook implementations of oq-plugin-mxfp8 (entry point ``mxfp8`` in the ``oqcore`` group).

Cheap to import: the core only. The scheme record (:mod:`oq_plugin_mxfp8.scheme`) is imported inside
the hook; Triton kernels and the C library only when they first run.
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
def oq_register_schemes(register):
    """The mxfp8 scheme (:mod:`oq_plugin_mxfp8.scheme`): methods, quantizers and backends derived from it."""
    from oq_plugin_mxfp8.scheme import SCHEME

    register(SCHEME)
