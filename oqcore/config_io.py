"""Reading config text: YAML / JSON files, OmegaConf-style dotlist overrides, interpolation.

Everything here works on plain data (dicts, lists, strings, numbers) and raises
:class:`oqcore.ConfigError` naming the file or the override at fault; validation of the result is
:mod:`oqcore.config`'s job.

- Files: ``.json`` is read as JSON, anything else as YAML (YAML 1.1 with only ``true`` / ``false``
  as booleans, so ``on`` / ``off`` / ``yes`` / ``no`` stay strings, as in OmegaConf). A key given
  twice in one mapping is an error rather than "last one wins".
- Overrides: ``dotted.key=value``; the value is parsed as YAML (``null``, ``[a, b]``,
  ``{weight: mxfp8}``, ``3``). Each override *sets* its path: ``moe=mxfp8`` replaces ``moe``,
  ``moe.activation=null`` sets one field of ``moe`` and keeps the others. Overrides apply in order.
- Interpolation (``${oc.env:HOME}``, ``${linear.weight}``) is resolved by OmegaConf only when asked
  for (``interpolate=True``); otherwise the text stays literal.
"""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from oqcore.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """SafeLoader with OmegaConf's booleans (``true`` / ``false`` only) and duplicate-key detection."""

    def construct_mapping(self, node, deep=False):
        """yaml's mapping hook: merge keys expanded, a key given twice refused (:class:`_DuplicateKey`)."""
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen: list[Any] = []
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: yaml reports it itself
                    duplicate = False
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                    )
                seen.append(key)
        return super().construct_mapping(node, deep=deep)


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def parse_yaml(text: str) -> Any:
    """Parse YAML text with oqcore's loader. Raises ``yaml.YAMLError`` / ``RecursionError``."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


MAX_FILE_BYTES = 64 * 1024 * 1024  # a config is a few lines; more is a wrong file


def _short_path(p: Path, limit: int = 200) -> str:
    """``p`` as text, cut in the middle when longer than ``limit`` characters (an error message
    quoting a 5,000-character name helps nobody)."""
    s = str(p)
    return s if len(s) <= limit else f"{s[: limit // 2]}...{s[-limit // 2 :]}"


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping held by a YAML or JSON config file (an empty file is ``{}``).

    Raises :class:`oqcore.ConfigError` naming the file when it is missing, a directory, unreadable,
    not UTF-8, not valid YAML/JSON, or does not hold a mapping at the top.
    """
    p = Path(path)
    try:
        exists, is_dir = p.exists(), p.is_dir()
    except (OSError, ValueError) as e:  # a name too long, with NUL bytes, in an unreadable folder
        reason = getattr(e, "strerror", None) or str(e)
        raise ConfigError(f"config file {_short_path(p)!r} cannot be opened: {reason}") from None
    if not exists:
        raise ConfigError(f"config file {_short_path(p)!r} does not exist")
    if is_dir:
        raise ConfigError(f"config file {str(p)!r} is a directory, not a YAML/JSON file")
    try:
        st = p.stat()
    except OSError as e:
        raise ConfigError(f"config file {_short_path(p)!r} cannot be read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        # a FIFO would block forever, /dev/zero would never end
        raise ConfigError(f"config file {str(p)!r} is not a regular file (a pipe, device or socket); give a YAML/JSON file")
    if st.st_size > MAX_FILE_BYTES:
        raise ConfigError(f"config file {str(p)!r} is {st.st_size:,} bytes; a config file may hold at most {MAX_FILE_BYTES:,}")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text (byte {e.start})") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text, object_pairs_hook=_no_duplicate_pairs) if text.strip() else None
        else:
            data = parse_yaml(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except _DuplicateKey as e:
        raise ConfigError(f"config file {str(p)!r} is not valid JSON: key {e.args[0]!r} given twice") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:
        raise ConfigError(f"config file {str(p)!r} is nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top, got {type(data).__name__}")
    return data


class _DuplicateKey(ValueError):
    """A key given twice in one YAML/JSON mapping (turned into a ConfigError naming the file)."""


def _no_duplicate_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


_BAD_KEY_CHARS = re.compile(r"[\s\[\]{}=]")


_SPEC_FIELDS = ("weight", "activation", "options")


def _targets_path(key: str) -> list[str]:
    """The path of a ``targets.<pattern>[.weight|.activation|.options...]`` override key.

    A ``targets`` key is a layer pattern, and patterns hold dots (``re:.*mlp.down_proj``,
    ``model.layers.*.mlp``), so the pattern is everything after ``targets.`` up to the first part
    that is a spec field (``weight``, ``activation``, ``options``), not one dotted part. The pattern
    may hold brackets and dots (``targets.model.layers.[0-3].mlp=fp8_per_tensor``).
    """
    segs = key[len("targets.") :].split(".")
    cut = next((i for i, p in enumerate(segs) if i > 0 and p in _SPEC_FIELDS), len(segs))
    return ["targets", ".".join(segs[:cut]), *segs[cut:]]


def parse_override(o: Any) -> tuple[list[str], Any]:
    """Split one ``dotted.key=value`` override into its key path and its YAML-parsed value.

    Raises :class:`oqcore.ConfigError` naming the override when it is not a string, has no ``=``,
    an empty key or key part, a key with spaces or brackets, no value, or a value that is not YAML.
    """
    if not isinstance(o, str):
        raise ConfigError(f"override {o!r} must be a string of the form key=value, got {type(o).__name__}")
    if "=" not in o:
        raise ConfigError(f"override {o!r} is not of the form key=value (e.g. moe.activation=mxfp8)")
    key, value = o.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {o!r} has no key before '=' (e.g. moe.activation=mxfp8)")
    if key.startswith("targets.") and len(key) > len("targets."):
        parts = _targets_path(key)
    else:
        parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override {o!r}: key {key!r} has an empty part (write dotted names such as moe.activation)")
    if any(_BAD_KEY_CHARS.search(p) for i, p in enumerate(parts) if not (i == 1 and parts[0] == "targets")):
        raise ConfigError(f"override {o!r}: key {key!r} may not hold spaces, brackets or '='; set a whole mapping or list as the value instead")
    if not value.strip():
        raise ConfigError(f"override {o!r} has no value after '=' (write null for none)")
    try:
        parsed = parse_yaml(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {o!r}: value {value!r} is not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:
        raise ConfigError(f"override {o!r}: value is nested too deeply") from None
    return parts, parsed


def apply_overrides(
    data: Mapping[str, Any],
    overrides: Iterable[Any],
    normalize: Callable[[tuple[str, ...], Any], Any],
) -> dict[str, Any]:
    """A copy of ``data`` with each override applied in order.

    ``normalize(path, value)`` turns a value about to be descended into (e.g. the string slot
    ``linear: mxfp8``) into a mapping, or returns it unchanged. Descending into anything that is not
    a mapping afterwards is a :class:`oqcore.ConfigError` naming the override.
    """
    budget = [MAX_NODES]  # shared: the data and every override value count towards one limit
    out = _copy_tree(dict(data), 0, budget)
    for o in _override_list(overrides):
        parts, value = parse_override(o)
        node: dict[str, Any] = out
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            else:
                child = normalize(tuple(parts[: depth + 1]), child)
            if not isinstance(child, Mapping):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"override {o!r}: {where} holds a {type(child).__name__} ({child!r}), not a mapping, so "
                    f"{'.'.join(parts)} cannot be set; set {where} itself"
                )
            child = dict(child)
            node[part] = child
            node = child
        # copied (and counted) too: a YAML value can hold aliases that expand a list many times over
        try:
            node[parts[-1]] = _copy_tree(value, len(parts), budget)
        except ConfigError as e:
            text = o if len(o) <= 80 else o[:77] + "..."
            raise ConfigError(f"override {text!r}: {e}") from None
    return out


MAX_NODES = 1_000_000  # far above any real config (a 100,000-entry ignore list is 100,001 nodes)


def _copy_tree(value: Any, _depth: int = 0, _budget: list[int] | None = None) -> Any:
    """Copy the dicts and lists of ``value`` (so overrides never touch the caller's data); other
    objects (keys, specs, whatever a caller passed) are shared, never deep-copied.

    Raises :class:`oqcore.ConfigError` past 100 levels of nesting or :data:`MAX_NODES` values in
    all: YAML aliases share one list many times over ("billion laughs": 9 lines expand to 10^8
    values), and copying that would hang and exhaust memory instead of failing.
    """
    if _budget is None:
        _budget = [MAX_NODES]
    _budget[0] -= 1
    if _budget[0] < 0:
        raise ConfigError(
            f"the config holds more than {MAX_NODES:,} values (YAML aliases expanding a list many times over?)"
        )
    if _depth > 100:
        raise ConfigError("the config is nested too deeply")
    if isinstance(value, Mapping):
        return {k: _copy_tree(v, _depth + 1, _budget) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_tree(v, _depth + 1, _budget) for v in value]
    return value


def _override_list(overrides: Any) -> list[Any]:
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return [overrides]
    if isinstance(overrides, (bytes, Mapping)) or not isinstance(overrides, Iterable):
        raise ConfigError(f"overrides must be a list of key=value strings, got {type(overrides).__name__}")
    return list(overrides)


def interpolate(data: Mapping[str, Any]) -> dict[str, Any]:
    """Resolve OmegaConf interpolations (``${oc.env:HOME}``, ``${linear.weight}``) in ``data``.

    Raises :class:`oqcore.ConfigError` naming the failing interpolation.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.create(dict(data), flags={"allow_objects": True})
        out = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        where = f" at {key}" if key else ""
        raise ConfigError(f"cannot resolve interpolation{where}: {str(e).splitlines()[0]}") from None
    except (ValueError, TypeError, RecursionError) as e:  # OmegaConf's own checks on plain data
        raise ConfigError(f"cannot resolve interpolation: {type(e).__name__}: {e}") from None
    assert isinstance(out, dict)
    return out


def has_interpolation(value: Any, _depth: int = 0) -> bool:
    """Whether ``value`` holds a string with ``${`` anywhere (in keys or values)."""
    if _depth > 50:
        return False
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, Mapping):
        return any(has_interpolation(k, _depth + 1) or has_interpolation(v, _depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(has_interpolation(v, _depth + 1) for v in value)
    return False
