"""QuantSpec and QuantizationConfig: the declarative config, validated by pydantic.

The same dict a vLLM user writes for ``quantization_config`` is accepted::

    {"linear": "fp8_per_block", "moe": {"weight": "mxfp8", "activation": "mxfp8"}, "ignore": ["lm_head"]}

plus ``scheme`` (a top-level shorthand, vLLM's ``--quantization``), ``targets`` (per-layer specs by
pattern) and ``backend`` (pin a backend per kind). YAML files and OmegaConf dotlist overrides
(``moe.activation=mxfp8``, ``linear.activation=null``) are merged before validation.

Every failure is an :class:`oqcore.ConfigError` (or its subclass :class:`oqcore.UnknownKeyError`)
whose ``field`` is the dotted path at fault.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from oqcore.errors import ConfigError
from oqcore.keys import QuantKey
from oqcore.plugins import KINDS, Registry, get_registry


def _is_none_word(v: Any) -> bool:
    return isinstance(v, str) and v.strip().lower() in ("none", "null")


def _path(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif out.endswith("targets"):
            out += f"[{part!r}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _convert(err: ValidationError, prefix: str | None = None) -> ConfigError:
    """Turn a pydantic ValidationError into the first error as a ConfigError with its field path."""
    first = err.errors(include_url=False)[0]
    more = err.error_count() - 1
    tail = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    loc = [p for p in first["loc"] if p not in ("function-after[...]", "function-before[...]")]
    where = _path(loc) or None
    orig = (first.get("ctx") or {}).get("error")
    if prefix:
        where = f"{prefix}.{where}" if where else prefix
    if isinstance(orig, ConfigError):
        out = orig.at(where) if where else orig
        if tail:
            out = type(out)(out.reason + tail, out.field)
        return out
    return ConfigError(first["msg"] + tail, where)


class _OqModel(BaseModel):
    """pydantic base whose validation errors surface as :class:`oqcore.ConfigError`."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise _convert(e) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any):
        """pydantic's ``model_validate``, raising :class:`oqcore.ConfigError` with the field path."""
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as e:
            raise _convert(e) from None


class QuantSpec(_OqModel):
    """What one layer (or kind of layer) is quantized to.

    - ``weight``: a :class:`QuantKey` or a registered weight key name (``"fp8_per_block_static"``).
    - ``activation``: a key or name; **omitted** means "the method's default" (see
      :attr:`activation_given`), an explicit ``None`` / ``null`` means "no activation
      quantization" (weight-only).
    - ``options``: method-specific knobs, validated by the method's own pydantic ``options_model``
      when the spec is bound to a kind (e.g. ``{"scale_mode": "floor"}`` for mxfp8).

    Raises :class:`oqcore.UnknownKeyError` for unknown names, :class:`oqcore.ConfigError` otherwise.
    """

    weight: QuantKey
    activation: QuantKey | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("weight", mode="before")
    @classmethod
    def _weight(cls, v: Any) -> Any:
        if v is None:
            raise ConfigError("a weight key is required (weight: null quantizes nothing: use ignore instead)")
        if isinstance(v, str):
            return get_registry().resolve_key(v, "weight")
        return v

    @field_validator("activation", mode="before")
    @classmethod
    def _activation(cls, v: Any) -> Any:
        if v is None or _is_none_word(v):
            return None
        if isinstance(v, str):
            return get_registry().resolve_key(v, "activation")
        return v

    @property
    def activation_given(self) -> bool:
        """True when ``activation`` was set explicitly (to a key or to ``None``)."""
        return "activation" in self.model_fields_set

    @field_serializer("weight")
    def _ser_weight(self, k: QuantKey) -> str:
        return get_registry().name_of(k, "weight")

    @field_serializer("activation")
    def _ser_activation(self, k: QuantKey | None) -> str | None:
        return None if k is None else get_registry().name_of(k, "activation")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with key names (``activation`` only when given), fit for YAML/JSON."""
        d = self.model_dump(exclude_unset=True)
        if not d.get("options"):
            d.pop("options", None)
        return d

    def __str__(self) -> str:
        d = self.to_dict()
        act = d["activation"] if "activation" in d else "(default)"
        opts = f", options={d['options']}" if d.get("options") else ""
        return f"weight={d['weight']}, activation={act}{opts}"


@dataclass(frozen=True)
class BoundSpec:
    """A spec bound to a layer kind: the method class, resolved activation key and validated options."""

    kind: str
    spec: QuantSpec
    method_cls: type
    activation_key: QuantKey | None
    options: BaseModel
    method_plugin: str


def _spec_mapping(value: Any, kind: str | None, reg: Registry) -> dict[str, Any]:
    """Normalize a slot value to a mapping and expand a shorthand name in ``weight`` for ``kind``.

    Explicit fields win over the shorthand's (vLLM's merge rule).
    """
    if isinstance(value, QuantSpec):
        return {k: getattr(value, k) for k in value.model_fields_set}
    if isinstance(value, (str, QuantKey)):
        value = {"weight": value}
    if not isinstance(value, Mapping):
        raise ConfigError(f"expected a key name, a shorthand or a mapping with 'weight', got {type(value).__name__}")
    m = dict(value)
    w = m.get("weight")
    if isinstance(w, str) and w not in reg.shorthands and reg.keys.get(w) is None:
        from oqcore.errors import UnknownKeyError

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
    reg = reg or get_registry()
    spec = QuantSpec.model_validate(_spec_mapping(value, kind, reg))
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
        raise _convert(e, "options") from None
    return BoundSpec(kind, spec, cls, act, options, entry.plugin)


def _normalize_slot(v: Any) -> Any:
    """A string slot becomes ``{"weight": s}`` so dotlist overrides can merge into it."""
    return {"weight": v} if isinstance(v, (str, QuantKey)) else v


class QuantizationConfig(_OqModel):
    """The whole config: which spec each layer kind or named layer gets.

    Fields:

    - ``scheme``: a shorthand filling ``linear`` and ``moe`` (alias ``quantization``, as vLLM's
      ``--quantization``); explicit ``linear`` / ``moe`` fields win, and a slot mapping without
      ``weight`` is merged over the shorthand's.
    - ``linear``, ``moe``: a shorthand name, a key name or a spec mapping, bound at validation to
      the method that implements it (so errors show up here, not at load time).
    - ``ignore``: layer-name patterns kept in high precision: exact names, ``re:`` regexes (full
      match) or fnmatch globs.
    - ``targets``: ``pattern -> spec`` for per-layer schemes; mutually exclusive with
      ``scheme``/``linear``/``moe``; resolved per layer kind at plan time.
    - ``backend``: ``{"linear": "triton"}`` pins a backend per kind.

    Build with ``QuantizationConfig(**fields)``, :meth:`model_validate`, :meth:`from_yaml`,
    :meth:`from_dotlist` or :meth:`from_any`. Raises :class:`oqcore.ConfigError`.
    """

    KINDS: ClassVar[tuple[str, ...]] = KINDS

    scheme: str | None = None
    linear: QuantSpec | None = None
    moe: QuantSpec | None = None
    ignore: list[str] = Field(default_factory=list)
    targets: dict[str, QuantSpec | dict[str, Any]] = Field(default_factory=dict)
    backend: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _merge_scheme(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        if "quantization" in data:
            if "scheme" in data:
                raise ConfigError("give either scheme or its alias quantization, not both", "quantization")
            data["scheme"] = data.pop("quantization")
        for kind in KINDS:
            if kind in data:
                data[kind] = _normalize_slot(data[kind])
        scheme = data.get("scheme")
        if scheme is None:
            return data
        reg = get_registry()
        if scheme not in reg.shorthands:
            from oqcore.errors import UnknownKeyError

            raise UnknownKeyError.for_name(scheme, reg.shorthands, "shorthand", "scheme")
        sh = reg.shorthands[scheme]
        for kind in KINDS:
            explicit = data.get(kind)
            base = sh.slot(kind)
            if explicit is None and kind not in data:
                data[kind] = dict(base) if base is not None else None
            elif isinstance(explicit, Mapping) and "weight" not in explicit:
                if base is None:
                    raise ConfigError(f"shorthand {scheme!r} defines no {kind} spec to merge into; give a weight", kind)
                data[kind] = {**base, **explicit}
        return data

    @field_validator("linear", "moe", mode="before")
    @classmethod
    def _bind(cls, v: Any, info: ValidationInfo) -> Any:
        if v is None:
            return None
        return bind_spec(v, info.field_name).spec

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        if not isinstance(v, Mapping):
            return v
        reg = get_registry()
        out: dict[str, Any] = {}
        for pattern, spec in v.items():
            _check_pattern(pattern, f"[{pattern!r}]")
            # A target may be bound to either kind (resolved per layer at plan time); reject it now
            # only if it can serve neither.
            errors: list[ConfigError] = []
            for kind in KINDS:
                try:
                    bind_spec(spec, kind, reg)
                except ConfigError as e:
                    errors.append(e)
            if len(errors) == len(KINDS):
                raise errors[0].at(f"[{pattern!r}]")
            out[pattern] = _normalize_slot(spec) if not isinstance(spec, QuantSpec) else spec
        return out

    @field_validator("ignore", mode="after")
    @classmethod
    def _ignore(cls, v: list[str]) -> list[str]:
        for i, pattern in enumerate(v):
            _check_pattern(pattern, f"[{i}]")
        return v

    @field_validator("backend", mode="after")
    @classmethod
    def _backend(cls, v: dict[str, str]) -> dict[str, str]:
        for kind in v:
            if kind not in KINDS:
                raise ConfigError(f"unknown layer kind {kind!r}; kinds: {', '.join(KINDS)}", kind)
        return v

    @model_validator(mode="after")
    def _exclusive(self) -> QuantizationConfig:
        if self.targets and (self.linear is not None or self.moe is not None or self.scheme is not None):
            raise ConfigError("targets and scheme/linear/moe are mutually exclusive; use one or the other", "targets")
        return self

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def from_any(cls, obj: QuantizationConfig | Mapping[str, Any] | str | Path | None) -> QuantizationConfig:
        """Build from a config, a dict, a YAML/JSON file path or a shorthand name (``"fp8_per_block"``)."""
        if isinstance(obj, QuantizationConfig):
            return obj
        if obj is None:
            return cls()
        if isinstance(obj, Mapping):
            return cls.model_validate(dict(obj))
        p = Path(obj)
        if p.suffix in (".yaml", ".yml", ".json") or p.exists():
            return cls.from_yaml(p)
        return cls.model_validate({"scheme": str(obj)})

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Iterable[str] = ()) -> QuantizationConfig:
        """Load a YAML (or JSON) file and apply OmegaConf dotlist ``overrides`` on top.

        Raises :class:`oqcore.ConfigError` naming the file when it is missing or not valid YAML.
        """
        from omegaconf import OmegaConf

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            base = OmegaConf.to_container(OmegaConf.load(p), resolve=True)
        except Exception as e:  # yaml.YAMLError, OmegaConf errors: all mean "not a usable YAML file"
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if base is None:
            base = {}
        if not isinstance(base, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top, got {type(base).__name__}")
        return cls.from_dotlist(overrides, base=base)

    @classmethod
    def from_dotlist(cls, overrides: Iterable[str], base: Mapping[str, Any] | None = None) -> QuantizationConfig:
        """Apply OmegaConf dotlist ``overrides`` (``["moe.activation=mxfp8", "ignore=[lm_head]"]``) to
        ``base`` (a dict, default empty) and validate."""
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        data = {k: _normalize_slot(v) if k in KINDS else v for k, v in dict(base or {}).items()}
        overrides = list(overrides)
        for o in overrides:
            if "=" not in o:
                raise ConfigError(f"override {o!r} is not of the form key=value (e.g. moe.activation=mxfp8)")
        try:
            merged = OmegaConf.merge(OmegaConf.create(data), OmegaConf.from_dotlist(overrides))
            data = OmegaConf.to_container(merged, resolve=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"cannot apply overrides {overrides}: {e}") from None
        return cls.model_validate(data)

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


def _jsonable_spec(m: Mapping[str, Any]) -> dict[str, Any]:
    reg = get_registry()
    out = dict(m)
    for field, role in (("weight", "weight"), ("activation", "activation")):
        if isinstance(out.get(field), QuantKey):
            out[field] = reg.name_of(out[field], role)
    return out


def _check_pattern(pattern: Any, field: str) -> None:
    import re

    if not isinstance(pattern, str) or not pattern:
        raise ConfigError("a layer pattern must be a non-empty string", field)
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise ConfigError(f"invalid regular expression {pattern[3:]!r}: {e}", field) from None
