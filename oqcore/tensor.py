"""Tensor-level API: quantize one tensor with the plugin that owns its key.

The core holds no quantization math: :func:`quantize_tensor` looks up the key's
:class:`oqcore.formats.KeyFormat`, lets the oracle choose a quantizer implementation
(:func:`oqcore.oracle.select_quantizer`) and holds it to the contract
(:func:`oqcore.formats.run_quantizer`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from oqcore.errors import ConfigError, from_validation_error
from oqcore.formats import (
    HP_DTYPES,
    REFERENCE,
    KeyFormat,
    QuantizedTensor,
    check_finite,
    check_quantizable,
    dtype_names,
    require_finite,
    run_quantizer,
)
from oqcore.keys import QuantKey, Role
from oqcore.oracle import select_quantizer
from oqcore.plugins import Registry, get_registry

__all__ = [
    "HP_DTYPES",
    "REFERENCE_BACKEND",
    "QuantizedTensor",
    "check_finite",
    "check_quantizable",
    "dtype_names",
    "key_format",
    "options_model_for",
    "quantize_tensor",
    "require_finite",
]

REFERENCE_BACKEND = REFERENCE
"""The reference implementation's name (kept under its v1 name)."""


def key_format(key: QuantKey, reg: Registry | None = None) -> KeyFormat:
    """The :class:`oqcore.formats.KeyFormat` of ``key``. Raises :class:`oqcore.ConfigError` (field
    ``key``) when no plugin registered a quantizer for it."""
    reg = reg or get_registry()
    fmt = reg.format(key)
    if fmt is None:
        raise ConfigError(f"no plugin registered a quantizer for {reg.key_name(key)!r}", "key")
    return fmt


def options_model_for(key: QuantKey, reg: Registry | None = None) -> type[BaseModel] | None:
    """The options model of a method whose weight key is ``key`` (any kind), else of a method whose
    activation keys include ``key``, or ``None``."""
    reg = reg or get_registry()
    for (_, k), entry in reg.methods.items():
        if k == key:
            return entry.cls.options_model
    for entry in reg.methods.values():
        if key in entry.cls.supported_activation_keys:
            return entry.cls.options_model
    return None


def quantize_tensor(
    w: torch.Tensor,
    key: QuantKey | str,
    quantizer: str | None = None,
    options: Mapping[str, Any] | BaseModel | None = None,
    *,
    role: Role = "weight",
    name: str = "<tensor>",
    backend: str | None = None,
) -> QuantizedTensor:
    """Quantize ``w`` (``[N, K]``, ``[E, N, K]`` or, for activations, ``[M, K]``) to ``key``.

    ``w``: float32, bfloat16, float16 or float64, at least one element. ``key`` is a
    :class:`QuantKey` or a name resolved in ``role`` (``"weight"`` or ``"activation"``).
    ``quantizer`` names a quantizer implementation (``backend=`` is its v1 name); the default is
    the oracle's choice for ``w``'s device, shape and dtype, the same choice a load makes
    (:func:`oqcore.oracle.select_quantizer`; ``OQ_QUANTIZER`` pins one); ``"torch"`` asks for the
    reference itself. Every implementation produces the same bytes. ``options`` is a dict validated
    by the options model of the method that owns the key (e.g. ``{"scale_mode": "floor"}``).
    ``name`` labels errors. Returns a :class:`QuantizedTensor` (it unpacks to ``qdata, scale, ...``).

    A meta tensor gives a dry run: meta tensors of the right shapes and dtypes, from the reference
    (no values are checked).

    Raises

    - :class:`oqcore.UnsupportedLayerError` naming ``name``: ``w`` is not a tensor, not 2-D/3-D,
      empty, of another dtype, holds NaN/Inf, or the plugin's quantizer refused it with a
      ``ValueError`` (e.g. mxfp8 with K not a multiple of 32: the message carries the plugin's rule);
    - :class:`oqcore.ConfigError` (field ``key``, ``quantizer``, ``options`` or ``role``): an
      unknown key (:class:`oqcore.UnknownKeyError`, with a did-you-mean), an implementation the key
      does not have (the message lists those that exist), bad options;
    - :class:`oqcore.NoBackendError`: the pinned implementation cannot run on ``w``;
    - :class:`oqcore.PluginError` naming the plugin, the key, the implementation and ``name``: any
      other exception inside the plugin's quantizer, or a result that breaks the contract (chained).
    """
    if not isinstance(name, str):
        name = str(name)
    if role not in ("weight", "activation"):
        raise ConfigError(f"must be 'weight' or 'activation', got {role!r}", "role")
    if not isinstance(key, (str, QuantKey)):
        raise ConfigError(f"expected a quantization key name or a QuantKey, got {type(key).__name__}", "key")
    if quantizer is not None and backend is not None and quantizer != backend:
        raise ConfigError(f"give quantizer= or its v1 name backend=, not both ({quantizer!r}, {backend!r})", "quantizer")
    arg = "quantizer" if backend is None else "backend"  # errors name the argument the caller used
    quantizer = quantizer if quantizer is not None else backend
    if quantizer is not None and not isinstance(quantizer, str):
        raise ConfigError(f"expected a quantizer implementation name (str), got {type(quantizer).__name__}", arg)
    reg = get_registry()
    k = reg.resolve_key(key, role, "key")
    check_quantizable(w, name)
    fmt = key_format(k, reg)
    key_name = reg.key_name(k)
    if quantizer is None:
        impl = select_quantizer(fmt.implementations, w.device, [tuple(w.shape)], w.dtype, what=name).impl
    else:
        impl = fmt.implementation(quantizer)
        if impl is None:
            have = ", ".join(i.name for i in fmt.implementations)
            raise ConfigError(
                f"key {key_name!r} has no quantizer implementation {quantizer!r}; implementations: {have}", arg
            )
        if w.is_meta and impl.name != REFERENCE:
            raise ConfigError(
                f"{quantizer!r} cannot run on a meta tensor ({name!r}); a meta dry run uses the {REFERENCE!r} "
                f"reference (leave {arg} unset)",
                arg,
            )
    opts = _validate_options(k, options, reg)
    return run_quantizer(fmt, impl, w, opts, name, key_name)


def _validate_options(k: QuantKey, options: Any, reg: Registry) -> BaseModel | None:
    model = options_model_for(k, reg)
    if isinstance(options, BaseModel):
        if model is not None and not isinstance(options, model):
            raise ConfigError(f"expected {model.__name__} (or a dict), got {type(options).__name__}", "options")
        return options
    if options is not None and not isinstance(options, Mapping):
        raise ConfigError(f"expected a mapping of option names to values, got {type(options).__name__}", "options")
    if model is None:
        return None
    try:
        return model.model_validate(dict(options or {}))
    except ValidationError as e:
        raise from_validation_error(e, "options") from None
