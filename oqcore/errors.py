"""The one exception hierarchy of oqcore.

Every error raised for bad input (a config, a key name, a layer, a checkpoint, a plugin) is a
subclass of :class:`OqError`, and its message names the field, key, layer, file or plugin at fault
and what would be valid. Catch ``OqError`` to handle all of them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError


class OqError(Exception):
    """Base class of every error oqcore raises on bad input."""


class ConfigError(OqError, ValueError):
    """A quantization config is invalid.

    ``field`` is the dotted path of the (first) offending field (``"moe.activation"``,
    ``"targets['re:.*q_proj'].weight"``) or ``None`` for the config as a whole; ``reason`` its
    message. ``errors`` lists every problem found as ``(field, message)`` pairs (one pair for a
    single error); with several, the message lists them one per line. It is a ``ValueError`` as
    well, so pydantic validators can raise it and keep its type.
    """

    def __init__(self, message: str, field: str | None = None, *, errors: Iterable[tuple[str | None, str]] | None = None):
        self.field = field
        self.reason = message
        self.errors: list[tuple[str | None, str]] = list(errors) if errors else [(field, message)]
        if len(self.errors) > 1:
            lines = "\n".join(f"  {f}: {m}" if f else f"  {m}" for f, m in self.errors)
            text = f"{len(self.errors)} errors in the config:\n{lines}"
        else:
            text = f"{field}: {message}" if field else message
        super().__init__(text)

    def at(self, prefix: str) -> ConfigError:
        """Return a copy of this error whose field paths are prefixed by ``prefix``."""

        def join(f: str | None) -> str:
            """``prefix`` joined to field path ``f`` (no dot before an index such as ``[0]``)."""
            if not f:
                return prefix
            return f"{prefix}{'' if f.startswith('[') else '.'}{f}"

        errors = [(join(f), m) for f, m in self.errors]
        return type(self)(self.reason, join(self.field), errors=errors if len(errors) > 1 else None)


def closest_name(name: object, valid: Iterable[str]) -> str | None:
    """The valid name ``name`` most likely meant, or ``None``. Names are case-sensitive, so a
    case-only difference (``FP8_PER_BLOCK``) is suggested first; else difflib's closest match."""
    if not isinstance(name, str):
        return None
    valid = list(valid)
    folded = [v for v in valid if v.casefold() == name.casefold()]
    if folded:
        return folded[0]
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return close[0] if close else None


class UnknownKeyError(ConfigError):
    """A quantization key or shorthand name is not registered by any plugin.

    The message carries a did-you-mean suggestion and the valid names.
    """

    @classmethod
    def for_name(
        cls, name: str, valid: Iterable[str], what: str = "quantization key", field: str | None = None
    ) -> UnknownKeyError:
        """Build the error for an unknown ``name`` among ``valid`` names, with a did-you-mean."""
        valid = sorted(valid)
        close = closest_name(name, valid)
        hint = f"; did you mean {close!r}?" if close else ""
        listing = ", ".join(valid) if valid else "(none registered: is a scheme plugin installed?)"
        return cls(f"unknown {what} {name!r}{hint}; valid: {listing}", field)


class UnsupportedLayerError(OqError):
    """A layer cannot be quantized as asked (its kind, shape or dtype is outside a method's limits).

    ``layer`` is the module's qualified name in the model.
    """

    def __init__(self, layer: str, message: str):
        self.layer = layer
        super().__init__(f"layer {layer!r}: {message}")


class NonFiniteError(OqError, ValueError):
    """A tensor handed to a quantizer holds NaN or Inf.

    Raised by quantizers registered with ``checks_finite=True`` (they detect it in their own amax
    pass, so the core skips its separate check); :func:`oqcore.quantize_tensor` turns it into an
    :class:`UnsupportedLayerError` naming the layer (and the expert, for a stack) and the count.
    """


class NoBackendError(OqError):
    """No backend candidate can run a layer; the message lists every candidate and why it was rejected."""

    def __init__(self, layer: str, message: str):
        self.layer = layer
        super().__init__(f"layer {layer!r}: {message}")


class CheckpointError(OqError):
    """A checkpoint (folder, config.json, safetensors file or tensor) is missing, corrupt or inconsistent."""


class DistributedError(OqError):
    """A parallel (tensor- / expert-parallel) call failed on another rank, or the process group is
    unusable. Raised on every rank that did not itself fail, at the same collective, so no rank
    waits forever and none keeps a half-applied result; the failing rank raises its own error."""


class PluginError(OqError):
    """A plugin failed to load or registered something that conflicts with another plugin."""


class SaveError(OqError):
    """A quantized model could not be written (read-only or full disk, a file where a folder must go,
    the source checkpoint as the destination, a folder that is not an earlier export).

    Saves are atomic at folder level: when this is raised, the destination is as it was before.
    """


class PluginConflictError(PluginError):
    """Two plugins registered the same name (key, alias, shorthand, method, quantizer, plugin name).

    Always fatal, whatever ``OQ_STRICT_PLUGINS`` says: which one to use is the user's decision.
    """


class InternalError(OqError):
    """An unexpected failure inside oqcore (a bug, not bad input): the message names the public
    call, the original exception type and text; the original is chained as ``__cause__``.

    The public API converts any non-:class:`OqError` exception into this one, so callers only ever
    catch :class:`OqError`; please report it with the chained traceback.
    """


# ---- pydantic validation errors -> ConfigError ------------------------------------------------


def short_repr(v: Any, limit: int = 60) -> str:
    """``repr(v)`` cut to ``limit`` characters (``...`` marks the cut), for quoting a bad value in a
    message; an object whose ``__repr__`` raises shows as ``<TypeName>``. Never raises."""
    try:
        text = repr(v)
    except Exception:  # a hostile __repr__ must not hide the real error
        text = f"<{type(v).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _path(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int) or not isinstance(part, str):
            out += f"[{part!r}]" if not isinstance(part, int) else f"[{part}]"
        elif out.endswith("targets"):
            out += f"[{part!r}]"
        else:
            out += f".{part}" if out else part
    return out


def _is_internal_loc(part: Any) -> bool:
    # pydantic adds validator and dict-key markers to locations; users never wrote those
    return isinstance(part, str) and (part.startswith("function-") or part == "[key]")


def did_you_mean(name: Any, valid: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the entry of ``valid`` closest to ``name`` (see
    :func:`closest_name`), or ``""`` when none is close: a suffix for an error message."""
    close = closest_name(name, valid)
    return f"; did you mean {close!r}?" if close else ""


def from_validation_error(err: ValidationError, prefix: str | None = None, model: type[BaseModel] | None = None) -> ConfigError:
    """Turn a pydantic ValidationError into one ConfigError listing every error with its field path.

    A single error keeps its own type (e.g. :class:`oqcore.UnknownKeyError`); several become a
    :class:`oqcore.ConfigError` whose ``errors`` has them all. ``model`` is the class validated
    (for the valid field names of an unknown field).
    """
    found: list[ConfigError] = []
    for e in err.errors(include_url=False):
        raw_loc = list(e["loc"])
        is_key = "[key]" in raw_loc
        loc = [p for p in raw_loc if not _is_internal_loc(p)]
        where = _path(loc) or None
        if prefix:
            where = f"{prefix}{'' if where and where.startswith('[') else '.'}{where}" if where else prefix
        orig = (e.get("ctx") or {}).get("error")
        if isinstance(orig, ConfigError):
            found.append(orig.at(where) if where else orig)
            continue
        found.append(ConfigError(_message(e, loc, model, is_key), where))
    unique: list[ConfigError] = []
    seen: set[tuple] = set()
    for f in found:
        for pair in f.errors:
            if pair not in seen:
                seen.add(pair)
                if len(f.errors) == 1:
                    unique.append(f)
                else:
                    unique.append(ConfigError(pair[1], pair[0]))
    if len(unique) == 1:
        return unique[0]
    first = unique[0]
    return ConfigError(first.reason, first.field, errors=[(u.field, u.reason) for u in unique])


def _message(e: Mapping[str, Any], loc: list[Any], model: type[BaseModel] | None, is_key: bool) -> str:
    kind = e["type"]
    value = e.get("input")
    if kind == "extra_forbidden":
        name = loc[-1] if loc else "?"
        valid = field_names(model) if model is not None and len(loc) == 1 else []
        listing = f"; valid fields: {', '.join(valid)}" if valid else ""
        if model is not None and len(loc) == 1 and not valid:
            listing = f" ({model.__name__} has no fields to set)"
        return f"unknown field {name!r}{did_you_mean(name, valid)}{listing}"
    if kind == "missing":
        return "this field is required"
    msg = e["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if is_key:
        return f"key {short_repr(value)}: {msg[0].lower()}{msg[1:]}"
    if "input" in e and (kind.endswith("_type") or kind in ("is_instance_of", "literal_error", "enum")):
        return f"{msg}, got {type(value).__name__} {short_repr(value)}"
    return msg


def field_names(model: type[BaseModel]) -> list[str]:
    """The field names a user may write for pydantic ``model``: its fields, then the aliases its
    ``FIELD_ALIASES`` class attribute declares (``quantization`` for ``scheme``)."""
    names = list(model.model_fields)
    extra = getattr(model, "FIELD_ALIASES", {})
    return names + [a for a in extra if a not in names]



def public_api(fn):
    """Decorate a public entry point so that only :class:`OqError` subclasses leave it.

    An ``OqError`` passes through unchanged; any other ``Exception`` (a bug in oqcore or in a
    plugin that its own checks did not catch) becomes an :class:`InternalError` naming the call
    and the original type and text, chained as ``__cause__`` for the traceback.
    ``KeyboardInterrupt`` and other ``BaseException``\\ s are not errors of the call: they propagate.
    """
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        """``fn(*args, **kwargs)``, any exception that is not an :class:`OqError` raised as an :class:`InternalError`."""
        try:
            return fn(*args, **kwargs)
        except OqError:
            raise
        except Exception as e:
            raise InternalError(
                f"oqcore.{fn.__name__}: unexpected {type(e).__name__}: {e} (a bug in oqcore or a plugin, not in "
                "your input: please report it with the chained traceback)"
            ) from e

    wrapper.__wrapped__ = fn
    return wrapper
