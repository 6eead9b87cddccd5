"""Hook implementations of oq-plugin-nvfp4 (entry point ``nvfp4`` in the ``oqcore`` group).

Cheap to import: the core and the keys only. The scheme record (:mod:`oq_plugin_nvfp4.scheme`) is
imported inside the hook; Triton kernels and the C libraries only when they first run.
"""

from oqcore import hookimpl
from oq_plugin_nvfp4 import keys as k


@hookimpl
def oq_register_quant_keys(register):
    """``nvfp4``: e2m1 with static 1x16 e4m3 scales and a global scale as a weight, dynamic as an activation."""
    register(
        "nvfp4",
        weight=k.kNvfp4Static,
        activation=k.kNvfp4Dynamic,
        description="NVFP4: e2m1, 1x16 float8_e4m3fn scales, float32 global scale",
    )


@hookimpl
def oq_register_shorthands(register):
    """``nvfp4`` for linear and moe, activation left to the method (none: W4A16)."""
    register(
        "nvfp4", linear={"weight": "nvfp4"}, moe={"weight": "nvfp4"}, description="nvfp4 for linear and moe (W4A16)"
    )


@hookimpl
def oq_register_schemes(register):
    """The nvfp4 scheme (:mod:`oq_plugin_nvfp4.scheme`)."""
    from oq_plugin_nvfp4.scheme import SCHEME

    register(SCHEME)
