"""The Scheme record: everything one weight key's scheme is, stated once (plugin contract v2).

A plugin registers one :class:`Scheme` per weight key from its ``oq_register_schemes`` hook. The
record says which layer kinds it serves, its activation keys and the default, its options model,
each key's :class:`oqcore.formats.KeyFormat` (tensor names, packing, reference dequantizer,
quantizer implementations) and its forward backends. The core derives the rest: the method class
per kind (:func:`method_class`), the quantizers the oracle chooses from, the reference ``torch``
forward backend for every activation key, and what save / load / reload expect to find. Method
classes stay only for what a scheme does differently (a shape check, another forward).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from oqcore.errors import PluginError
from oqcore.formats import REFERENCE, KeyFormat, QuantizerImpl
from oqcore.keys import QuantKey
from oqcore.methods import METHOD_BASES, NoOptions, OnlineMethodBase
from oqcore.oracle import Backend

BackendsFn = Callable[[str, "QuantKey | None"], Sequence[Backend]]


@dataclass(frozen=True)
class Scheme:
    """One weight key's scheme.

    - ``name``: the scheme's name (letters, digits, ``_``); the derived method classes are named
      after it (``fp8_per_block`` -> ``Fp8PerBlockLinearMethod`` / ``Fp8PerBlockMoEMethod``).
    - ``weight``: the weight key's :class:`oqcore.formats.KeyFormat`.
    - ``activations``: the activation keys' formats the scheme can run with; ``None`` in the tuple
      means weight-only (activations stay in the model dtype). A format object may be shared by
      several schemes of one plugin; a format of an activation key another plugin named (import
      that plugin's format object) is used as that plugin declares it, its quantizers staying that
      plugin's.
    - ``default_activation``: the activation :class:`oqcore.QuantKey` (or ``None``) used when a
      spec omits ``activation``; one of ``activations``.
    - ``kinds``: the layer kinds served, from ``("linear", "moe")``.
    - ``options_model``: a pydantic model validating ``QuantSpec.options`` (frozen, ``extra="forbid"``),
      handed to the quantizers and dequantizers.
    - ``backends(kind, activation_key) -> list[Backend]``: the forward backends for one kind and
      activation key (each with that ``activation_key``). The core adds the float32
      dequantize-and-matmul reference, named ``torch``, unless the list has one.
    - ``methods``: ``kind -> class`` for what the scheme does differently from
      :class:`oqcore.OnlineLinearMethodBase` / :class:`oqcore.OnlineMoEMethodBase` (a subclass
      of the kind's base that states no key facts: those come from this record).
    - ``compressed_tensors_format``: activation key (``None`` for weight-only) -> the
      compressed-tensors ``CompressionFormat`` value its layers are stored in (``"float-quantized"``,
      ``"mxfp8-quantized"``, ``"pack-quantized"``, ...); empty when the scheme has no such format.
    - ``description``: one line for ``oq plugins`` / ``oq keys``.
    """

    name: str
    weight: KeyFormat
    activations: tuple[KeyFormat | None, ...] = (None,)
    default_activation: QuantKey | None = None
    kinds: tuple[str, ...] = ("linear", "moe")
    options_model: type[BaseModel] = NoOptions
    backends: BackendsFn | None = None
    methods: Mapping[str, type[OnlineMethodBase]] = field(default_factory=dict)
    compressed_tensors_format: Mapping[QuantKey | None, str] = field(default_factory=dict)
    description: str = ""

    @property
    def activation_keys(self) -> tuple[QuantKey | None, ...]:
        """The supported activation keys, ``None`` for weight-only."""
        return tuple(None if f is None else f.key for f in self.activations)

    def activation_format(self, key: QuantKey | None) -> KeyFormat | None:
        """The format of activation ``key`` (``None`` for weight-only)."""
        return next((f for f in self.activations if f is not None and f.key == key), None)

    def formats(self) -> list[KeyFormat]:
        """Every key format the scheme declares: the weight's, then the activations'."""
        return [self.weight, *(f for f in self.activations if f is not None)]


_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def check_scheme(scheme: object) -> Scheme:
    """Validate a record a plugin registers; raises :class:`oqcore.PluginError` saying what is wrong."""
    if not isinstance(scheme, Scheme):
        raise PluginError(f"register() takes an oqcore.Scheme, got {type(scheme).__name__}")
    where = f"scheme {scheme.name!r}"
    if not isinstance(scheme.name, str) or not _NAME.fullmatch(scheme.name):
        raise PluginError(f"scheme name {scheme.name!r} must be letters, digits and '_', starting with a letter")
    if not isinstance(scheme.weight, KeyFormat):
        raise PluginError(f"{where}: weight must be a KeyFormat, got {type(scheme.weight).__name__}")
    if not isinstance(scheme.activations, tuple) or not all(f is None or isinstance(f, KeyFormat) for f in scheme.activations):
        raise PluginError(f"{where}: activations must be a tuple of KeyFormat or None")
    if not scheme.activations:
        raise PluginError(f"{where}: activations is empty; (None,) means weight-only")
    if scheme.default_activation not in scheme.activation_keys:
        raise PluginError(f"{where}: default_activation {scheme.default_activation} is not one of its activations")
    if not scheme.kinds or not all(k in METHOD_BASES for k in scheme.kinds) or len(set(scheme.kinds)) != len(scheme.kinds):
        raise PluginError(f"{where}: kinds {scheme.kinds!r} must be distinct kinds from {', '.join(METHOD_BASES)}")
    if not (isinstance(scheme.options_model, type) and issubclass(scheme.options_model, BaseModel)):
        raise PluginError(f"{where}: options_model must be a pydantic BaseModel subclass")
    if scheme.backends is not None and not callable(scheme.backends):
        raise PluginError(f"{where}: backends must be callable (kind, activation_key) -> list of Backend")
    if not isinstance(scheme.methods, Mapping):
        raise PluginError(f"{where}: methods must be a mapping of kind to method class")
    for kind, cls in scheme.methods.items():
        base = METHOD_BASES.get(kind)
        if kind not in scheme.kinds or base is None:
            raise PluginError(f"{where}: methods has kind {kind!r}, which the scheme does not serve")
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(f"{where}: the {kind} method {cls!r} must subclass {base.__name__}")
    ct = scheme.compressed_tensors_format
    if not isinstance(ct, Mapping) or not all(isinstance(v, str) for v in ct.values()):
        raise PluginError(f"{where}: compressed_tensors_format must map activation keys to format names (str)")
    unknown = [k for k in ct if k not in scheme.activation_keys]
    if unknown:
        raise PluginError(f"{where}: compressed_tensors_format names activation {unknown[0]}, which the scheme does not serve")
    for fmt in scheme.formats():
        check_format(fmt, where)
    for fmt in scheme.activations:
        if fmt is not None and fmt.is_static_activation:
            if fmt.static_quantize is None:
                raise PluginError(
                    f"{where}: activation key {fmt.key} has static scales, and its format declares no static_quantize "
                    "(quantizing an input with the stored scale)"
                )
            if not fmt.key.scale.group_shape.is_per_tensor:
                raise PluginError(
                    f"{where}: static activation key {fmt.key} must be per tensor (a stored input scale cannot depend "
                    "on the number of tokens)"
                )
    return scheme


def check_format(fmt: KeyFormat, where: str) -> None:
    """Validate one :class:`KeyFormat` of ``where``; raises :class:`oqcore.PluginError`."""
    what = f"{where}: format of key {fmt.key}"
    if not isinstance(fmt.key, QuantKey):
        raise PluginError(f"{where}: a KeyFormat's key must be a QuantKey, got {type(fmt.key).__name__}")
    if not callable(fmt.dequantize):
        raise PluginError(f"{what}: dequantize must be callable")
    names = fmt.tensors
    if not (isinstance(names, tuple) and names and names[0] == "qdata" and all(isinstance(n, str) and _NAME.fullmatch(n) for n in names)):
        raise PluginError(f"{what}: tensors must be a tuple of names starting with 'qdata', got {names!r}")
    if len(set(names)) != len(names):
        raise PluginError(f"{what}: tensors {names!r} repeat a name")
    if isinstance(fmt.values_per_element, bool) or not isinstance(fmt.values_per_element, int) or fmt.values_per_element < 1:
        raise PluginError(f"{what}: values_per_element must be a positive int, got {fmt.values_per_element!r}")
    if fmt.static_quantize is not None and not callable(fmt.static_quantize):
        raise PluginError(f"{what}: static_quantize must be callable")
    ct = fmt.compressed_tensors
    if ct is not None and not (isinstance(ct, Mapping) and all(isinstance(k, str) for k in ct)):
        raise PluginError(f"{what}: compressed_tensors must be a mapping of QuantizationArgs field names, got {type(ct).__name__}")
    seen: set[str] = set()
    for impl in fmt.implementations:
        check_impl(impl, what)
        if impl.name in seen:
            raise PluginError(f"{what}: quantizer implementation {impl.name!r} is declared twice")
        seen.add(impl.name)
    if REFERENCE not in seen:
        raise PluginError(f"{what}: no {REFERENCE!r} reference quantizer implementation (the definition of the bytes)")


def check_impl(impl: Any, what: str) -> None:
    """Validate one :class:`QuantizerImpl` of ``what``; raises :class:`oqcore.PluginError`."""
    if not isinstance(impl, QuantizerImpl):
        raise PluginError(f"{what}: implementations must be QuantizerImpl records, got {type(impl).__name__}")
    if not isinstance(impl.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", impl.name):
        raise PluginError(f"{what}: quantizer implementation name {impl.name!r} is not a valid name")
    for attr in ("quantize", "is_supported"):
        if not callable(getattr(impl, attr)):
            raise PluginError(f"{what}: {attr} of quantizer implementation {impl.name!r} must be callable")
    if isinstance(impl.priority, bool) or not isinstance(impl.priority, int):
        raise PluginError(f"{what}: priority of quantizer implementation {impl.name!r} must be an int")
    for flag in ("checks_finite", "whole_stack"):
        if not isinstance(getattr(impl, flag), bool):
            raise PluginError(f"{what}: {flag} of quantizer implementation {impl.name!r} must be True or False")


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_") if part)


def method_class(scheme: Scheme, kind: str) -> type[OnlineMethodBase]:
    """The method class the core registers for ``kind``: the scheme's own class for that kind (or
    the kind's base) with the record's facts as class attributes (``weight_key``,
    ``supported_activation_keys``, ``default_activation_key``, ``options_model``), named
    ``<CamelName>LinearMethod`` / ``<CamelName>MoEMethod``."""
    base = scheme.methods.get(kind) or METHOD_BASES[kind]
    suffix = "LinearMethod" if kind == "linear" else "MoEMethod"
    attrs = {
        "weight_key": scheme.weight.key,
        "supported_activation_keys": scheme.activation_keys,
        "default_activation_key": scheme.default_activation,
        "options_model": scheme.options_model,
        "scheme": scheme,
        # the plugin's module (its own method class's, else its dequantizer's), not oqcore's
        "__module__": scheme.methods[kind].__module__ if kind in scheme.methods else getattr(scheme.weight.dequantize, "__module__", base.__module__),
        "__doc__": f"{scheme.description or scheme.name} ({kind}); derived by oqcore from the Scheme record.",
    }
    return type(f"{_camel(scheme.name)}{suffix}", (base,), attrs)


def scheme_backends(scheme: Scheme, kind: str, reference_description: str) -> list[Backend]:
    """The forward backends of ``scheme`` for ``kind``: the scheme's, per activation key, plus the
    reference ``torch`` backend (the method's own float32 forward) for each activation key the
    scheme's list does not already cover (``traceable`` for linears; the experts' loop runs as one
    opaque op under ``torch.compile``). Raises :class:`oqcore.PluginError` when ``backends``
    fails or returns a backend for another activation key."""
    out: list[Backend] = []
    for act in scheme.activation_keys:
        got: Sequence[Backend] = ()
        if scheme.backends is not None:
            try:
                got = scheme.backends(kind, act)
            except Exception as e:
                raise PluginError(f"scheme {scheme.name!r}: backends({kind!r}, {act}) raised {type(e).__name__}: {e}") from e
            if got is None:
                got = ()
            if not isinstance(got, (list, tuple)) or not all(isinstance(b, Backend) for b in got):
                raise PluginError(f"scheme {scheme.name!r}: backends({kind!r}, {act}) must return a list of oqcore.Backend")
            wrong = [b.name for b in got if b.activation_key != act]
            if wrong:
                raise PluginError(
                    f"scheme {scheme.name!r}: backends({kind!r}, {act}) returned {wrong[0]!r} for another activation key"
                )
        out.extend(got)
        if not any(b.name == REFERENCE for b in got):
            mode = "weight-only" if act is None else "with activation quantization"
            # the linear reference is one traceable graph (inductor fuses dequantize and matmul); the
            # experts' reference loops over the experts that got tokens (data dependent: a graph break)
            out.append(
                Backend(REFERENCE, act, priority=0, description=f"{reference_description}, {mode}", traceable=kind == "linear")
            )
    return out
