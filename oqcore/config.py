"""QuantSpec and QuantizationConfig: the declarative config, validated by pydantic.

The same dict a vLLM user writes for ``quantization_config`` is accepted, with the same meaning::

    {"linear": "fp8_per_block", "moe": {"weight": "mxfp8", "activation": "mxfp8"}, "ignore": ["lm_head"]}

plus ``scheme`` / ``quantization`` (a top-level shorthand, vLLM's ``--quantization``; the value
``online`` means "as the other fields say"), ``targets`` (per-layer specs by pattern) and
``backend`` (pin a backend per kind). YAML / JSON files and OmegaConf-style dotlist overrides
(``moe.activation=mxfp8``, ``linear.activation=null``) are merged before validation, see
:meth:`QuantizationConfig.from_any`.

Every failure is an :class:`oqcore.ConfigError` (or its subclass :class:`oqcore.UnknownKeyError`)
whose ``field`` is the dotted path of the first field at fault and whose ``errors`` lists every
problem found, each with its path.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from oqcore.errors import ConfigError, PluginError, UnknownKeyError
from oqcore.errors import did_you_mean as _did_you_mean
from oqcore.errors import field_names as _field_names
from oqcore.errors import from_validation_error as _convert
from oqcore.errors import short_repr as _short
from oqcore.formats import QuantizerImpl
from oqcore.keys import QuantKey
from oqcore.kinds import KINDS
from oqcore.methods import MethodFormats
from oqcore.oracle import Backend
from oqcore.plugins import Registry, get_plugin_manager, get_registry

#: vLLM's ``--quantization`` value meaning "use quantization_config as given" (no shorthand).
ONLINE = "online"


@dataclass
class _Validation:
    """One QuantizationConfig validation: the registry it resolves names against and every slot it
    bound (kept so the resolution is done once, see :func:`resolve`)."""

    registry: Registry
    kinds: dict[str, BoundSpec] = field(default_factory=dict)
    targets: dict[str, dict[str, BoundSpec | ConfigError]] = field(default_factory=dict)
    overlay: bool = False  # an activation-only kind spec was seen: resolved (and refused) at plan time


_ACTIVE: ContextVar[_Validation | None] = ContextVar("oqcore_config_validation", default=None)


@contextmanager
def _validating(registry: Registry | None):
    active = _ACTIVE.get()
    if active is not None and (registry is None or registry is active.registry):
        # pydantic runs a model with a custom __init__ through __init__ from model_validate: one
        # validation, one session
        yield
        return
    token = _ACTIVE.set(_Validation(registry if registry is not None else get_registry()))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _registry() -> Registry:
    """The registry names are resolved against: the one the current config validation was given
    (``context={"registry": reg}``), else the process registry. The only place validators get it."""
    active = _ACTIVE.get()
    return active.registry if active is not None else get_registry()


def _is_none_word(v: Any) -> bool:
    return isinstance(v, str) and v.strip().lower() in ("none", "null")


class _OqModel(BaseModel):
    """pydantic base whose validation errors surface as :class:`oqcore.ConfigError`."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise _convert(e, model=type(self)) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any):
        """pydantic's ``model_validate``, raising :class:`oqcore.ConfigError` with the field paths."""
        if isinstance(obj, Mapping):
            bad = [k for k in obj if not isinstance(k, str)]
            if bad:  # pydantic-core raises a bare TypeError for these before any validator runs
                raise ConfigError(f"field names must be strings, got {_short(bad[0])}; valid fields: {', '.join(_field_names(cls))}")
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as e:
            raise _convert(e, model=cls) from None
        except RecursionError:
            raise ConfigError("the config is nested too deeply") from None


def _key_value(v: Any, role: str) -> Any:
    """A key name resolved in ``role``, a QuantKey passed through, or a ConfigError for anything else."""
    if isinstance(v, QuantKey):
        return v
    if isinstance(v, str):
        return _registry().resolve_key(v, role)  # type: ignore[arg-type]
    raise ConfigError(
        f"expected a {role} key name (a string such as {'fp8_per_block_static' if role == 'weight' else 'fp8_per_token'!r}), "
        f"got {type(v).__name__} {_short(v)}"
    )


_OMITTED = object()
"""Marks the weight of an activation-only spec while it is validated."""


class QuantSpec(_OqModel):
    """What one layer (or kind of layer) is quantized to.

    - ``weight``: a :class:`QuantKey` or a registered weight key name (``"fp8_per_block_static"``).
      **Omitted** with an ``activation`` given, the spec is activation-only (vLLM's override of an
      already-quantized checkpoint, PR 41566: ``moe: {activation: mxfp8}`` keeps the stored weights
      and serves them with that activation); binding it to a layer that is not stored quantized is
      a :class:`oqcore.ConfigError` (a weight key is needed to quantize).
    - ``activation``: a key or name; **omitted** means "the method's default" (see
      :attr:`activation_given`), an explicit ``None`` / ``null`` means "no activation
      quantization" (weight-only).
    - ``options``: method-specific knobs, validated by the method's own pydantic ``options_model``
      when the spec is bound to a kind (e.g. ``{"scale_mode": "floor"}`` for mxfp8).

    ``str(spec)`` is vLLM's: the weight key name alone (``"mxfp8"``) when nothing else is set, else
    compact JSON of the fields given (``{"weight":"mxfp8","activation":null}``).

    Raises :class:`oqcore.UnknownKeyError` for unknown names, :class:`oqcore.ConfigError` otherwise.
    """

    weight: QuantKey | None  # required; None only for an activation-only spec (see _activation_only)
    activation: QuantKey | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _activation_only(cls, data: Any) -> Any:
        # an omitted weight stays a "missing" error unless an activation is given: then the spec is
        # an activation-only overlay (the marker lets the weight validator tell it from weight: null)
        if isinstance(data, Mapping) and "weight" not in data and "activation" in data:
            return {**data, "weight": _OMITTED}
        return data

    @model_validator(mode="after")
    def _overlay_options(self) -> QuantSpec:
        if self.weight is None and self.options:
            raise ConfigError(
                "options belong to a weight key: an activation-only spec keeps the checkpoint's weights as stored",
                "options",
            )
        return self

    @field_validator("weight", mode="before")
    @classmethod
    def _weight(cls, v: Any) -> Any:
        if v is _OMITTED:
            return None
        if v is None or _is_none_word(v):
            raise ConfigError(
                "a weight key is required here (to leave a kind unquantized, set linear/moe: {weight: null} "
                "or leave it out; to skip layers, use ignore)"
            )
        return _key_value(v, "weight")

    @field_validator("activation", mode="before")
    @classmethod
    def _activation(cls, v: Any) -> Any:
        if v is None or _is_none_word(v):
            return None
        return _key_value(v, "activation")

    @field_validator("options", mode="before")
    @classmethod
    def _options(cls, v: Any) -> Any:
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            raise ConfigError(f"expected a mapping of option names to values, got {type(v).__name__} {_short(v)}")
        bad = [k for k in v if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"option names must be strings, got {_short(bad[0])}")
        return dict(v)

    @property
    def activation_only(self) -> bool:
        """True for an activation-only spec (``weight`` omitted): an override of an
        already-quantized checkpoint's activation, see the class docstring."""
        return self.weight is None

    @property
    def activation_given(self) -> bool:
        """True when ``activation`` was set explicitly (to a key or to ``None``)."""
        return "activation" in self.model_fields_set

    @field_serializer("weight")
    def _ser_weight(self, k: QuantKey | None) -> str | None:
        return None if k is None else _registry().name_of(k, "weight")

    @field_serializer("activation")
    def _ser_activation(self, k: QuantKey | None) -> str | None:
        return None if k is None else _registry().name_of(k, "activation")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with key names (``activation`` only when given), fit for YAML/JSON."""
        d = self.model_dump(exclude_unset=True)
        if d.get("weight", "") is None:  # activation-only
            del d["weight"]
        if not d.get("options"):
            d.pop("options", None)
        return d

    def __str__(self) -> str:
        return spec_str(self.to_dict())

    # pydantic compares field values only, but an omitted activation (the method's default) and an
    # explicit null (weight-only) are different specs.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantSpec):
            return NotImplemented
        return super().__eq__(other) and self.activation_given == other.activation_given

    def __hash__(self) -> int:
        return hash((self.weight, self.activation, self.activation_given, json.dumps(self.options, sort_keys=True, default=str)))


def spec_str(spec: Any) -> str:
    """vLLM's text for a spec: the weight name alone when only ``weight`` is set, else compact JSON.

    ``spec`` is a :class:`QuantSpec`, a mapping (names or keys) or a bare name.
    """
    if isinstance(spec, QuantSpec):
        return str(spec)
    if isinstance(spec, QuantKey):
        return _registry().name_of(spec, "weight")
    if not isinstance(spec, Mapping):
        return str(spec)
    d = _jsonable_spec(spec)
    if set(d) == {"weight"} and isinstance(d["weight"], str):
        return d["weight"]
    return json.dumps(d, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class BoundSpec:
    """A spec bound to a layer kind: the method class, resolved activation key and validated options."""

    kind: str
    spec: QuantSpec
    method_cls: type
    activation_key: QuantKey | None
    options: BaseModel
    method_plugin: str
    formats: MethodFormats | None = None

    def make_method(self, backend: Backend, *, activation_key: Any = ..., quantizer: QuantizerImpl | None = None):
        """A method instance for one layer: this spec's class with its activation key (or
        ``activation_key``), options and formats, the forward ``backend`` and the planned
        ``quantizer`` implementation (``None``: the oracle's choice per tensor)."""
        act = self.activation_key if activation_key is ... else activation_key
        formats = self.formats
        if formats is not None and act != self.activation_key:
            formats = get_registry().method_formats(self.spec.weight, act)
        return self.method_cls(activation_key=act, options=self.options, backend=backend, formats=formats, quantizer=quantizer)


def _spec_mapping(value: Any, kind: str | None, reg: Registry) -> dict[str, Any]:
    """Normalize a slot value to a mapping and expand a shorthand name in ``weight`` for ``kind``.

    Explicit fields win over the shorthand's (vLLM's merge rule).
    """
    if isinstance(value, QuantSpec):
        return {k: getattr(value, k) for k in value.model_fields_set if not (k == "weight" and value.activation_only)}
    if isinstance(value, (str, QuantKey)):
        value = {"weight": value}
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"expected a key name, a shorthand or a mapping with 'weight', got {type(value).__name__} {_short(value)}"
        )
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"field names must be strings, got {_short(bad[0])}; valid fields: weight, activation, options")
    m = dict(value)
    w = m.get("weight")
    if isinstance(w, str) and not _is_none_word(w) and w not in reg.shorthands and reg.keys.get(w) is None:
        valid = set(reg.keys.names("weight")) | set(reg.shorthands)
        raise UnknownKeyError.for_name(w, valid, "weight key or shorthand", "weight")
    if isinstance(w, str) and w in reg.shorthands and kind is not None:
        sh = reg.shorthands[w]
        slot = sh.slot(kind)
        if slot is None:
            defined = [k for k in KINDS if sh.slot(k) is not None]
            raise ConfigError(
                f"shorthand {w!r} defines no {kind} spec (it defines: {', '.join(defined)}); "
                f"give {kind} an explicit weight key instead",
                "weight",
            )
        m = {**slot, **{k: v for k, v in m.items() if k != "weight"}}
    return m


def bind_spec(value: Any, kind: str, reg: Registry | None = None) -> BoundSpec:
    """Resolve a slot value (key name, shorthand, mapping or :class:`QuantSpec`) for ``kind``.

    Checks that a method exists for ``(kind, weight)``, that it supports the activation key, and
    validates ``options`` with the method's options model. Raises :class:`oqcore.ConfigError` with
    a field path relative to the slot (``weight``, ``activation``, ``options.scale_mode``).
    """
    reg = reg or _registry()
    spec = QuantSpec.model_validate(_spec_mapping(value, kind, reg))
    if spec.activation_only:
        raise ConfigError(
            f"{kind}: {spec} gives an activation but no weight key: an activation-only spec overrides the activation "
            f"of {kind} layers a checkpoint stores already quantized; to quantize {kind} layers of a high-precision "
            f"checkpoint a weight key is needed (weight keys with a {kind} method: "
            f"{', '.join(reg.method_weight_names(kind)) or '(none)'})",
            "weight",
        )
    entry = reg.method(kind, spec.weight)
    if entry is None:
        valid = ", ".join(reg.method_weight_names(kind)) or "(none: is a scheme plugin installed?)"
        raise ConfigError(
            f"no {kind} method quantizes weights to {reg.name_of(spec.weight)!r}; weight keys with a {kind} "
            f"method: {valid}",
            "weight",
        )
    cls = entry.cls
    act = spec.activation if spec.activation_given else cls.default_activation_key
    if act not in cls.supported_activation_keys:
        valid = ", ".join(reg.name_of(k, "activation") for k in cls.supported_activation_keys)
        raise ConfigError(
            f"{cls.__name__} ({kind}, weight {reg.name_of(spec.weight)}) does not support activation "
            f"{reg.name_of(act, 'activation')}; supported: {valid}",
            "activation",
        )
    try:
        options = cls.options_model.model_validate(spec.options)
    except ValidationError as e:
        raise _convert(e, "options", cls.options_model) from None
    except ConfigError as e:
        raise e.at("options") from None
    except Exception as e:  # a plugin's options model failing in its own way still names the field
        raise ConfigError(f"{cls.__name__} rejected the options: {type(e).__name__}: {e}", "options") from None
    try:
        formats = reg.method_formats(spec.weight, act)
    except PluginError:
        formats = None  # a v1 plugin registered the method without a quantizer: an error when it quantizes
    return BoundSpec(kind, spec, cls, act, options, entry.plugin, formats)


def _normalize_slot(v: Any) -> Any:
    """A string (or key) slot becomes ``{"weight": s}``, a QuantSpec the mapping of its given
    fields, so overrides can set one field of it."""
    if isinstance(v, (str, QuantKey)):
        return {"weight": v}
    if isinstance(v, QuantSpec):
        return {k: getattr(v, k) for k in v.model_fields_set}
    return v


def _normalize_for_override(path: tuple[str, ...], v: Any) -> Any:
    """Before an override descends into ``path``: slots (``linear``, ``moe``, ``targets.<p>``)
    given as a name become mappings; a config object becomes its dict."""
    if isinstance(v, QuantizationConfig):
        return v.to_dict()
    if (len(path) == 1 and path[0] in KINDS) or (len(path) == 2 and path[0] == "targets"):
        return _normalize_slot(v)
    return v


def _weight_is_null(slot: Any) -> bool:
    return isinstance(slot, Mapping) and "weight" in slot and (slot["weight"] is None or _is_none_word(slot["weight"]))


class QuantizationConfig(_OqModel):
    """The whole config: which spec each layer kind or named layer gets. Same meaning as vLLM's.

    Fields:

    - ``scheme``: a shorthand filling ``linear`` and ``moe`` (alias ``quantization``, vLLM's
      ``--quantization``; the value ``online`` means "no shorthand: as the other fields say").
      Explicit ``linear`` / ``moe`` fields win; a slot mapping without ``weight`` is merged over
      the shorthand's; a slot set to ``null`` falls back to the shorthand's (vLLM's rule).
    - ``linear``, ``moe``: a shorthand name, a key name or a spec mapping, bound at validation to
      the method that implements it (so errors show up here, not at load time). ``{weight: null}``
      leaves that kind unquantized (vLLM's way to quantize only the MoE experts of a shorthand).
    - ``ignore``: layer-name patterns kept in high precision: exact names, ``re:`` regexes matched
      from the start of the name (Python ``re.match``, as vLLM and compressed-tensors do:
      ``re:.*mlp`` matches ``model.layers.0.mlp.gate``), or fnmatch globs (``model.layers.*.mlp.gate``).
    - ``targets``: ``pattern -> spec`` for per-layer schemes (patterns as for ``ignore``); mutually
      exclusive with ``scheme``/``linear``/``moe``; resolved per layer kind at plan time.
    - ``backend``: ``{"linear": "triton"}`` pins a backend per kind; checked at validation against
      the backends the plugins offer for the configured weight keys.

    A config must quantize something (a shorthand, ``linear``, ``moe`` or ``targets``), as in vLLM;
    :meth:`none` is the explicit "quantize nothing" for callers that load without quantizing.

    Build with ``QuantizationConfig(**fields)``, :meth:`model_validate`, :meth:`from_any`,
    :meth:`from_yaml` or :meth:`from_dotlist`. Raises :class:`oqcore.ConfigError` (every problem
    listed in ``.errors`` with its field path).
    """

    KINDS: ClassVar[tuple[str, ...]] = KINDS
    FIELD_ALIASES: ClassVar[dict[str, str]] = {"quantization": "scheme"}

    def __init__(self, /, **data: Any) -> None:
        with _validating(None):
            super().__init__(**data)

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any):
        """Validate ``obj`` (raising :class:`oqcore.ConfigError` with field paths), resolving names
        against ``context={"registry": reg}`` when given, else the process registry."""
        context = kwargs.get("context") or {}
        with _validating(context.get("registry") if isinstance(context, Mapping) else None):
            return super().model_validate(obj, **kwargs)

    scheme: StrictStr | None = None
    linear: QuantSpec | None = None
    moe: QuantSpec | None = None
    ignore: list[StrictStr] = Field(default_factory=list)
    targets: dict[str, Any] = Field(default_factory=dict)
    backend: dict[StrictStr, StrictStr] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _merge_scheme(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        bad = [k for k in data if not isinstance(k, str)]
        if bad:
            valid = ", ".join(_field_names(cls))
            raise ConfigError(f"field names must be strings, got {_short(bad[0])}; valid fields: {valid}")
        data = dict(data)
        field = "scheme"
        if "quantization" in data:
            if "scheme" in data:
                raise ConfigError("give either scheme or its alias quantization, not both", "quantization")
            field = "quantization"
            data["scheme"] = data.pop("quantization")
        scheme = data.get("scheme")
        if scheme is not None and not isinstance(scheme, str):
            raise ConfigError(f"expected a shorthand name or 'online', got {type(scheme).__name__} {_short(scheme)}", field)
        if scheme == ONLINE:
            scheme = data["scheme"] = None
        reg = _registry()
        if scheme is not None and scheme not in reg.shorthands:
            raise UnknownKeyError.for_name(scheme, [*reg.shorthands, ONLINE], "shorthand", field)
        sh = reg.shorthands[scheme] if scheme is not None else None
        for kind in KINDS:
            if kind not in data:
                if sh is not None:
                    base = sh.slot(kind)
                    data[kind] = dict(base) if base is not None else None
                continue
            explicit = _normalize_slot(data[kind])
            if explicit is None and sh is not None:  # vLLM: `linear or base.linear`
                base = sh.slot(kind)
                explicit = dict(base) if base is not None else None
            elif _weight_is_null(explicit):
                extra = [k for k, v in explicit.items() if k != "weight" and v is not None and not _is_none_word(v)]
                if extra:
                    raise ConfigError(
                        f"weight: null leaves {kind} layers unquantized, so {extra[0]} has no meaning; remove it",
                        f"{kind}.{extra[0]}",
                    )
                explicit = None
            elif sh is not None and isinstance(explicit, Mapping) and "weight" not in explicit:
                base = sh.slot(kind)
                if base is None:
                    raise ConfigError(f"shorthand {scheme!r} defines no {kind} spec to merge into; give a weight", kind)
                explicit = {**base, **explicit}
            data[kind] = explicit
        return data

    @field_validator("linear", "moe", mode="before")
    @classmethod
    def _bind(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None:
            return None
        reg = _registry()
        spec = QuantSpec.model_validate(_spec_mapping(v, info.field_name, reg))
        if spec.activation_only:  # valid as an overlay; bound (and refused) only where a layer needs a weight
            active = _ACTIVE.get()
            if active is not None:
                active.overlay = True
            return spec
        bound = bind_spec(spec, info.field_name, reg)
        active = _ACTIVE.get()
        if active is not None:
            active.kinds[info.field_name] = bound
        return bound.spec

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            raise ConfigError(f"expected a mapping of layer patterns to specs, got {type(v).__name__} {_short(v)}")
        reg = _registry()
        active = _ACTIVE.get()
        out: dict[str, Any] = {}
        problems: list[ConfigError] = []
        for pattern, spec in v.items():
            where = f"[{_short(pattern, 120)}]"
            try:
                check_pattern(pattern, where)
            except ConfigError as e:
                problems.append(e)
                continue
            if spec is None or _weight_is_null(spec):
                problems.append(ConfigError("a target needs a weight key (to keep layers in high precision, use ignore)", where))
                continue
            # A target may be bound to either kind (resolved per layer at plan time); reject it now
            # only if it can serve neither.
            errors: list[ConfigError] = []
            bound: dict[str, BoundSpec | ConfigError] = {}
            for kind in KINDS:
                try:
                    bound[kind] = bind_spec(spec, kind, reg)
                except ConfigError as e:
                    errors.append(e)
                    bound[kind] = e
            if len(errors) == len(KINDS):
                problems.append(errors[0].at(where))
                continue
            if active is not None:
                active.targets[pattern] = bound
            out[pattern] = _normalize_slot(spec) if not isinstance(spec, QuantSpec) else spec
        _raise_all(problems)
        return out

    @field_validator("ignore", mode="before")
    @classmethod
    def _ignore_type(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, (str, bytes, Mapping)) or not isinstance(v, (list, tuple)):
            raise ConfigError(f"expected a list of layer patterns, got {type(v).__name__} {_short(v)}")
        problems: list[ConfigError] = []
        for i, pattern in enumerate(v):  # every entry checked, so each bad one is reported
            try:
                check_pattern(pattern, f"[{i}]")
            except ConfigError as e:
                problems.append(e)
        _raise_all(problems)
        return list(v)

    @field_validator("backend", mode="before")
    @classmethod
    def _backend_type(cls, v: Any) -> Any:
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            raise ConfigError(f"expected a mapping of layer kinds to backend names, got {type(v).__name__} {_short(v)}")
        return v

    @field_validator("backend", mode="after")
    @classmethod
    def _backend(cls, v: dict[str, str]) -> dict[str, str]:
        _raise_all([ConfigError(f"unknown layer kind {kind!r}; kinds: {', '.join(KINDS)}", kind) for kind in v if kind not in KINDS])
        return v

    @model_validator(mode="after")
    def _whole(self) -> QuantizationConfig:
        if self.targets and (self.linear is not None or self.moe is not None or self.scheme is not None):
            raise ConfigError("targets and scheme/linear/moe are mutually exclusive; use one or the other", "targets")
        if self.linear is None and self.moe is None and not self.targets:
            raise ConfigError(
                "the config quantizes nothing: give a shorthand (scheme / quantization), linear, moe or targets "
                "(as in vLLM, a config with none of them is an error)"
            )
        active = _ACTIVE.get()
        if active is not None and not active.overlay:  # every slot was bound once, above: that is the resolution
            _remember(ResolvedConfig(self, active.registry, dict(active.kinds), dict(active.targets)))
        self._check_backend_pins()
        return self

    def _check_backend_pins(self) -> None:
        if not self.backend:
            return
        if any(spec is not None and spec.activation_only for spec in map(self.spec_for, KINDS)):
            # an overlay: the weight keys come from the checkpoint, and the config the overlay
            # resolves to (oqcore.loading.overlay) checks the pins against them
            return
        pm = get_plugin_manager()
        resolved = resolve(self, _registry())
        reg = resolved.registry
        problems: list[ConfigError] = []
        for kind, pinned in self.backend.items():
            weights = resolved.weight_keys(kind)
            if not weights:
                problems.append(
                    ConfigError(f"the config quantizes no {kind} layers, so there is nothing to pin; remove this pin", f"backend.{kind}")
                )
                continue
            names: set[str] = set()
            for w in weights:
                names.update(b.name for b in pm.backend_candidates(kind, w))
            if pinned not in names:
                wnames = ", ".join(sorted(reg.name_of(w, "weight") for w in weights))
                valid = ", ".join(sorted(names)) or "(none offered)"
                problems.append(
                    ConfigError(
                        f"unknown backend {pinned!r} for {kind} layers with weight {wnames}"
                        f"{_did_you_mean(pinned, names) or ';'} valid backends: {valid}",
                        f"backend.{kind}",
                    )
                )
        _raise_all(problems)

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def none(cls) -> QuantizationConfig:
        """The config that quantizes nothing, **not validated** (validation refuses an empty config,
        as vLLM does). For internal callers that load or plan a model without quantizing it: every
        layer is then kept in high precision ("no linear spec in the config")."""
        return cls.model_construct()

    @classmethod
    def from_any(
        cls,
        obj: QuantizationConfig | Mapping[str, Any] | str | Path | None,
        overrides: Iterable[str] = (),
        *,
        interpolate: bool = False,
    ) -> QuantizationConfig:
        """Build a config from ``obj`` and apply dotlist ``overrides`` on top, in order.

        ``obj`` is one of:

        - a :class:`QuantizationConfig` (returned as is when there are no overrides);
        - a mapping (the vLLM ``quantization_config`` dict);
        - a path to a YAML or JSON file (a :class:`~pathlib.Path`, or a string naming an existing file);
        - a shorthand name (``"fp8_per_block"``: fills linear and/or moe as the shorthand says), or
          ``"online"`` (nothing: the overrides say it all);
        - a weight key name (``"fp8_per_block_static"``, ``"mxfp8"``): every kind that has a method
          for that key gets it;
        - ``None``: the overrides alone.

        ``overrides`` are ``dotted.key=value`` strings (value parsed as YAML). Each one *sets* its
        path: with base shorthand X, ``linear.activation=null`` merges into X's linear spec,
        ``moe=mxfp8`` replaces only moe (X's linear stays), and ``linear=Y linear.activation=null``
        keeps Y (a name in a slot becomes ``{weight: name}`` before the next override descends into
        it). ``interpolate=True`` resolves OmegaConf interpolations (``${oc.env:HOME}``,
        ``${linear.weight}``) after the overrides; off (the default), such text stays literal.

        Raises :class:`oqcore.ConfigError` (naming the file, the override or the field): a string
        that is neither an existing file nor a registered shorthand / weight key name says so, with
        a did-you-mean.
        """
        from oqcore import config_io

        overrides = config_io._override_list(overrides)
        if isinstance(obj, QuantizationConfig) and not overrides:
            return obj
        base, source = cls._base_of(obj)
        try:
            data = config_io.apply_overrides(base, overrides, _normalize_for_override)
            return cls._validate_text(data, interpolate)
        except ConfigError as e:
            if source is None:
                raise
            # the field paths are inside the file (or its overrides): say which file
            raise _with_note(e, f"(config file {source!r})") from None

    @classmethod
    def _base_of(cls, obj: Any) -> tuple[dict[str, Any], str | None]:
        """The data ``obj`` stands for, and the file it came from (``None`` if none)."""
        from oqcore import config_io

        if obj is None:
            return {}, None
        if isinstance(obj, QuantizationConfig):
            return obj._as_data(), None
        if isinstance(obj, Mapping):
            return dict(obj), None
        if isinstance(obj, Path):
            return _not_model_config(config_io.read_config_file(obj), str(obj)), str(obj)
        if not isinstance(obj, str):
            raise ConfigError(
                f"expected a config: a mapping, a YAML/JSON file path, a shorthand or key name, got {type(obj).__name__} {_short(obj)}"
            )
        p = Path(obj)
        try:
            is_file = p.exists() and not p.is_dir()  # pipes and devices too: read_config_file refuses them by name
        except (OSError, ValueError):  # a name too long or with NUL bytes is no file
            is_file = False
        if is_file:
            return _not_model_config(config_io.read_config_file(p), obj), obj
        reg = get_registry()
        if obj == ONLINE:
            return {"quantization": ONLINE}, None
        if obj in reg.shorthands:
            return {"scheme": obj}, None
        info = reg.keys.get(obj)
        if info is not None:
            return {kind: {"weight": obj} for kind in _kinds_for_key(obj, reg)}, None
        # checked after the names, so a folder that happens to be named like a shorthand never shadows it
        try:
            is_dir = p.is_dir()
        except (OSError, ValueError):
            is_dir = False
        if is_dir:
            raise ConfigError(
                f"config {_short(obj)} is a folder, not a YAML/JSON config file or a shorthand/key name "
                "(a model folder goes to --model / oqcore.load's path)"
            )
        if p.suffix.lower() in (".yaml", ".yml", ".json") or "/" in obj or "\\" in obj:
            raise ConfigError(f"config {_short(obj, 200)} is neither a file (no such file) nor a shorthand or weight key name")
        names = sorted({*reg.shorthands, *reg.keys.names("weight"), ONLINE})
        raise ConfigError(
            f"config {_short(obj)} is neither a file nor a shorthand or weight key name{_did_you_mean(obj, names)}; "
            f"shorthands: {', '.join(sorted(reg.shorthands)) or '(none)'}; weight keys: "
            f"{', '.join(reg.keys.names('weight')) or '(none)'}"
        )

    def _as_data(self) -> dict[str, Any]:
        """The fields as data for a re-validation with overrides (keys kept as QuantKey objects)."""
        out: dict[str, Any] = {}
        for kind in KINDS:
            spec = self.spec_for(kind)
            if spec is not None:
                out[kind] = _normalize_slot(spec)
        if self.ignore:
            out["ignore"] = list(self.ignore)
        if self.targets:
            out["targets"] = {p: _normalize_slot(s) for p, s in self.targets.items()}
        if self.backend:
            out["backend"] = dict(self.backend)
        return out

    @classmethod
    def _validate_text(cls, data: dict[str, Any], interpolate: bool) -> QuantizationConfig:
        from oqcore import config_io

        if interpolate:
            # `${linear.weight}` must work when linear was given as a bare name
            data = {k: _normalize_for_override((k,), v) if k in KINDS else v for k, v in data.items()}
            if isinstance(data.get("targets"), Mapping):
                data["targets"] = {p: _normalize_slot(s) for p, s in data["targets"].items()}
            data = config_io.interpolate(data)
        try:
            return cls.model_validate(data)
        except ConfigError as e:
            if not interpolate and config_io.has_interpolation(data):
                raise _with_note(e, "(interpolation such as ${...} is off: pass interpolate=True to resolve it)") from None
            raise

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Iterable[str] = (), *, interpolate: bool = False) -> QuantizationConfig:
        """Load a YAML (or ``.json``) file and apply dotlist ``overrides`` on top (see :meth:`from_any`).

        Raises :class:`oqcore.ConfigError` naming the file when it is missing, unreadable, not
        valid YAML/JSON or not a mapping, and naming the field or override otherwise.
        """
        if not isinstance(path, (str, Path)):
            raise ConfigError(f"expected a config file path, got {type(path).__name__} {_short(path)}")
        return cls.from_any(Path(path), overrides, interpolate=interpolate)

    @classmethod
    def from_dotlist(
        cls,
        overrides: Iterable[str],
        base: QuantizationConfig | Mapping[str, Any] | str | Path | None = None,
        *,
        interpolate: bool = False,
    ) -> QuantizationConfig:
        """Apply dotlist ``overrides`` (``["moe.activation=mxfp8", "ignore=[lm_head]"]``) to ``base``
        (anything :meth:`from_any` takes; default nothing) and validate."""
        return cls.from_any(base, overrides, interpolate=interpolate)

    # ---- views --------------------------------------------------------------------------------

    def spec_for(self, kind: str) -> QuantSpec | None:
        """The kind-wide spec (``linear`` / ``moe``), or ``None``."""
        return getattr(self, kind)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (key names), fit for YAML/JSON and for :meth:`model_validate` round trips."""
        out: dict[str, Any] = {}
        for kind in KINDS:
            spec = self.spec_for(kind)
            if spec is not None:
                out[kind] = spec.to_dict()
        if self.ignore:
            out["ignore"] = list(self.ignore)
        if self.targets:
            out["targets"] = {
                p: (s.to_dict() if isinstance(s, QuantSpec) else _jsonable_spec(s)) for p, s in self.targets.items()
            }
        if self.backend:
            out["backend"] = dict(self.backend)
        return out


_MODEL_CONFIG_KEYS = ("model_type", "architectures")


def _not_model_config(data: dict[str, Any], source: str) -> dict[str, Any]:
    """``data`` unchanged, unless it is a model's ``config.json`` (``model_type`` /
    ``architectures``) given where a quantization config goes: one clear ConfigError then, not one
    'unknown field' per model setting."""
    if any(k in data for k in _MODEL_CONFIG_KEYS) and not any(k in data for k in QuantizationConfig.model_fields):
        hint = (
            "; its 'quantization_config' entry is read when the folder is loaded (give the folder as the model)"
            if "quantization_config" in data
            else ""
        )
        raise ConfigError(
            f"config file {source!r} is a model's config.json (it has {', '.join(k for k in _MODEL_CONFIG_KEYS if k in data)}), "
            f"not a quantization config (fields: {', '.join(_field_names(QuantizationConfig))}){hint}"
        )
    return data


def _kinds_for_key(name: str, reg: Registry) -> list[str]:
    """The kinds with a method for weight key ``name``; a ConfigError when there are none."""
    info = reg.keys.get(name)
    assert info is not None
    if info.weight is None:
        raise ConfigError(
            f"{name!r} is an activation key, not a weight key; weight keys: {', '.join(reg.keys.names('weight'))}"
        )
    kinds = [kind for kind in KINDS if reg.method(kind, info.weight) is not None]
    if not kinds:
        raise ConfigError(f"no method quantizes weights to {name!r} (no installed plugin implements it for linear or moe)")
    return kinds


def _with_note(e: ConfigError, note: str) -> ConfigError:
    """A copy of ``e`` (same type and fields) with ``note`` appended to every message."""
    errors = [(f, f"{m} {note}") for f, m in e.errors]
    return type(e)(f"{e.reason} {note}", e.field, errors=errors if len(errors) > 1 else None)


def _raise_all(problems: list[ConfigError]) -> None:
    """Raise the one problem, or one ConfigError listing them all."""
    if not problems:
        return
    if len(problems) == 1:
        raise problems[0]
    pairs = [pair for p in problems for pair in p.errors]
    raise ConfigError(pairs[0][1], pairs[0][0], errors=pairs)


def _jsonable_spec(m: Mapping[str, Any]) -> dict[str, Any]:
    reg = _registry()
    out = dict(m)
    for role in ("weight", "activation"):
        if isinstance(out.get(role), QuantKey):
            out[role] = reg.name_of(out[role], role)
    if "options" in out and not out["options"]:
        out.pop("options")
    return out


def check_pattern(pattern: Any, field: str) -> None:
    """Validate one ``ignore`` / ``targets`` pattern: a non-empty string, and for ``re:`` a regex
    that compiles. Raises :class:`oqcore.ConfigError` at ``field``."""
    import re

    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"a layer pattern must be a non-empty string, got {type(pattern).__name__} {_short(pattern)}", field)
    if pattern.startswith("re:"):
        if not pattern[3:]:
            # an empty regex matches every layer (re.match), almost surely a slip: make it explicit
            raise ConfigError("'re:' holds no regular expression; write re:.* to match every layer", field)
        try:
            re.compile(pattern[3:])
        except (re.error, RecursionError, OverflowError) as e:
            raise ConfigError(f"invalid regular expression {_short(pattern[3:], 120)}: {e}", field) from None


@dataclass(frozen=True)
class ResolvedConfig:
    """A config resolved against one plugin registry: every slot bound once to its method.

    ``kinds``: kind -> :class:`BoundSpec` for the kind-wide specs the config has; ``targets``:
    pattern -> kind -> :class:`BoundSpec`, or the :class:`oqcore.ConfigError` saying why the target
    cannot serve that kind (a target is bound per layer kind; it must serve at least one).
    """

    config: QuantizationConfig
    registry: Registry
    kinds: Mapping[str, BoundSpec]
    targets: Mapping[str, Mapping[str, BoundSpec | ConfigError]]

    def kind(self, kind: str) -> BoundSpec | None:
        """The kind-wide bound spec, or ``None`` when the config leaves ``kind`` unquantized."""
        return self.kinds.get(kind)

    def target(self, pattern: str, kind: str) -> BoundSpec:
        """The target's spec bound to ``kind``; raises the :class:`oqcore.ConfigError` binding gave
        (field relative to the target) when the target cannot serve that kind."""
        got = self.targets[pattern][kind]
        if isinstance(got, ConfigError):
            raise copy.copy(got)  # a fresh exception each time: the stored one keeps no traceback
        return got

    def weight_keys(self, kind: str) -> list[QuantKey]:
        """The weight keys layers of ``kind`` can be quantized to under this config."""
        out: list[QuantKey] = []
        bound = [self.kinds.get(kind), *(t.get(kind) for t in self.targets.values())]
        for b in bound:
            if isinstance(b, BoundSpec) and b.spec.weight not in out:
                out.append(b.spec.weight)
        return out


_RESOLVED: dict[int, ResolvedConfig] = {}
_RESOLVED_MAX = 64


def _remember(resolved: ResolvedConfig) -> None:
    # keyed by identity (configs with dict fields are not hashable); holds the config, so an id is
    # never reused while its entry lives; bounded, oldest out first
    _RESOLVED.pop(id(resolved.config), None)
    _RESOLVED[id(resolved.config)] = resolved
    while len(_RESOLVED) > _RESOLVED_MAX:
        _RESOLVED.pop(next(iter(_RESOLVED)))


def resolve(config: QuantizationConfig, registry: Registry | None = None) -> ResolvedConfig:
    """Resolve ``config`` against ``registry`` (default: the process registry): bind each kind-wide
    spec and each target (per kind) to its method, activation key, options and formats, once.

    A config validated against the same registry was resolved during its validation and is returned
    from there; otherwise (``QuantizationConfig.none()``, another plugin set) it is bound now.
    Raises :class:`oqcore.ConfigError` when a kind-wide spec no longer binds.
    """
    if not isinstance(config, QuantizationConfig):
        raise ConfigError(f"expected a QuantizationConfig, got {type(config).__name__}", "config")
    if registry is not None and not isinstance(registry, Registry):
        raise ConfigError(f"expected an oqcore plugin Registry, got {type(registry).__name__}", "registry")
    reg = registry if registry is not None else get_registry()
    hit = _RESOLVED.get(id(config))
    if hit is not None and hit.config is config and hit.registry is reg:
        return hit
    kinds = {}
    for k in KINDS:
        if (spec := config.spec_for(k)) is not None:
            try:
                kinds[k] = bind_spec(spec, k, reg)
            except ConfigError as e:
                raise e.at(k) from None
    targets: dict[str, dict[str, BoundSpec | ConfigError]] = {}
    for pattern, spec in config.targets.items():
        targets[pattern] = {}
        for k in KINDS:
            try:
                targets[pattern][k] = bind_spec(spec, k, reg)
            except ConfigError as e:
                targets[pattern][k] = e
    resolved = ResolvedConfig(config, reg, kinds, targets)
    _remember(resolved)
    return resolved
