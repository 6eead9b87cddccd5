"""Plugin discovery, per-plugin containment, and the registry the plugins fill.

Plugins are modules (or objects) advertised under the entry-point group ``"oqcore"``; the built-in
schemes are entry points of ``oq-plugin-fp8``, ``oq-plugin-mxfp8`` and ``oq-plugin-int8`` like any
other. They are loaded lazily, on the first call that needs a key, a method or a backend.

Rules (nothing is silently dropped, replaced or half-loaded):

- **Conflicts are fatal, every time.** One entry-point name offered by two distributions (a
  third-party ``fp8`` beside ``oq-plugin-fp8`` included: neither is imported), or one key name,
  alias, shorthand, method, quantizer or backend registered by two plugins, raises
  :class:`oqcore.PluginConflictError` naming both plugins and their distributions, from every
  registry or backend access until the plugin set changes (:func:`reset_plugin_manager`,
  :meth:`OqPluginManager.register`, :meth:`OqPluginManager.unregister`).
- **A failing plugin is contained.** An exception of any kind (``SystemExit`` and other
  ``BaseException`` too; only ``KeyboardInterrupt`` propagates, as the user pressing Ctrl-C) while
  importing it, in one of its hooks, or a hook result of the wrong type, an entry point that does
  not resolve, an object with no hooks or with a misspelt hook: the plugin is recorded as
  ``"failed"`` with a message naming it, its distribution and the import or hook at fault, a
  :class:`PluginWarning` is issued, and it contributes nothing at all (what its earlier hooks
  registered is dropped). The others keep working. ``oq plugins`` lists the records.
- ``OQ_STRICT_PLUGINS=1`` (``true``/``yes``/``on``; ``0``/``false``/``no``/``off``/empty = off; any
  other value is a :class:`oqcore.ConfigError`) makes a failing plugin fatal: a
  :class:`oqcore.PluginError`, raised again from every access until the plugin set changes.
- ``OQ_PLUGINS=a,b`` loads only these entry points; a name no installed distribution provides is
  a :class:`oqcore.ConfigError`. ``OQ_DISABLE_PLUGINS=a,b`` skips these (it wins over
  ``OQ_PLUGINS``); unknown names there only warn. Spaces around names and empty entries are
  ignored; an empty or blank value means the variable is not set. The lists apply to entry points,
  not to plugins registered with :meth:`OqPluginManager.register`.

The environment is read once per manager, at discovery. The registry types (:class:`Registry`,
:class:`Shorthand`, :class:`MethodEntry`, :class:`Quantizer`) live in :mod:`oqcore.registry`.
"""

from __future__ import annotations

import difflib
import os
import re
import threading
import warnings
from dataclasses import dataclass, replace
from importlib import metadata
from types import ModuleType

import pluggy

from oqcore import hookspecs
from oqcore.errors import ConfigError, OqError, PluginConflictError, PluginError
from oqcore.keys import QuantKey
from oqcore.oracle import Backend
from oqcore.registry import KINDS, REGISTRARS, MethodEntry, Quantizer, Registry, Shorthand, Stage, check_backends

__all__ = [
    "ENTRY_POINT_GROUP",
    "KINDS",
    "MethodEntry",
    "OqPluginManager",
    "PluginRecord",
    "PluginWarning",
    "Quantizer",
    "Registry",
    "Shorthand",
    "get_plugin_manager",
    "get_registry",
    "reset_plugin_manager",
]

ENTRY_POINT_GROUP = "oqcore"
STRICT_ENV, ALLOW_ENV, BLOCK_ENV = "OQ_STRICT_PLUGINS", "OQ_PLUGINS", "OQ_DISABLE_PLUGINS"
CANDIDATES_HOOK = "oq_backend_candidates"
HOOKS = (*REGISTRARS, CANDIDATES_HOOK)

LOADED, FAILED, CONFLICT, DISABLED, NOT_ALLOWED = "loaded", "failed", "conflict", "disabled", "not allowed"
# ``PluginRecord.hook`` values for failures found before any hook runs (kept until reset/unregister);
# a registration hook's status is recomputed at every build, a backend hook's at every plugin-set change.
AT_IMPORT, AT_ENTRY_POINT = "import", "entry point"

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


class PluginWarning(UserWarning):
    """A plugin failed and oqcore continues without it (``OQ_STRICT_PLUGINS=1`` makes it an error)."""


@dataclass
class PluginRecord:
    """What became of one plugin (one entry point of one distribution, or one direct registration).

    ``status``: ``"loaded"``, ``"failed"``, ``"conflict"``, ``"disabled"`` (``OQ_DISABLE_PLUGINS``)
    or ``"not allowed"`` (not in ``OQ_PLUGINS``). ``error``: for ``failed`` / ``conflict``, one line
    naming the plugin, its distribution and the import or hook at fault. ``hook``: where it failed:
    ``"import"``, ``"entry point"`` (the entry point or the object it names is unusable, or its name
    is taken), or the hook's name.
    """

    name: str
    distribution: str
    version: str
    module: str
    status: str
    error: str | None = None
    hook: str | None = None

    @property
    def label(self) -> str:
        """``'name' (distribution dist version)``, as messages name a plugin."""
        version = f" {self.version}" if self.version else ""
        return f"{self.name!r} (distribution {self.distribution}{version})"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _describe_exc(exc: BaseException) -> str:
    """An exception as one line: our own errors by their text, anything else as ``Type: text``."""
    if isinstance(exc, OqError):
        return _one_line(str(exc))
    text = _one_line(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _env_list(name: str) -> set[str] | None:
    """The names in env var ``name`` (comma separated, blanks ignored), or ``None`` if unset or blank."""
    names = {p.strip() for p in os.environ.get(name, "").split(",")} - {""}
    return names or None


def _env_strict() -> bool:
    raw = os.environ.get(STRICT_ENV, "")
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(
        f"{raw!r} is not a valid value: 1, true, yes or on make a failing plugin an error; 0, false, no, off "
        "or empty (the default) continue without it",
        STRICT_ENV,
    )


def _did_you_mean(name: str, valid) -> str:
    close = difflib.get_close_matches(name, sorted(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass
class _Fatal:
    """A remembered fatal error, raised afresh (new instance, same text and cause) on every access."""

    cls: type[PluginError]
    message: str
    cause: BaseException | None

    def error(self) -> PluginError:
        err = self.cls(self.message)
        err.__cause__, err.__suppress_context__ = self.cause, True
        return err


class OqPluginManager:
    """Loads the ``oqcore`` entry points and builds the :class:`Registry` from their hooks.

    Thin layer over :class:`pluggy.PluginManager` (``.pm``), thread-safe (one lock; the first
    thread to touch the registry loads the plugins, the others wait for it). Hooks are called plugin
    by plugin (entry points in name order, then direct registrations in order), each registration
    hook with a ``register`` callable bound to that plugin; see the module docstring for what is
    fatal and what is contained.
    """

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._all: list[PluginRecord] = []  # every record, conflicting entry points included
        self._causes: dict[int, BaseException] = {}  # id(record) -> the exception that failed it
        self._discovered = False
        self._strict = False
        self._registry: Registry | None = None
        self._fatal: _Fatal | None = None
        self._candidates: dict[tuple[str, QuantKey], list[Backend]] = {}
        self._lock = threading.RLock()
        self._busy: tuple[int, str] | None = None  # (thread, what) while plugin code runs in a load or build
        self._pending: list[PluginRecord] = []  # records of a discovery not yet committed

    # ----------------------------------------------------------------- public API

    @property
    def records(self) -> dict[str, PluginRecord]:
        """Plugin name -> :class:`PluginRecord` (for a name two distributions provide, the first
        one's record; :meth:`plugin_records` lists both). Empty until the plugins are loaded."""
        with self._lock:
            out: dict[str, PluginRecord] = {}
            for r in self._all:
                out.setdefault(r.name, r)
            return out

    @property
    def strict(self) -> bool:
        """Whether a failing plugin is fatal (``OQ_STRICT_PLUGINS``, read at discovery)."""
        return self._strict if self._discovered else _env_strict()

    @property
    def registry(self) -> Registry:
        """The registry of the loaded plugins, built on first access after any change.

        Raises :class:`oqcore.PluginConflictError` (conflict) or :class:`oqcore.PluginError` (strict
        mode, a failed plugin) every time until the plugin set changes, and
        :class:`oqcore.ConfigError` for a bad ``OQ_PLUGINS`` / ``OQ_STRICT_PLUGINS``.
        """
        reg = self._registry  # set only while there is no fatal error: no lock needed to read it
        if reg is not None:
            return reg
        with self._lock:
            self._check_reentry("read the plugin registry")
            self._ensure()
            self._raise_fatal()
            assert self._registry is not None
            return self._registry

    def load_entry_points(self) -> None:
        """Discover and import every allowed entry point of the ``oqcore`` group (once per manager).

        Failures are recorded, not raised (the registry access raises what is fatal); raises
        :class:`oqcore.ConfigError` for a bad plugin environment variable.
        """
        with self._lock:
            self._check_reentry("load the plugins")
            self._discover()

    def plugin_records(self) -> list[PluginRecord]:
        """Every plugin record, sorted by name then distribution, after loading and building as far
        as possible. Never raises for a plugin problem (see :meth:`fatal_error`), so ``oq plugins``
        can show a conflict or a strict-mode failure beside the others; a bad plugin environment
        variable is a :class:`oqcore.ConfigError`."""
        with self._lock:
            self._check_reentry("list the plugins")
            self._ensure()
            return sorted(self._all, key=lambda r: (r.name, r.distribution))

    def fatal_error(self) -> PluginError | None:
        """The error every registry access raises now (a fresh instance), or ``None``."""
        with self._lock:
            self._check_reentry("list the plugins")
            self._ensure()
            return self._fatal.error() if self._fatal is not None else None

    def register(
        self, plugin: ModuleType | object, name: str, distribution: str | None = None, version: str = ""
    ) -> None:
        """Register a plugin object or module directly (tests, applications embedding a scheme).

        It then takes part exactly like an entry-point plugin. Raises
        :class:`oqcore.PluginConflictError` if ``name`` is taken (by a plugin of any status), and
        :class:`oqcore.PluginError` if the object is not a usable plugin (no hooks, a misspelt hook,
        a hook wrapper, arguments the hook does not provide); then nothing is registered.
        """
        with self._lock:
            self._check_reentry(f"register plugin {name!r}")
            self._discover()
            if not isinstance(name, str) or not name.strip():
                raise PluginError(f"a plugin name must be a non-empty str, got {name!r}")
            taken = [r for r in self._all if r.name == name]
            record = PluginRecord(
                name, distribution or name, version, getattr(plugin, "__name__", type(plugin).__name__), LOADED
            )
            if taken:
                owners = " and ".join(f"{r.label}, {r.status}" for r in taken)
                raise PluginConflictError(
                    f"cannot register plugin {record.label}: the name {name!r} is already taken by plugin "
                    f"{owners}; register it under another name"
                )
            problem = self._attach(plugin, name, f"the {type(plugin).__name__} object")
            if problem is not None:
                raise PluginError(f"plugin {record.label} cannot be registered: {problem}")
            self._all.append(record)
            self._changed()

    def unregister(self, name: str) -> None:
        """Remove the plugin(s) called ``name`` (both sides of an entry-point conflict): their keys,
        methods and backends disappear and a remembered fatal error is forgotten. Raises
        :class:`oqcore.PluginError` if no plugin has that name."""
        with self._lock:
            self._check_reentry(f"unregister plugin {name!r}")
            self._discover()
            gone = [r for r in self._all if r.name == name]
            if not gone:
                names = sorted({r.name for r in self._all})
                raise PluginError(f"no plugin named {name!r}{_did_you_mean(name, names)}; plugins: {', '.join(names)}")
            self._detach(name)
            for r in gone:
                self._causes.pop(id(r), None)
            self._all = [r for r in self._all if r.name != name]
            self._changed()

    def check_pending(self) -> None:
        """Raise :class:`oqcore.PluginError` if a registered plugin implements a hook oqcore does not
        define (a typo such as ``oq_register_method``). Entry points and :meth:`register` already
        refuse such plugins; this also covers objects registered on ``.pm`` directly."""
        with self._lock:
            self._check_reentry("check the plugins")
            self._discover()
            for name, obj in self.pm.list_name_plugin():
                problem = self._hook_problem(obj)
                if problem is not None:
                    record = self.records.get(name) or PluginRecord(name, "(not registered through oqcore)", "", "", LOADED)
                    raise PluginError(f"plugin {record.label} {problem}")
            try:
                self.pm.check_pending()
            except pluggy.PluginValidationError as e:
                raise PluginError(f"plugin {e.plugin!r}: {_one_line(str(e))}") from e

    def backend_candidates(self, kind: str, weight_key: QuantKey) -> list[Backend]:
        """All plugins' :class:`Backend` candidates for ``(kind, weight_key)``, each stamped with its
        plugin (in plugin order). A plugin whose hook raises or returns something other than a list
        of well-typed Backends is recorded as failed and contributes nothing from then on (its
        registrations go at the next registry access); two plugins offering the same
        ``(name, activation key)`` is a :class:`oqcore.PluginConflictError`. Raises what
        :attr:`registry` raises, and :class:`oqcore.ConfigError` for an unknown ``kind``."""
        if kind not in KINDS:
            raise ConfigError(f"unknown layer kind {kind!r}; kinds: {', '.join(KINDS)}", "kind")
        if not isinstance(weight_key, QuantKey):
            raise ConfigError(f"weight_key must be a QuantKey, got {type(weight_key).__name__}", "weight_key")
        with self._lock:
            reg = self.registry
            cached = self._candidates.get((kind, weight_key))
            if cached is None:
                cached = self._collect_candidates(reg, kind, weight_key)
            return list(cached)

    # ----------------------------------------------------------------- loading

    def _check_reentry(self, what: str) -> None:
        busy = self._busy
        if busy is not None and busy[0] == threading.get_ident():
            raise PluginError(
                f"{busy[1]} tried to {what} while the plugins are being loaded; a plugin must not use the "
                "oqcore registry at import time or in a registration hook (use it inside the functions it registers)"
            )

    def _run(self, what: str, fn, *args, **kwargs):
        """Run plugin code, marking this thread busy so a call back into the manager fails clearly."""
        previous, self._busy = self._busy, (threading.get_ident(), what)
        try:
            return fn(*args, **kwargs)
        finally:
            self._busy = previous

    def _ensure(self) -> None:
        """Discover and build if needed; afterwards either ``_registry`` or ``_fatal`` is set."""
        self._discover()
        if self._registry is None and self._fatal is None:
            self._build()

    def _raise_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal.error()

    def _discover(self) -> None:
        """Read the environment and the entry points, import the allowed ones (each contained), and
        attach them, all or nothing: a ``KeyboardInterrupt`` leaves the manager as it was."""
        if self._discovered:
            return
        strict = _env_strict()
        allow, block = _env_list(ALLOW_ENV), _env_list(BLOCK_ENV) or set()
        found, unreadable = _scan_entry_points()
        by_name: dict[str, list[_Found]] = {}
        for f in found:
            same = by_name.setdefault(f.ep.name, [])
            if not any((o.dist, o.ep.value) == (f.dist, f.ep.value) for o in same):
                same.append(f)
        if allow is not None and allow - by_name.keys():
            unknown = sorted(allow - by_name.keys())
            hint = "".join(_did_you_mean(n, by_name) for n in unknown)
            unread = f" (unreadable entry points: {', '.join(r.distribution for r in unreadable)})" if unreadable else ""
            raise ConfigError(
                f"names {', '.join(map(repr, unknown))}, which no installed distribution provides as an "
                f"{ENTRY_POINT_GROUP!r} entry point{hint}; installed: {', '.join(sorted(by_name)) or '(none)'}{unread}",
                ALLOW_ENV,
            )
        if block - by_name.keys():
            unknown = sorted(block - by_name.keys())
            hint = "".join(_did_you_mean(n, by_name) for n in unknown)
            warnings.warn(
                f"{BLOCK_ENV} names {', '.join(map(repr, unknown))}, which no installed distribution provides{hint}; "
                f"installed: {', '.join(sorted(by_name)) or '(none)'}",
                PluginWarning,
                stacklevel=4,
            )
        self._strict = strict
        loaded: list[tuple[PluginRecord, object]] = []
        causes: dict[int, BaseException] = {}
        records: list[PluginRecord] = list(unreadable)
        for name in sorted(by_name):
            eps = sorted(by_name[name], key=lambda f: (f.dist, f.ep.value))
            recs = [PluginRecord(name, f.dist, f.version, f.ep.value, LOADED) for f in eps]
            eps = [f.ep for f in eps]
            records += recs
            if name in block:
                for r in recs:
                    r.status = DISABLED
            elif allow is not None and name not in allow:
                for r in recs:
                    r.status = NOT_ALLOWED
            elif len(eps) > 1:
                sides = ", ".join(f"{r.distribution} {r.version} ({r.module})" for r in recs)
                msg = (
                    f"plugin entry point {name!r} (group {ENTRY_POINT_GROUP!r}) is provided by {len(recs)} "
                    f"distributions: {sides}; none of them is loaded. Uninstall all but one, or disable the "
                    f"name with {BLOCK_ENV}={name}"
                )
                for r in recs:
                    r.status, r.error, r.hook = CONFLICT, msg, AT_ENTRY_POINT
            else:
                (ep,), (r,) = eps, recs
                try:
                    obj = self._run(f"plugin {r.label}", ep.load)
                except KeyboardInterrupt:
                    raise
                except BaseException as e:  # noqa: BLE001 - SystemExit at import must not end the host
                    r.status, r.hook = FAILED, AT_IMPORT
                    r.error = f"plugin {r.label} failed at import of {ep.value!r}: {_describe_exc(e)}"
                    causes[id(r)] = e
                    continue
                loaded.append((r, obj))
        attached: list[str] = []
        self._pending = records  # named in messages before they are committed
        try:
            for r, obj in loaded:
                problem = self._attach(obj, r.name, f"entry point {r.name} = {r.module!r}")
                if problem is None:
                    attached.append(r.name)
                else:
                    r.status, r.hook = FAILED, AT_ENTRY_POINT
                    r.error = f"plugin {r.label} failed at registration: {problem}"
        except BaseException:
            for name in attached:
                self._detach(name)
            raise
        finally:
            self._pending = []
        self._all = records + self._all  # direct registrations cannot precede discovery, but keep any
        self._causes.update(causes)
        self._discovered = True
        for r in records:
            if r.status == FAILED:
                self._warn(r)

    def _attach(self, obj: object, name: str, subject: str) -> str | None:
        """Register ``obj`` with pluggy as ``name`` after checking it is a usable plugin; returns
        what is wrong (``subject`` names the object in that text; nothing stays registered) or ``None``."""
        if isinstance(obj, type):
            return (
                f"{subject} is the class {obj.__module__}.{obj.__qualname__}; use a module or an instance of the class"
            )
        other = self.pm.get_name(obj)
        if other is not None:
            return f"{subject} is the same object as plugin {self._label(other)}; one plugin object has one name"
        try:
            self.pm.register(obj, name=name)
        except KeyboardInterrupt:
            self._drop(obj, name)
            raise
        except pluggy.PluginValidationError as e:
            self._drop(obj, name)
            return f"{subject} is not a valid plugin: {_one_line(str(e))}"
        except BaseException as e:  # noqa: BLE001 - e.g. a module __getattr__ raising, or already registered
            self._drop(obj, name)
            return f"{subject} could not be registered: {_describe_exc(e)}"
        problem = self._hook_problem(obj)
        if problem is not None:
            self._drop(obj, name)
            return f"{subject} {problem}"
        return None

    def _drop(self, obj: object, name: str) -> None:
        # pluggy registers hook by hook: a validation error can leave a plugin half-registered
        if self.pm.get_plugin(name) is obj:
            self.pm.unregister(name=name)

    def _detach(self, name: str) -> None:
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)

    def _hook_problem(self, obj: object) -> str | None:
        """What makes ``obj`` (registered with pluggy) unusable as an oqcore plugin, or ``None``."""
        impls = [(hc.name, i) for hc in (self.pm.get_hookcallers(obj) or []) for i in hc.get_hookimpls() if i.plugin is obj]
        if not impls:
            unmarked = sorted(n for n in HOOKS if callable(getattr(obj, n, None)))
            hint = (
                f"; {', '.join(unmarked)} lack(s) the @oqcore.hookimpl marker"
                if unmarked
                else f"; a plugin defines one or more of {', '.join(HOOKS)}, marked @oqcore.hookimpl"
            )
            return f"has no oqcore hook implementations{hint}"
        for hook, impl in sorted(impls, key=lambda x: x[0]):
            if hook not in HOOKS:
                if impl.optionalhook:
                    continue
                return (
                    f"implements {hook!r}, which is not an oqcore hook{_did_you_mean(hook, HOOKS)}; "
                    f"hooks: {', '.join(HOOKS)}"
                )
            if impl.hookwrapper or impl.wrapper:
                return f"makes hook {hook} a wrapper; oqcore calls each plugin's hooks directly, wrappers are not supported"
            if impl.kwargnames:
                return (
                    f"gives hook {hook} default values for {', '.join(impl.kwargnames)}; pluggy never passes "
                    "arguments that have defaults: remove the defaults"
                )
            if hook in REGISTRARS and "register" not in impl.argnames:
                return f"defines hook {hook} without the argument 'register'"
        return None

    # ----------------------------------------------------------------- building

    def _label(self, plugin: str) -> str:
        record = self.records.get(plugin) or next((r for r in self._pending if r.name == plugin), None)
        return record.label if record is not None else repr(plugin)

    def _impls(self, hook: str) -> list:
        """The hook's implementations of loaded plugins, in plugin order."""
        order = {r.name: i for i, r in enumerate(self._all) if r.status == LOADED}
        impls = [i for i in getattr(self.pm.hook, hook).get_hookimpls() if i.plugin_name in order]
        return sorted(impls, key=lambda i: order[i.plugin_name])

    def _changed(self) -> None:
        """The plugin set changed: forget the registry, the candidates, the fatal error and every
        status a hook gave (they are found again by the next build / candidates call)."""
        self._registry = None
        self._candidates.clear()
        self._fatal = None
        for r in self._all:
            if r.hook in HOOKS:
                self._reset(r)

    def _reset(self, r: PluginRecord) -> None:
        r.status, r.error, r.hook = LOADED, None, None
        self._causes.pop(id(r), None)

    def _fail(self, r: PluginRecord, hook: str, where: str, exc: BaseException) -> None:
        r.status, r.hook = FAILED, hook
        r.error = f"plugin {r.label} failed {where}: {_describe_exc(exc)}"
        self._causes[id(r)] = exc
        self._warn(r)

    def _conflict(self, exc: PluginConflictError, hook: str) -> None:
        msg = f"{_describe_exc(exc)} (in hook {hook})"
        for name in getattr(exc, "plugins", ()):
            for r in self._all:
                if r.name == name and r.status in (LOADED, CONFLICT):
                    r.status, r.error, r.hook = CONFLICT, msg, hook
                    self._causes.pop(id(r), None)

    def _warn(self, r: PluginRecord) -> None:
        if not self._strict:
            warnings.warn(
                f"{r.error}; continuing without it ({STRICT_ENV}=1 makes this an error)", PluginWarning, stacklevel=5
            )

    def _build(self) -> None:
        """Run the registration hooks plugin by plugin. A plugin that fails (or clashes) is marked and
        the registry is built again without it, so none of its registrations stay."""
        for r in self._all:
            if r.hook in REGISTRARS:
                self._reset(r)
        while True:
            reg = self._build_once()
            if reg is not None:
                break
        self._fatal = self._compute_fatal()
        self._registry = reg if self._fatal is None else None

    def _build_once(self) -> Registry | None:
        """One pass; ``None`` if a plugin failed or clashed (it is marked: run again)."""
        reg = Registry()
        for hook, make_registrar in REGISTRARS.items():
            for impl in self._impls(hook):
                record = self.records[impl.plugin_name]
                stage = Stage(hook)
                register = make_registrar(reg, impl.plugin_name, stage, self._label)
                try:
                    got = self._run(f"plugin {record.label} (hook {hook})", impl.function, register=register)
                    if got is not None:
                        raise PluginError(
                            f"returned {type(got).__name__}; a registration hook calls register(...) and returns None"
                        )
                    stage.commit()
                except KeyboardInterrupt:
                    raise
                except PluginConflictError as e:
                    # a clash the registrars found names both plugins; anything else is this plugin's failure
                    if impl.plugin_name in getattr(e, "plugins", ()):
                        self._conflict(e, hook)
                    if record.status == LOADED:
                        self._fail(record, hook, f"in hook {hook}", e)
                    return None
                except BaseException as e:  # noqa: BLE001 - contain SystemExit & co: one plugin, not the host
                    self._fail(record, hook, f"in hook {hook}", e)
                    return None
                finally:
                    stage.close()
        return reg

    def _compute_fatal(self) -> _Fatal | None:
        conflicts = [r for r in self._all if r.status == CONFLICT]
        if conflicts:
            return _Fatal(PluginConflictError, _join(r.error for r in conflicts), None)
        if self._strict:
            failed = [r for r in self._all if r.status == FAILED]
            if failed:
                note = (
                    f" [{STRICT_ENV} is set: a failing plugin is an error; fix or uninstall it, disable it with "
                    f"{BLOCK_ENV}, or unset {STRICT_ENV} to continue without it]"
                )
                return _Fatal(PluginError, _join(r.error for r in failed) + note, self._causes.get(id(failed[0])))
        return None

    def _collect_candidates(self, reg: Registry, kind: str, weight_key: QuantKey) -> list[Backend]:
        key_name = reg.key_name(weight_key)
        where = f"in hook {CANDIDATES_HOOK}(kind={kind!r}, weight_key={key_name})"
        # a Scheme's backends (registered with the scheme), then each plugin's hook offers
        out: list[Backend] = list(reg.backends.get((kind, weight_key), []))
        offered: dict[tuple[str, QuantKey | None], str] = {(b.name, b.activation_key): b.plugin for b in out}
        trouble = False
        for impl in self._impls(CANDIDATES_HOOK):
            record = self.records[impl.plugin_name]
            args = {"kind": kind, "weight_key": weight_key}
            try:
                got = self._run(
                    f"plugin {record.label} (hook {CANDIDATES_HOOK})",
                    impl.function,
                    **{a: args[a] for a in impl.argnames},
                )
                backends = check_backends(got, lambda k: reg.name_of(k, "activation"))
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # noqa: BLE001 - contained like a registration hook
                self._fail(record, CANDIDATES_HOOK, where, e)
                trouble = True
                continue
            for b in backends:
                ident = (b.name, b.activation_key)
                other = offered.get(ident)
                if other is not None:
                    err = PluginConflictError(
                        f"backend {b.name!r} (activation {reg.name_of(b.activation_key, 'activation')}) for "
                        f"{kind} {key_name!r} is offered twice: by plugin {self._label(other)} and by plugin "
                        f"{record.label}; pins and ties could not tell them apart"
                    )
                    err.plugins = (other, impl.plugin_name)
                    self._conflict(err, CANDIDATES_HOOK)
                    trouble = True
                offered[ident] = impl.plugin_name
                # the core stamps the provider: a plugin cannot pass its backend off as another's
                out.append(replace(b, plugin=impl.plugin_name))
        if not trouble:
            self._candidates[(kind, weight_key)] = out
            return out
        # A failed or clashing plugin contributes nothing from now on: rebuild without it.
        self._registry = None
        self._candidates.clear()
        self._fatal = self._compute_fatal()
        self._raise_fatal()
        ok = {r.name for r in self._all if r.status == LOADED}
        return [b for b in out if b.plugin in ok]


def _join(messages) -> str:
    unique = list(dict.fromkeys(messages))
    if len(unique) == 1:
        return unique[0]
    return f"{len(unique)} plugin problems: " + " ".join(f"({i}) {m}" for i, m in enumerate(unique, 1))


@dataclass(frozen=True)
class _Found:
    """One entry point of the group and the distribution that declares it."""

    ep: metadata.EntryPoint
    dist: str
    version: str


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dist_label(dist: metadata.Distribution) -> tuple[str, str]:
    """A distribution's name and version, also when its METADATA is unreadable."""
    try:
        name, version = dist.metadata["Name"], dist.version or ""
    except Exception:  # noqa: BLE001 - name it by its folder
        name, version = None, ""
    return name or f"(unnamed distribution at {getattr(dist, '_path', '?')})", version


def _scan_entry_points() -> tuple[list[_Found], list[PluginRecord]]:
    """The ``oqcore`` entry points of every installed distribution (the first of several copies
    of one distribution on ``sys.path`` wins, as for imports), and a failed record for each
    distribution whose ``entry_points.txt`` declares the group but cannot be parsed (one broken
    file would otherwise make :func:`importlib.metadata.entry_points` raise for every package)."""
    found: list[_Found] = []
    unreadable: list[PluginRecord] = []
    seen: set[str] = set()
    for dist in metadata.distributions():
        # the folder-derived name when there is one (as importlib does): parsing every METADATA is slow
        key = getattr(dist, "_normalized_name", None) or _normalized(_dist_label(dist)[0])
        if key in seen:
            continue
        seen.add(key)
        try:
            eps = dist.entry_points.select(group=ENTRY_POINT_GROUP)
        except Exception as e:  # noqa: BLE001 - a malformed entry_points.txt
            try:
                text = dist.read_text("entry_points.txt") or ""
            except Exception:  # noqa: BLE001
                text = ""
            if f"[{ENTRY_POINT_GROUP}]" in text.replace(" ", ""):
                name, version = _dist_label(dist)
                record = PluginRecord(f"<{name}>", name, version, "entry_points.txt", FAILED, hook=AT_ENTRY_POINT)
                record.error = (
                    f"plugin entry points of distribution {name} {version} cannot be read: entry_points.txt is "
                    f"malformed ({_describe_exc(e)}); none of its {ENTRY_POINT_GROUP!r} entry points is loaded"
                )
                unreadable.append(record)
            continue
        if eps:
            name, version = _dist_label(dist)
            found += [_Found(ep, name, version) for ep in eps]
    return found, unreadable


_manager: OqPluginManager | None = None
_manager_lock = threading.Lock()


def get_plugin_manager() -> OqPluginManager:
    """The process-wide plugin manager (entry points are loaded on first registry access)."""
    global _manager
    manager = _manager
    if manager is not None:
        return manager
    with _manager_lock:
        if _manager is None:
            _manager = OqPluginManager()
        return _manager


def reset_plugin_manager() -> None:
    """Forget every plugin, record and remembered error; the next call rediscovers the entry points
    and reads the environment again. Modules already imported stay imported (not re-executed);
    a thread still working with the old manager finishes with it."""
    global _manager
    with _manager_lock:
        _manager = None


def get_registry() -> Registry:
    """Shortcut for ``get_plugin_manager().registry``."""
    return get_plugin_manager().registry
