"""Quantization keys: what a quantized tensor looks like, and the names users write for them.

A :class:`QuantKey` describes a quantized tensor format completely: the element dtype, how its
scales are laid out (:class:`ScaleDesc`, :class:`GroupShape`), an optional second-level scale and
symmetry. It is frozen and hashable, so it can key dispatch tables (methods, backends, quantizers).
The names users write in configs (``"fp8_per_block_static"``, ``"mxfp8"``) are registered by
plugins; a name may be *role-aware*: it resolves to one key as a weight and another as an
activation (``mxfp8`` is a static 1x32-block key for weights and a dynamic one for activations).

The core defines no key itself: every key comes from a plugin's ``oq_register_quant_keys`` hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

Role = Literal["weight", "activation"]
ROLES: tuple[Role, ...] = ("weight", "activation")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class GroupShape:
    """The shape of the group of elements that share one scale, as ``(row, col)``; -1 = full extent.

    Standard shapes (class attributes, vLLM's conventions): ``PER_TENSOR`` (-1, -1), one scale;
    ``PER_TOKEN`` (1, -1), one scale per row of an activation ``[M, K]``; ``PER_CHANNEL`` (-1, 1),
    one scale per output channel of a weight ``[N, K]`` (scale shape ``[N, 1]``). Blocks are written
    ``GroupShape(128, 128)`` (a 128x128 tile of a weight), groups ``GroupShape(1, 128)`` (128
    consecutive elements along K) and MX blocks ``GroupShape(1, 32)`` (OCP MX v1.0).
    """

    row: int
    col: int

    PER_TENSOR: ClassVar[GroupShape]
    PER_TOKEN: ClassVar[GroupShape]
    PER_CHANNEL: ClassVar[GroupShape]

    def __post_init__(self) -> None:
        for v in (self.row, self.col):
            if not isinstance(v, int) or (v < 1 and v != -1):
                raise ValueError(f"GroupShape entries are positive ints or -1 (full extent), got {self.row, self.col}")

    @property
    def is_per_tensor(self) -> bool:
        """One scale for the whole tensor."""
        return self.row == -1 and self.col == -1

    @property
    def is_per_token(self) -> bool:
        """One scale per row of ``[M, K]`` (per token of an activation, per output channel of a weight)."""
        return self.row == 1 and self.col == -1

    @property
    def is_per_channel(self) -> bool:
        """One scale per column group of one: vLLM's ``(-1, 1)`` per-channel convention."""
        return self.row == -1 and self.col == 1

    @property
    def is_per_group(self) -> bool:
        """Row groups of one and finite column groups (``1 x G``), e.g. 1x128 or MX 1x32."""
        return self.row == 1 and self.col > 1

    def __str__(self) -> str:
        if self.is_per_tensor:
            return "per-tensor"
        if self.is_per_token:
            return "per-token"
        if self.is_per_channel:
            return "per-channel"
        return f"{self.row}x{self.col}"


GroupShape.PER_TENSOR = GroupShape(-1, -1)
GroupShape.PER_TOKEN = GroupShape(1, -1)
GroupShape.PER_CHANNEL = GroupShape(-1, 1)


@dataclass(frozen=True)
class ScaleDesc:
    """How the scales of a quantized tensor are stored.

    ``dtype`` is the scale's storage dtype (float32 for most formats; an exponent-only dtype for MX
    formats), ``static`` says whether the scale is computed once (weights, calibrated activations)
    or on every call (dynamic activations), ``group_shape`` which elements share one scale.
    """

    dtype: torch.dtype
    static: bool
    group_shape: GroupShape

    def __str__(self) -> str:
        kind = "static" if self.static else "dynamic"
        return f"{_dtype_name(self.dtype)} {kind} {self.group_shape}"


@dataclass(frozen=True)
class QuantKey:
    """A quantized tensor format: element ``dtype``, ``scale`` layout, optional ``scale2``, symmetry.

    Frozen and hashable. ``str(key)`` is readable, e.g.
    ``float8_e4m3fn[float32 static 128x128]``; asymmetric keys end in ``asym``.
    """

    dtype: torch.dtype
    scale: ScaleDesc
    scale2: ScaleDesc | None = None
    symmetric: bool = True

    def __str__(self) -> str:
        parts = [str(self.scale)]
        if self.scale2 is not None:
            parts.append(f"scale2 {self.scale2}")
        if not self.symmetric:
            parts.append("asym")
        return f"{_dtype_name(self.dtype)}[{', '.join(parts)}]"


@dataclass(frozen=True)
class KeyInfo:
    """One registered key name: what it resolves to in each role, its aliases and its plugin.

    ``weight`` / ``activation`` is ``None`` where the name is not valid in that role.
    """

    name: str
    weight: QuantKey | None
    activation: QuantKey | None
    aliases: tuple[str, ...] = ()
    plugin: str = ""
    description: str = ""

    def key(self, role: Role) -> QuantKey | None:
        """The key this name means in ``role``, or ``None`` if it has no meaning there."""
        return self.weight if role == "weight" else self.activation


@dataclass
class KeyRegistry:
    """Name -> :class:`KeyInfo` table, filled by the plugins' ``oq_register_quant_keys`` hooks.

    Also answers the reverse question (the canonical name of a key in a role) so that plans and
    reports can print ``fp8_per_block_static`` instead of the key's structure.
    """

    infos: dict[str, KeyInfo] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def add(self, info: KeyInfo, label=repr) -> None:
        """Register ``info``; raises :class:`oqcore.PluginConflictError` if a name or alias is taken.

        ``label(plugin)`` formats a plugin name for that message (the manager adds its distribution).
        """
        from oqcore.errors import PluginConflictError, PluginError

        if info.weight is None and info.activation is None:
            raise PluginError(f"plugin {info.plugin!r}: key name {info.name!r} resolves to no key in any role")
        for name in (info.name, *info.aliases):
            owner = self._owner(name)
            if owner is not None:
                raise PluginConflictError(
                    f"quantization key name {name!r} is registered twice: by plugin {label(owner.plugin)} "
                    f"and by plugin {label(info.plugin)}; uninstall or disable one (OQ_DISABLE_PLUGINS)"
                )
        for role in ROLES:
            key = info.key(role)
            for other in self.infos.values():
                if key is not None and other.key(role) == key:
                    raise PluginConflictError(
                        f"{role} key {key} is registered twice, as {other.name!r} by plugin {label(other.plugin)} "
                        f"and as {info.name!r} by plugin {label(info.plugin)}; one key has one name (use aliases=)"
                    )
        self.infos[info.name] = info
        for alias in info.aliases:
            self.aliases[alias] = info.name

    def _owner(self, name: str) -> KeyInfo | None:
        if name in self.infos:
            return self.infos[name]
        if name in self.aliases:
            return self.infos[self.aliases[name]]
        return None

    def get(self, name: str) -> KeyInfo | None:
        """The entry for a name or alias, or ``None``."""
        return self._owner(name)

    def resolve(self, name: str, role: Role, field: str | None = None) -> QuantKey:
        """Resolve ``name`` in ``role``.

        Raises :class:`oqcore.UnknownKeyError` (with a did-you-mean) when no plugin registered the
        name, and :class:`oqcore.ConfigError` when the name exists but has no meaning in ``role``.
        """
        from oqcore.errors import ConfigError, UnknownKeyError

        if not isinstance(name, str):
            raise ConfigError(f"expected a quantization key name (a string), got {type(name).__name__} {name!r}", field)
        info = self._owner(name)
        if info is None:
            raise UnknownKeyError.for_name(name, self.names(role), f"{role} quantization key", field)
        key = info.key(role)
        if key is None:
            raise ConfigError(
                f"{name!r} is not valid as a {role} key; {role} keys: {', '.join(self.names(role))}", field
            )
        return key

    def names(self, role: Role | None = None) -> list[str]:
        """Sorted canonical names, all or only those valid in ``role``."""
        return sorted(n for n, i in self.infos.items() if role is None or i.key(role) is not None)

    def name_of(self, key: QuantKey | None, role: Role) -> str:
        """Canonical name of ``key`` in ``role`` (``"none"`` for ``None``, ``str(key)`` if unnamed)."""
        if key is None:
            return "none"
        for info in self.infos.values():
            if info.key(role) == key:
                return info.name
        return str(key)
