"""Plugin discovery and the registries the plugins fill.

Plugins are modules advertised under the entry-point group ``"oqcore"`` (the built-in schemes too).
They are loaded lazily, on the first call that needs a key, a method or a backend, one at a time
in try/except: a broken plugin is recorded (``oq plugins`` shows it) and the others keep working.
Environment:

- ``OQ_PLUGINS=a,b``: load only these entry points (allow-list);
- ``OQ_DISABLE_PLUGINS=a,b``: skip these;
- ``OQ_STRICT_PLUGINS=1``: a plugin that fails to import or register raises :class:`oqcore.PluginError`.

A name registered twice (key, alias, shorthand, method, quantizer) is always a
:class:`oqcore.PluginError` naming both plugins, whatever the mode.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import Any

import pluggy
import torch

from oqcore import hookspecs
from oqcore.errors import PluginConflictError, PluginError
from oqcore.keys import KeyInfo, KeyRegistry, QuantKey, Role
from oqcore.methods import METHOD_BASES, OnlineMethodBase
from oqcore.oracle import Backend

ENTRY_POINT_GROUP = "oqcore"
KINDS = tuple(METHOD_BASES)


@dataclass
class PluginRecord:
    """What became of one plugin: ``status`` is ``"loaded"``, ``"failed"``, ``"disabled"`` or
    ``"not allowed"``; ``error`` holds the failure text."""

    name: str
    distribution: str
    version: str
    module: str
    status: str
    error: str | None = None


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


@dataclass(frozen=True)
class Quantizer:
    """A registered tensor quantizer for one weight key on one backend.

    ``quantize(w, options) -> (qdata, scale)`` and ``dequantize(qdata, scale, dtype, options) -> w``.
    ``checks_finite``: ``quantize`` raises :class:`oqcore.NonFiniteError` for NaN/Inf input (found
    in its own pass), so the core does not read the tensor a second time to check.
    ``whole_stack``: an ``[E, N, K]`` expert stack in one call needs no working memory beyond the
    outputs (a fused kernel), so the core does not split it into per-expert calls.
    """

    key: QuantKey
    backend: str
    quantize: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    dequantize: Callable[..., torch.Tensor]
    plugin: str
    checks_finite: bool = False
    whole_stack: bool = False


@dataclass
class Registry:
    """Everything the loaded plugins registered. Built once per plugin set, read by config, planning
    and the tensor API."""

    keys: KeyRegistry = field(default_factory=KeyRegistry)
    shorthands: dict[str, Shorthand] = field(default_factory=dict)
    methods: dict[tuple[str, QuantKey], MethodEntry] = field(default_factory=dict)
    quantizers: dict[tuple[QuantKey, str], Quantizer] = field(default_factory=dict)

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


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


class OqPluginManager:
    """Loads the ``oqcore`` entry points and builds the :class:`Registry` from their hooks.

    Thin layer over :class:`pluggy.PluginManager` (``.pm``). Registration hooks are called plugin by
    plugin, with a ``register`` callable bound to that plugin; a plugin whose hook raises is
    recorded as failed and none of its registrations are kept.
    """

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self._entry_points_loaded = False
        self._registry: Registry | None = None
        self._candidates: dict[tuple[str, QuantKey], list[Backend]] = {}
        self._lock = threading.RLock()

    @property
    def strict(self) -> bool:
        """Whether a failing plugin is fatal (``OQ_STRICT_PLUGINS=1``)."""
        return os.environ.get("OQ_STRICT_PLUGINS", "") not in ("", "0", "false", "no")

    def _label(self, plugin: str) -> str:
        record = self.records.get(plugin)
        return f"{plugin!r} (distribution {record.distribution})" if record else repr(plugin)

    def _fail(self, record: PluginRecord, exc: BaseException) -> None:
        record.status = "failed"
        record.error = f"{type(exc).__name__}: {exc}"
        self.records[record.name] = record
        if isinstance(exc, PluginConflictError):
            raise exc
        if self.strict:
            raise PluginError(
                f"plugin {record.name!r} (distribution {record.distribution}) failed: {record.error}"
            ) from exc

    def load_entry_points(self) -> None:
        """Import every allowed entry point of the ``oqcore`` group (once)."""
        with self._lock:
            if self._entry_points_loaded:
                return
            self._entry_points_loaded = True
            allow, block = _env_list("OQ_PLUGINS"), _env_list("OQ_DISABLE_PLUGINS") or set()
            for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
                dist = ep.dist.metadata["Name"] if ep.dist is not None else "?"
                version = ep.dist.version if ep.dist is not None else "?"
                record = PluginRecord(ep.name, dist, version, ep.value, "loaded")
                if ep.name in self.records:
                    continue
                if ep.name in block:
                    record.status = "disabled"
                elif allow is not None and ep.name not in allow:
                    record.status = "not allowed"
                if record.status != "loaded":
                    self.records[ep.name] = record
                    continue
                try:
                    module = ep.load()
                    self.pm.register(module, name=ep.name)
                except Exception as e:  # one broken plugin must not take the others down
                    self._fail(record, e)
                    continue
                self.records[ep.name] = record
            self._invalidate()

    def register(self, plugin: ModuleType | object, name: str, distribution: str | None = None) -> None:
        """Register a plugin object or module directly (tests, applications embedding a scheme).

        It then takes part exactly like an entry-point plugin. Raises :class:`oqcore.PluginError`
        if ``name`` is taken.
        """
        with self._lock:
            self.load_entry_points()
            if name in self.records and self.records[name].status == "loaded":
                raise PluginConflictError(f"a plugin named {name!r} is already registered ({self.records[name].distribution})")
            self.pm.register(plugin, name=name)
            module = getattr(plugin, "__name__", type(plugin).__name__)
            self.records[name] = PluginRecord(name, distribution or name, "", module, "loaded")
            self._invalidate()

    def unregister(self, name: str) -> None:
        """Remove a plugin registered by name; its keys, methods and backends disappear."""
        with self._lock:
            if self.pm.get_plugin(name) is not None:
                self.pm.unregister(name=name)
            self.records.pop(name, None)
            self._invalidate()

    def _invalidate(self) -> None:
        self._registry = None
        self._candidates.clear()

    def check_pending(self) -> None:
        """Raise :class:`oqcore.PluginError` if a plugin implements a hook oqcore does not define
        (a typo such as ``oq_register_method``)."""
        self.load_entry_points()
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as e:
            raise PluginError(f"plugin {e.plugin!r}: {e}") from e

    def _impls(self, hook_name: str):
        return [i for i in getattr(self.pm.hook, hook_name).get_hookimpls() if i.plugin_name in self.records]

    @property
    def registry(self) -> Registry:
        """The registry of the loaded plugins, built on first access after any change."""
        with self._lock:
            self.load_entry_points()
            if self._registry is None:
                self._registry = self._build_registry()
            return self._registry

    def _build_registry(self) -> Registry:
        reg = Registry()
        steps = (
            ("oq_register_quant_keys", self._key_registrar),
            ("oq_register_shorthands", self._shorthand_registrar),
            ("oq_register_methods", self._method_registrar),
            ("oq_register_quantizers", self._quantizer_registrar),
        )
        for hook_name, make_registrar in steps:
            for impl in self._impls(hook_name):
                record = self.records[impl.plugin_name]
                if record.status != "loaded":
                    continue
                staged: list[Callable[[], None]] = []
                try:
                    impl.function(register=make_registrar(reg, impl.plugin_name, staged))
                    for commit in staged:
                        commit()
                except Exception as e:
                    self._fail(record, e)
                    # Its earlier hooks may have registered things: build again without it.
                    return self._build_registry()
        return reg

    # Each registrar validates eagerly (so the error points into the plugin's hook) and stages the
    # change, committed only once the plugin's whole hook has returned.
    def _key_registrar(self, reg: Registry, plugin: str, staged: list) -> Callable[..., None]:
        def register(
            name: str,
            key: QuantKey | None = None,
            *,
            weight: QuantKey | None = None,
            activation: QuantKey | None = None,
            aliases: Iterable[str] = (),
            description: str = "",
        ) -> None:
            """The ``register`` callable handed to the plugin's hook (arguments: see :mod:`oqcore.hookspecs`)."""
            if key is not None and (weight is not None or activation is not None):
                raise PluginError(f"plugin {plugin!r}: key {name!r}: give either key= or weight=/activation=")
            info = KeyInfo(
                name,
                key if key is not None else weight,
                key if key is not None else activation,
                tuple(aliases),
                plugin,
                description,
            )
            for k in (info.weight, info.activation):
                if k is not None and not isinstance(k, QuantKey):
                    raise PluginError(f"plugin {plugin!r}: key {name!r} must be a QuantKey, got {type(k).__name__}")
            staged.append(lambda: reg.keys.add(info, self._label))

        return register

    def _shorthand_registrar(self, reg: Registry, plugin: str, staged: list) -> Callable[..., None]:
        def register(
            name: str,
            *,
            linear: Mapping[str, Any] | None = None,
            moe: Mapping[str, Any] | None = None,
            description: str = "",
        ) -> None:
            """The ``register`` callable handed to the plugin's hook (arguments: see :mod:`oqcore.hookspecs`)."""
            if linear is None and moe is None:
                raise PluginError(f"plugin {plugin!r}: shorthand {name!r} defines neither linear nor moe")

            def commit() -> None:
                """Apply the staged registration; raises :class:`oqcore.PluginConflictError` on a clash."""
                if name in reg.shorthands:
                    raise PluginConflictError(
                        f"shorthand {name!r} is registered twice: by plugin {self._label(reg.shorthands[name].plugin)} "
                        f"and by plugin {self._label(plugin)}"
                    )
                reg.shorthands[name] = Shorthand(name, linear, moe, plugin, description)

            staged.append(commit)

        return register

    def _method_registrar(self, reg: Registry, plugin: str, staged: list) -> Callable[..., None]:
        def register(kind: str, weight_key: QuantKey | str, method_cls: type[OnlineMethodBase]) -> None:
            """The ``register`` callable handed to the plugin's hook (arguments: see :mod:`oqcore.hookspecs`)."""
            if kind not in METHOD_BASES:
                raise PluginError(f"plugin {plugin!r}: unknown layer kind {kind!r}; kinds: {', '.join(KINDS)}")
            key = reg.resolve_key(weight_key, "weight")
            base = METHOD_BASES[kind]
            if not (isinstance(method_cls, type) and issubclass(method_cls, base)):
                raise PluginError(f"plugin {plugin!r}: {method_cls!r} for kind {kind!r} must subclass {base.__name__}")
            if getattr(method_cls, "weight_key", None) != key:
                raise PluginError(
                    f"plugin {plugin!r}: {method_cls.__name__}.weight_key does not match the key it is registered for"
                )

            def commit() -> None:
                """Apply the staged registration; raises :class:`oqcore.PluginConflictError` on a clash."""
                if (kind, key) in reg.methods:
                    other = reg.methods[(kind, key)]
                    raise PluginConflictError(
                        f"{kind} method for weight key {reg.name_of(key)!r} is registered twice: by plugin "
                        f"{self._label(other.plugin)}: {other.cls.__name__}, and by plugin {self._label(plugin)}: "
                        f"{method_cls.__name__}"
                    )
                reg.methods[(kind, key)] = MethodEntry(kind, key, method_cls, plugin)

            staged.append(commit)

        return register

    def _quantizer_registrar(self, reg: Registry, plugin: str, staged: list) -> Callable[..., None]:
        def register(
            key: QuantKey | str,
            backend: str,
            quantize: Callable,
            dequantize: Callable,
            *,
            checks_finite: bool = False,
            whole_stack: bool = False,
        ) -> None:
            """The ``register`` of ``oq_register_quantizers`` (see :mod:`oqcore.hookspecs`); a key
            name registers for every key it means. Raises :class:`oqcore.PluginError` for an
            unknown name; conflicts surface when the hook's registrations are committed."""
            if isinstance(key, str):
                info = reg.keys.get(key)
                if info is None:
                    raise PluginError(f"plugin {plugin!r}: quantizer for unknown key name {key!r}")
                keys = {k for k in (info.weight, info.activation) if k is not None}
            else:
                keys = {key}
            for k in keys:
                _stage_quantizer(Quantizer(k, backend, quantize, dequantize, plugin, checks_finite, whole_stack))

        def _stage_quantizer(q: Quantizer) -> None:
            k, backend = q.key, q.backend

            def commit() -> None:
                """Apply the staged registration; raises :class:`oqcore.PluginConflictError` on a clash."""
                if (k, backend) in reg.quantizers:
                    other = reg.quantizers[(k, backend)]
                    raise PluginConflictError(
                        f"quantizer for {reg.name_of(k)!r} on backend {backend!r} is registered twice: "
                        f"by plugin {self._label(other.plugin)} and by plugin {self._label(plugin)}"
                    )
                reg.quantizers[(k, backend)] = q

            staged.append(commit)

        return register

    def backend_candidates(self, kind: str, weight_key: QuantKey) -> list[Backend]:
        """All plugins' :class:`Backend` candidates for ``(kind, weight_key)``, each stamped with its
        plugin. A plugin whose hook raises is recorded as failed and contributes nothing."""
        with self._lock:
            self.registry  # noqa: B018 - loads plugins
            cache_key = (kind, weight_key)
            if cache_key not in self._candidates:
                out: list[Backend] = []
                for impl in self._impls("oq_backend_candidates"):
                    record = self.records[impl.plugin_name]
                    if record.status != "loaded":
                        continue
                    kwargs = {"kind": kind, "weight_key": weight_key}
                    try:
                        got = impl.function(**{a: kwargs[a] for a in impl.argnames})
                        for b in got or ():
                            if not isinstance(b, Backend):
                                raise PluginError(f"oq_backend_candidates returned {type(b).__name__}, not Backend")
                            out.append(b if b.plugin else _with_plugin(b, impl.plugin_name))
                    except Exception as e:
                        self._fail(record, e)
                self._candidates[cache_key] = out
            return list(self._candidates[cache_key])


def _with_plugin(b: Backend, plugin: str) -> Backend:
    from dataclasses import replace

    return replace(b, plugin=plugin)


_manager: OqPluginManager | None = None
_manager_lock = threading.Lock()


def get_plugin_manager() -> OqPluginManager:
    """The process-wide plugin manager (entry points are loaded on first registry access)."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = OqPluginManager()
        return _manager


def reset_plugin_manager() -> None:
    """Forget every loaded plugin; the next call rediscovers entry points (reads the env again)."""
    global _manager
    with _manager_lock:
        _manager = None


def get_registry() -> Registry:
    """Shortcut for ``get_plugin_manager().registry``."""
    return get_plugin_manager().registry
