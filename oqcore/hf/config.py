"""``OqcoreConfig``: the ``quantization_config`` that makes ``transformers`` ``from_pretrained``
quantize a model online with oqcore (``quant_method: "oqcore"``)."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from oqcore.config import QuantizationConfig
from oqcore.errors import ConfigError

QUANT_METHOD = "oqcore"
"""The ``quant_method`` transformers dispatches on (registered by :mod:`oqcore.hf`)."""


class OqcoreConfig(QuantizationConfigMixin):
    """The oqcore scheme to quantize with, as a transformers ``quantization_config``.

    ``config`` is anything :meth:`oqcore.QuantizationConfig.from_any` takes: a shorthand name
    (``"fp8_per_block"``), a weight key name (``"mxfp8"``), a dict in vLLM's
    ``quantization_config`` shape, a :class:`oqcore.QuantizationConfig`, or a YAML/JSON path;
    ``None`` means ``overrides`` alone. ``overrides`` are ``dotted.key=value`` strings applied on
    top, in order (``["moe.activation=null"]``). The config is resolved and validated here, once:
    ``OqcoreConfig(...)`` raises :class:`oqcore.ConfigError` naming the field (or the file, the
    override) at fault, so a bad config never reaches ``from_pretrained``.

    ``oq_config`` is the resolved :class:`oqcore.QuantizationConfig`. :meth:`to_dict` gives
    ``{"quant_method": "oqcore", "config": <QuantizationConfig.to_dict() + scheme>}`` (what transformers
    writes into ``model.config.quantization_config``); ``OqcoreConfig.from_dict`` of it gives an
    equal config.
    """

    def __init__(
        self,
        config: QuantizationConfig | Mapping[str, Any] | str | os.PathLike | None = None,
        overrides: Iterable[str] = (),
        **kwargs: Any,
    ):
        method = kwargs.pop("quant_method", QUANT_METHOD)
        if getattr(method, "value", method) != QUANT_METHOD:
            raise ConfigError(f"quant_method is {method!r}; an OqcoreConfig is always {QUANT_METHOD!r}", "quant_method")
        if kwargs:
            raise ConfigError(
                f"unknown argument(s) {', '.join(sorted(map(repr, kwargs)))}; OqcoreConfig takes config and overrides "
                "(put scheme fields inside config or overrides)",
                next(iter(sorted(kwargs))),
            )
        if config is not None and not isinstance(config, (QuantizationConfig, Mapping, str, os.PathLike)):
            raise ConfigError(
                f"expected a shorthand or weight key name, a dict, a QuantizationConfig or a YAML path, got "
                f"{type(config).__name__}",
                "config",
            )
        self.quant_method = QUANT_METHOD
        self.oq_config: QuantizationConfig = QuantizationConfig.from_any(config, overrides)

    def to_dict(self) -> dict[str, Any]:
        """``{"quant_method": "oqcore", "config": {...}}`` (plain JSON-able values; ``config`` keeps
        the shorthand the config came from as ``scheme``, so :meth:`from_dict` rebuilds an equal
        :class:`oqcore.QuantizationConfig`).

        Except inside ``save_pretrained`` of the model this config quantized: there (and only
        there: the call stack holds that model's ``PreTrainedModel.save_pretrained`` frame) it
        returns the compressed-tensors ``quantization_config`` of the folder being written, so
        ``config.json`` declares what the folder holds and loads without oqcore. Nothing is changed
        on the config for this: after ``save_pretrained`` it gives the oqcore dict again."""
        saving = self._saving()
        if saving is not None:
            return copy.deepcopy(saving)
        data = self.oq_config.to_dict()
        if self.oq_config.scheme is not None:
            data = {"scheme": self.oq_config.scheme, **data}
        return {"quant_method": QUANT_METHOD, "config": data}

    def _saving(self) -> dict[str, Any] | None:
        """The compressed-tensors config of the folder that the ``save_pretrained`` on the call
        stack writes, if that model's ``config.quantization_config`` is this config."""
        from oqcore.hf.frames import save_pretrained_locals

        call = save_pretrained_locals(lambda m: getattr(getattr(m, "config", None), "quantization_config", None) is self)
        return None if call is None else getattr(getattr(call["self"], "hf_quantizer", None), "saved_config", None)

    def to_diff_dict(self) -> dict[str, Any]:
        """What transformers writes to ``config.json`` (``use_diff=True``): the whole
        :meth:`to_dict`, since every field of it is needed to rebuild the config."""
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OqcoreConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # mutable, like every transformers quantization config
