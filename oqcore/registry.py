"""The registry the plugins fill, and the ``register`` callables handed to their hooks.

:class:`Registry` holds every key name, shorthand, method and quantizer the loaded plugins
registered. Each ``register`` callable checks its arguments' types at once (so the error points
into the plugin's hook) and *stages* the change; the plugin manager commits a plugin's staged
changes only after its whole hook returned, so a plugin that fails half-way leaves nothing behind.
A clash with another plugin raises :class:`oqcore.PluginConflictError` whose ``plugins`` attribute
names both plugins; a plugin registering the same thing twice itself is its own
:class:`oqcore.PluginError`. :func:`check_backends` validates what ``oq_backend_candidates``
returned. Loading and the per-plugin containment live in :mod:`oqcore.plugins`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any


from oqcore.errors import PluginConflictError, PluginError
from oqcore.formats import REFERENCE, KeyFormat, QuantizerImpl
from oqcore.keys import ROLES, KeyInfo, KeyRegistry, QuantKey, Role
from oqcore.kinds import KINDS
from oqcore.methods import METHOD_BASES, MethodFormats, OnlineMethodBase
from oqcore.oracle import Backend
from oqcore.scheme import Scheme, check_scheme, method_class, scheme_backends


# Names users type in configs and `key=value` CLI overrides: no spaces, '=', ',' or ':'.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


@dataclass(frozen=True)
class Shorthand:
    """A config shorthand: spec mappings for the ``linear`` and/or ``moe`` slots (``None`` = not defined)."""

    name: str
    linear: Mapping[str, Any] | None
    moe: Mapping[str, Any] | None
    plugin: str
    description: str = ""

    def slot(self, kind: str) -> Mapping[str, Any] | None:
        """The spec mapping for ``kind``, or ``None``."""
        return self.linear if kind == "linear" else self.moe


@dataclass(frozen=True)
class MethodEntry:
    """A registered method class for ``(kind, weight_key)``."""

    kind: str
    weight_key: QuantKey
    cls: type[OnlineMethodBase]
    plugin: str


Quantizer = QuantizerImpl
"""The registry's record of one quantizer implementation (v1 name of :class:`oqcore.formats.QuantizerImpl`)."""


@dataclass
class Registry:
    """Everything the loaded plugins registered. Built once per plugin set, read by config, planning
    and the tensor API."""

    keys: KeyRegistry = field(default_factory=KeyRegistry)
    shorthands: dict[str, Shorthand] = field(default_factory=dict)
    methods: dict[tuple[str, QuantKey], MethodEntry] = field(default_factory=dict)
    quantizers: dict[tuple[QuantKey, str], QuantizerImpl] = field(default_factory=dict)
    declared_formats: dict[QuantKey, KeyFormat] = field(default_factory=dict)
    schemes: dict[QuantKey, Scheme] = field(default_factory=dict)
    backends: dict[tuple[str, QuantKey], list[Backend]] = field(default_factory=dict)

    def format(self, key: QuantKey) -> KeyFormat | None:
        """The :class:`oqcore.formats.KeyFormat` of ``key`` with every registered implementation
        (stamped with key, plugin and dequantizer), or ``None`` when no plugin quantizes to it. A
        key registered through the v1 ``oq_register_quantizers`` hook gets the v1 format:
        ``(qdata, scale)``, unpacked, dequantized by its ``torch`` quantizer's dequantizer."""
        # Built on every call (a dozen entries): the quantizers table stays the one source of truth.
        impls = tuple(sorted((q for (k, _), q in self.quantizers.items() if k == key), key=lambda q: q.name))
        if not impls:
            return None
        declared = self.declared_formats.get(key)
        if declared is not None:
            fmt = replace(declared, implementations=impls)
        else:
            ref = next((q for q in impls if q.name == REFERENCE), impls[0])
            assert ref.dequantize is not None
            fmt = KeyFormat(key, ref.dequantize, impls)
        return fmt

    def method_formats(self, weight_key: QuantKey, activation_key: QuantKey | None) -> MethodFormats:
        """The :class:`oqcore.methods.MethodFormats` a method instance for these keys is made with.
        Raises :class:`oqcore.PluginError` when a key has no quantizer (a plugin registered a
        method without one)."""
        weight = self.format(weight_key)
        if weight is None:
            raise PluginError(f"no plugin registered a quantizer for weight key {self.name_of(weight_key)!r}")
        activation = None
        if activation_key is not None:
            activation = self.format(activation_key)
            if activation is None:
                raise PluginError(
                    f"no plugin registered a quantizer for activation key {self.name_of(activation_key, 'activation')!r}"
                )
        act_name = "" if activation_key is None else self.name_of(activation_key, "activation")
        return MethodFormats(weight, activation, self.name_of(weight_key, "weight"), act_name)

    def resolve_key(self, name: str | QuantKey, role: Role, field: str | None = None) -> QuantKey:
        """A key from a name (or a key passed through); see :meth:`KeyRegistry.resolve`."""
        return name if isinstance(name, QuantKey) else self.keys.resolve(name, role, field)

    def name_of(self, key: QuantKey | None, role: Role = "weight") -> str:
        """Canonical name of ``key`` in ``role``."""
        return self.keys.name_of(key, role)

    def key_name(self, key: QuantKey) -> str:
        """Canonical name of ``key`` in whichever role names it (weight first)."""
        for role in ("weight", "activation"):
            name = self.keys.name_of(key, role)
            if name != str(key):
                return name
        return str(key)

    def method(self, kind: str, weight_key: QuantKey) -> MethodEntry | None:
        """The method registered for ``(kind, weight_key)``, or ``None``."""
        return self.methods.get((kind, weight_key))

    def method_weight_names(self, kind: str) -> list[str]:
        """Names of the weight keys that have a method for ``kind``."""
        return sorted(self.name_of(k, "weight") for (kd, k) in self.methods if kd == kind)


class Stage:
    """The changes one plugin's hook registered, applied by :meth:`commit` after the hook returned.

    Once committed (or abandoned), the ``register`` callable refuses further calls: a plugin that
    kept it and calls it later would otherwise register into nothing, silently.
    """

    def __init__(self, hook: str) -> None:
        self.hook = hook
        self.changes: list[Callable[[], None]] = []
        self.open = True

    def add(self, change: Callable[[], None]) -> None:
        """Stage ``change``; raises :class:`oqcore.PluginError` once the hook has returned."""
        if not self.open:
            raise PluginError(f"register() of hook {self.hook} called after the hook returned; call it inside the hook")
        self.changes.append(change)

    def commit(self) -> None:
        """Apply the staged changes in order (a clash raises from the change that finds it)."""
        self.open = False
        for change in self.changes:
            change()

    def close(self) -> None:
        """Abandon the staged changes."""
        self.open = False


def conflict(message: str, first: str, second: str) -> PluginConflictError:
    """A :class:`oqcore.PluginConflictError` for a clash between plugins ``first`` and ``second``
    (kept as its ``plugins`` attribute, so the manager can mark both)."""
    err = PluginConflictError(message)
    err.plugins = (first, second)
    return err


def _type_name(x: object) -> str:
    return type(x).__name__


def _check_name(what: str, name: object) -> str:
    if not isinstance(name, str):
        raise PluginError(f"{what} must be a str, got {_type_name(name)} {name!r}")
    if not _NAME.fullmatch(name):
        raise PluginError(
            f"{what} {name!r} is not a valid name: letters, digits, '_', '.', '-', starting with a letter or digit"
        )
    return name


def _check_str(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise PluginError(f"{what} must be a str, got {_type_name(value)}")
    return value


def _check_bool(what: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise PluginError(f"{what} must be True or False, got {_type_name(value)} {value!r}")
    return value


def _check_callable(what: str, value: object) -> Callable:
    if not callable(value):
        raise PluginError(f"{what} must be callable, got {_type_name(value)}")
    return value


def _key_owner(keys: KeyRegistry, info: KeyInfo) -> KeyInfo | None:
    """The registered entry ``info`` would clash with (a name, an alias or a key in a role), or ``None``."""
    for name in (info.name, *info.aliases):
        owner = keys.get(name)
        if owner is not None:
            return owner
    for role in ROLES:
        key = info.key(role)
        if key is not None:
            for other in keys.infos.values():
                if other.key(role) == key:
                    return other
    return None


def key_registrar(reg: Registry, plugin: str, stage: Stage, label: Callable[[str], str]) -> Callable[..., None]:
    """The ``register`` of ``oq_register_quant_keys`` for ``plugin`` (arguments: :mod:`oqcore.hookspecs`)."""

    def register(
        name: str,
        key: QuantKey | None = None,
        *,
        weight: QuantKey | None = None,
        activation: QuantKey | None = None,
        aliases: Iterable[str] = (),
        description: str = "",
    ) -> None:
        """Register key name ``name`` (see :func:`oqcore.hookspecs.oq_register_quant_keys`)."""
        _check_name("key name", name)
        for what, k in (("key", key), ("weight", weight), ("activation", activation)):
            if k is not None and not isinstance(k, QuantKey):
                raise PluginError(f"key {name!r}: {what}= must be a QuantKey, got {_type_name(k)} {k!r}")
        if key is not None and (weight is not None or activation is not None):
            raise PluginError(f"key {name!r}: give either key= or weight=/activation=, not both")
        if key is None and weight is None and activation is None:
            raise PluginError(f"key {name!r}: give key= (both roles) or weight= and/or activation=")
        if isinstance(aliases, str) or not isinstance(aliases, Iterable):
            raise PluginError(f"key {name!r}: aliases= must be a list or tuple of names, got {_type_name(aliases)} {aliases!r}")
        aliases = tuple(aliases)
        for alias in aliases:
            _check_name(f"alias of key {name!r}", alias)
        if len({name, *aliases}) != 1 + len(aliases):
            raise PluginError(f"key {name!r}: the name and its aliases {aliases!r} repeat a name")
        _check_str(f"key {name!r}: description=", description)
        info = KeyInfo(
            name,
            key if key is not None else weight,
            key if key is not None else activation,
            aliases,
            plugin,
            description,
        )

        def commit() -> None:
            """Add the key to the registry when the plugin's whole registration is applied; raises
            :class:`oqcore.PluginError` for a clash within the plugin, a conflict error across plugins."""
            other = _key_owner(reg.keys, info)
            if other is not None and other.plugin == plugin:
                raise PluginError(f"registers key name {info.name!r} and {other.name!r}: they clash (same name, alias or key)")
            try:
                reg.keys.add(info, label)
            except PluginConflictError as e:
                raise conflict(str(e), other.plugin if other is not None else plugin, plugin) from None

        stage.add(commit)

    return register


def _check_slot(name: str, kind: str, slot: object) -> Mapping[str, Any] | None:
    if slot is None:
        return None
    if not isinstance(slot, Mapping) or not all(isinstance(k, str) for k in slot):
        raise PluginError(
            f"shorthand {name!r}: {kind}= must be a spec mapping such as {{'weight': '<key name>'}} or None, "
            f"got {_type_name(slot)} {slot!r}"
        )
    return dict(slot)


def shorthand_registrar(reg: Registry, plugin: str, stage: Stage, label: Callable[[str], str]) -> Callable[..., None]:
    """The ``register`` of ``oq_register_shorthands`` for ``plugin`` (arguments: :mod:`oqcore.hookspecs`)."""

    def register(
        name: str,
        *,
        linear: Mapping[str, Any] | None = None,
        moe: Mapping[str, Any] | None = None,
        description: str = "",
    ) -> None:
        """Register shorthand ``name`` (see :func:`oqcore.hookspecs.oq_register_shorthands`)."""
        _check_name("shorthand name", name)
        linear, moe = _check_slot(name, "linear", linear), _check_slot(name, "moe", moe)
        if linear is None and moe is None:
            raise PluginError(f"shorthand {name!r} defines neither linear nor moe")
        _check_str(f"shorthand {name!r}: description=", description)

        def commit() -> None:
            """Add the shorthand when the plugin's whole registration is applied; raises
            :class:`oqcore.PluginError` when the plugin registers it twice, a conflict error across plugins."""
            other = reg.shorthands.get(name)
            if other is not None:
                if other.plugin == plugin:
                    raise PluginError(f"registers shorthand {name!r} twice")
                raise conflict(
                    f"shorthand {name!r} is registered twice: by plugin {label(other.plugin)} and by plugin {label(plugin)}",
                    other.plugin,
                    plugin,
                )
            reg.shorthands[name] = Shorthand(name, linear, moe, plugin, description)

        stage.add(commit)

    return register


def method_registrar(reg: Registry, plugin: str, stage: Stage, label: Callable[[str], str]) -> Callable[..., None]:
    """The ``register`` of ``oq_register_methods`` for ``plugin`` (arguments: :mod:`oqcore.hookspecs`)."""

    def register(kind: str, weight_key: QuantKey | str, method_cls: type[OnlineMethodBase]) -> None:
        """Register ``method_cls`` for ``(kind, weight_key)`` (see :func:`oqcore.hookspecs.oq_register_methods`)."""
        if not isinstance(kind, str) or kind not in METHOD_BASES:
            raise PluginError(f"unknown layer kind {kind!r}; kinds: {', '.join(KINDS)}")
        if not isinstance(weight_key, (QuantKey, str)):
            raise PluginError(f"{kind} method: weight_key must be a QuantKey or a key name, got {_type_name(weight_key)}")
        key = reg.resolve_key(weight_key, "weight")
        base = METHOD_BASES[kind]
        if not (isinstance(method_cls, type) and issubclass(method_cls, base)):
            raise PluginError(f"{method_cls!r} for kind {kind!r} must subclass {base.__name__}")
        if getattr(method_cls, "weight_key", None) != key:
            raise PluginError(
                f"{method_cls.__name__}.weight_key ({getattr(method_cls, 'weight_key', None)}) does not match "
                f"the key it is registered for ({reg.name_of(key)})"
            )

        stage.add(lambda: _commit_method(reg, plugin, label, kind, key, method_cls))

    return register


def quantizer_registrar(reg: Registry, plugin: str, stage: Stage, label: Callable[[str], str]) -> Callable[..., None]:
    """The ``register`` of ``oq_register_quantizers`` for ``plugin`` (arguments: :mod:`oqcore.hookspecs`)."""

    def register(
        key: QuantKey | str,
        backend: str,
        quantize: Callable,
        dequantize: Callable,
        *,
        checks_finite: bool = False,
        whole_stack: bool = False,
        priority: int = 0,
        is_supported: Callable | None = None,
    ) -> None:
        """Register a quantizer (see :func:`oqcore.hookspecs.oq_register_quantizers`); a key name
        registers for every key it means. Raises :class:`oqcore.PluginError` for an unknown name or
        a wrong type; clashes surface when the hook's registrations are committed."""
        if isinstance(key, str):
            info = reg.keys.get(key)
            if info is None:
                raise PluginError(f"quantizer for unknown key name {key!r}")
            keys = {k for k in (info.weight, info.activation) if k is not None}
        elif isinstance(key, QuantKey):
            keys = {key}
        else:
            raise PluginError(f"quantizer key must be a QuantKey or a key name, got {_type_name(key)} {key!r}")
        _check_name(f"backend of the quantizer for {key}", backend)
        _check_callable(f"quantize of the {backend!r} quantizer", quantize)
        _check_callable(f"dequantize of the {backend!r} quantizer", dequantize)
        _check_bool(f"checks_finite of the {backend!r} quantizer", checks_finite)
        _check_bool(f"whole_stack of the {backend!r} quantizer", whole_stack)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise PluginError(f"priority of the {backend!r} quantizer must be an int, got {_type_name(priority)} {priority!r}")
        if is_supported is not None:
            _check_callable(f"is_supported of the {backend!r} quantizer", is_supported)
        extra = {} if is_supported is None else {"is_supported": is_supported}
        for k in keys:
            impl = QuantizerImpl(
                backend, quantize, priority, checks_finite=checks_finite, whole_stack=whole_stack,
                dequantize=dequantize, key=k, plugin=plugin, **extra,
            )
            stage.add(lambda impl=impl: _commit_quantizer(reg, plugin, label, impl))

    return register


def _commit_quantizer(reg: Registry, plugin: str, label: Callable[[str], str], q: QuantizerImpl) -> None:
    assert q.key is not None
    other = reg.quantizers.get((q.key, q.name))
    if other is not None:
        # "on backend": the v1 hook's word for the implementation name, kept in this message
        what = f"quantizer for {reg.name_of(q.key)!r} on backend {q.name!r}"
        if other.plugin == plugin:
            raise PluginError(f"registers the {what} twice")
        raise conflict(
            f"{what} is registered twice: by plugin {label(other.plugin)} and by plugin {label(plugin)}",
            other.plugin,
            plugin,
        )
    reg.quantizers[(q.key, q.name)] = q


def _commit_method(reg: Registry, plugin: str, label: Callable[[str], str], kind: str, key: QuantKey, cls: type) -> None:
    other = reg.methods.get((kind, key))
    if other is not None:
        what = f"{kind} method for weight key {reg.name_of(key)!r}"
        if other.plugin == plugin:
            raise PluginError(f"registers the {what} twice ({other.cls.__name__}, {cls.__name__})")
        raise conflict(
            f"{what} is registered twice: by plugin {label(other.plugin)}: {other.cls.__name__}, "
            f"and by plugin {label(plugin)}: {cls.__name__}",
            other.plugin,
            plugin,
        )
    reg.methods[(kind, key)] = MethodEntry(kind, key, cls, plugin)


REFERENCE_FORWARD = "float32 dequantize-and-matmul reference (any device)"


def scheme_registrar(reg: Registry, plugin: str, stage: Stage, label: Callable[[str], str]) -> Callable[..., None]:
    """The ``register`` of ``oq_register_schemes`` for ``plugin``: one :class:`oqcore.Scheme` per
    call, expanded into the methods (derived per kind), the quantizer implementations of every
    key format it declares (one format object may serve several schemes of the plugin) and the
    forward backends. An activation format whose key another plugin named is that plugin's, used
    here, not declared again (a W4A8 scheme running another plugin's 8-bit activation key).
    Clashes with other plugins are :class:`oqcore.PluginConflictError` s, as for the v1 hooks."""

    def register(scheme: Scheme) -> None:
        """Register ``scheme`` (see :func:`oqcore.hookspecs.oq_register_schemes`)."""
        scheme = check_scheme(scheme)
        if reg.name_of(scheme.weight.key, "weight") == str(scheme.weight.key):
            raise PluginError(
                f"scheme {scheme.name!r}: its weight key {scheme.weight.key} has no name; register one in "
                "oq_register_quant_keys (weight= or key=)"
            )
        backends = {
            kind: [replace(b, plugin=plugin) for b in check_backends(scheme_backends(scheme, kind, REFERENCE_FORWARD), lambda k: reg.name_of(k, 'activation'))]
            for kind in scheme.kinds
        }
        for kind in scheme.kinds:
            cls = method_class(scheme, kind)
            stage.add(lambda kind=kind, cls=cls: _commit_method(reg, plugin, label, kind, scheme.weight.key, cls))
            stage.add(lambda kind=kind: reg.backends.__setitem__((kind, scheme.weight.key), backends[kind]))
        stage.add(lambda: reg.schemes.__setitem__(scheme.weight.key, scheme))
        for fmt in scheme.formats():
            owner = _plugin_naming(reg, fmt.key)
            if fmt is not scheme.weight and owner not in (None, plugin):
                # another plugin's activation key (W4A8 runs mxfp8 activations): a use of that
                # plugin's format, which it declares and whose quantizers it owns
                continue
            stage.add(lambda fmt=fmt: _commit_format(reg, plugin, label, fmt))

    return register


def _plugin_naming(reg: Registry, key: QuantKey) -> str | None:
    """The plugin that named ``key`` (in either role) in ``oq_register_quant_keys``, or ``None``."""
    return next((i.plugin for i in reg.keys.infos.values() if key in (i.weight, i.activation)), None)


def _commit_format(reg: Registry, plugin: str, label: Callable[[str], str], fmt: KeyFormat) -> None:
    declared = reg.declared_formats.get(fmt.key)
    if declared is not None:
        owner = next((q.plugin for (k, _), q in reg.quantizers.items() if k == fmt.key), plugin)
        if owner == plugin and declared == fmt:
            return  # the same format shared by two schemes of one plugin
        if owner == plugin:
            raise PluginError(f"declares two different formats for key {reg.key_name(fmt.key)!r}")
        raise conflict(
            f"the format of key {reg.key_name(fmt.key)!r} is declared twice: by plugin {label(owner)} and by plugin {label(plugin)}",
            owner,
            plugin,
        )
    reg.declared_formats[fmt.key] = fmt
    for impl in fmt.implementations:
        _commit_quantizer(reg, plugin, label, replace(impl, key=fmt.key, plugin=plugin, dequantize=fmt.dequantize))


REGISTRARS: dict[str, Callable[[Registry, str, Stage, Callable[[str], str]], Callable[..., None]]] = {
    "oq_register_quant_keys": key_registrar,
    "oq_register_shorthands": shorthand_registrar,
    "oq_register_methods": method_registrar,
    "oq_register_quantizers": quantizer_registrar,
    "oq_register_schemes": scheme_registrar,
}
"""The registration hooks in the order they run (keys first: later hooks may name keys)."""


def check_backends(got: object, name_of: Callable[[QuantKey | None], str]) -> list[Backend]:
    """Validate what one plugin's ``oq_backend_candidates`` returned: ``None`` (nothing) or a list or
    tuple of :class:`oqcore.Backend` with well-typed fields, no ``(name, activation key)`` twice.
    Raises :class:`oqcore.PluginError` saying what is wrong; ``name_of`` names activation keys."""
    if got is None:
        return []
    if isinstance(got, Backend):
        raise PluginError("returned a single Backend; return a list of Backend")
    if not isinstance(got, (list, tuple)):
        raise PluginError(f"returned {_type_name(got)}; return a list of oqcore.Backend (empty when it has none)")
    seen: set[tuple[str, QuantKey | None]] = set()
    for i, b in enumerate(got):
        if not isinstance(b, Backend):
            raise PluginError(f"returned {_type_name(b)} {b!r} at index {i}, not an oqcore.Backend")
        where = f"Backend at index {i}"
        _check_name(f"{where}: name", b.name)
        where = f"Backend {b.name!r}"
        if b.activation_key is not None and not isinstance(b.activation_key, QuantKey):
            raise PluginError(
                f"{where}: activation_key must be a QuantKey or None, got {_type_name(b.activation_key)} "
                f"{b.activation_key!r} (oqcore.quant_key(name, 'activation') turns a name into a key)"
            )
        if isinstance(b.priority, bool) or not isinstance(b.priority, int):
            raise PluginError(f"{where}: priority must be an int, got {_type_name(b.priority)} {b.priority!r}")
        _check_callable(f"{where}: is_supported", b.is_supported)
        _check_str(f"{where}: description", b.description)
        for what in ("forward", "prepare"):
            if getattr(b, what) is not None:
                _check_callable(f"{where}: {what}", getattr(b, what))
        ident = (b.name, b.activation_key)
        if ident in seen:
            raise PluginError(f"offers backend {b.name!r} for activation {name_of(b.activation_key)} twice")
        seen.add(ident)
    return list(got)
