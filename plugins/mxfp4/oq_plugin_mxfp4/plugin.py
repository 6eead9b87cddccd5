"""Hook implementations of oq-plugin-mxfp4 (entry point ``mxfp4`` in the ``oqcore`` group).

Cheap to import: the core and the keys only. The scheme record (:mod:`oq_plugin_mxfp4.scheme`) is
imported inside the hook; Triton kernels and the C libraries only when they first run.
"""

from oqcore import hookimpl
from oq_plugin_mxfp4 import keys as k


@hookimpl
def oq_register_quant_keys(register):
    """``mxfp4``: static 1x32 e8m0 blocks of e2m1 as a weight, dynamic as an activation."""
    register(
        "mxfp4",
        weight=k.kMxfp4Static,
        activation=k.kMxfp4Dynamic,
        description="OCP MX v1.0 fp4 (e2m1), 1x32 e8m0 blocks",
    )


@hookimpl
def oq_register_shorthands(register):
    """``mxfp4`` for linear and moe, activation left to the method (none: W4A16)."""
    register(
        "mxfp4", linear={"weight": "mxfp4"}, moe={"weight": "mxfp4"}, description="mxfp4 for linear and moe (W4A16)"
    )


@hookimpl
def oq_register_schemes(register):
    """The mxfp4 scheme (:mod:`oq_plugin_mxfp4.scheme`)."""
    from oq_plugin_mxfp4.scheme import SCHEME

    register(SCHEME)
