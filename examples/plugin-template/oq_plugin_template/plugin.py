"""Hook implementations (the module the ``oqcore`` entry point names). Cheap to import: the scheme
module is imported inside the hooks."""

from oqcore import hookimpl


@hookimpl
def oq_register_quant_keys(register):
    """The key name users write: ``linear: int4_g32``."""
    from oq_plugin_template.scheme import kInt4G32

    register("int4_g32", weight=kInt4G32, description="int4 weight-only, symmetric, 1x32 groups")


@hookimpl
def oq_register_schemes(register):
    """The whole scheme, one record (the core derives the method, the quantizer candidates and the
    reference forward backend from it)."""
    from oq_plugin_template.scheme import SCHEME

    register(SCHEME)
