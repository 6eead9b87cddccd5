"""oqcore inside ``transformers``: ``from_pretrained(path, quantization_config=OqcoreConfig(...))``.

Importing this module registers ``quant_method: "oqcore"`` with transformers
(``transformers.quantizers.auto.register_quantization_config`` and ``register_quantizer``):
transformers has no plugin discovery for quantization methods, so ``import oqcore.hf`` (or
``from oqcore.hf import OqcoreConfig``) must run before ``from_pretrained``. ``import oqcore``
alone does not import transformers' quantizer machinery.

    from oqcore.hf import OqcoreConfig
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=OqcoreConfig("fp8_per_block"),
                                                 dtype=torch.bfloat16)

The model equals ``oqcore.load(path, "fp8_per_block")`` (state dict bytes and outputs) and carries
``model.oq_state``: :func:`oqcore.report`, :func:`oqcore.reload_weights` and
:func:`oqcore.save_quantized` work on it. See :mod:`oqcore.hf.quantizer` for the hooks used.
"""

from __future__ import annotations

from oqcore.hf.config import QUANT_METHOD, OqcoreConfig
from oqcore.hf.quantizer import OqcoreHfQuantizer


def _register() -> None:
    """Register config and quantizer under ``"oqcore"`` once per process (idempotent: a second
    registration would be a ``ValueError`` in transformers)."""
    from transformers.quantizers import auto

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(OqcoreConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(OqcoreHfQuantizer)


_register()

__all__ = ["OqcoreConfig", "OqcoreHfQuantizer"]
