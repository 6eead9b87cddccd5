"""Hook implementations (the module the ``oqcore`` entry point names)."""

from oqcore import hookimpl


@hookimpl
def oq_register_quant_keys(register):
    """The key name users write: ``linear: int4_g32``."""
    from oq_plugin_template.scheme import kInt4G32

    register("int4_g32", weight=kInt4G32, description="int4 weight-only, symmetric, 1x32 groups")


@hookimpl
def oq_register_methods(register):
    """One linear method for the key."""
    from oq_plugin_template.scheme import Int4G32LinearMethod, kInt4G32

    register("linear", kInt4G32, Int4G32LinearMethod)


@hookimpl
def oq_register_quantizers(register):
    """The torch reference quantizer (the definition of the numbers)."""
    from oq_plugin_template.scheme import dequantize, kInt4G32, quantize

    register(kInt4G32, "torch", quantize, dequantize)


@hookimpl
def oq_backend_candidates(kind, weight_key):
    """The reference backend for linear layers of this key."""
    from oq_plugin_template.scheme import TORCH_BACKEND, kInt4G32

    return [TORCH_BACKEND] if (kind, weight_key) == ("linear", kInt4G32) else []
