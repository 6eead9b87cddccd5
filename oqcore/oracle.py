"""The oracle: choose which implementation quantizes a tensor and which runs a layer, and say why.

Two decisions, the same rules. **Quantizer implementations** (:class:`oqcore.formats.QuantizerImpl`)
turn a high-precision weight into a key's tensors; every implementation of a key gives the same
bytes, so the choice is about speed and where it runs (:func:`select_quantizer`). **Forward
backends** (:class:`Backend`) run a quantized layer's forward (:func:`select_backend`).

Plugins offer :class:`Backend` candidates for each ``(kind, weight_key)``. For one layer the oracle

1. keeps the candidates that serve the resolved activation key (the user's override or the method's
   default), so ``moe.activation=mxfp8`` only ever selects an mxfp8-activation backend;
2. keeps the pinned backend only, if the config pins one for the layer's kind;
3. asks each survivor ``is_supported(layer, device) -> (ok, reason)``;
4. picks the highest ``priority`` (ties broken by name: never by registration order).

When nothing fits, one :class:`oqcore.NoBackendError` lists every candidate with its reason, the
way vLLM's MoE oracle reports it. :func:`oqcore.plan` records the full list for ``oq explain``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from oqcore.errors import ConfigError, NoBackendError
from oqcore.formats import REFERENCE, QuantizerImpl
from oqcore.keys import QuantKey

QUANTIZER_ENV = "OQ_QUANTIZER"
"""Environment variable pinning the quantizer implementation by name for every key that has one
(``OQ_QUANTIZER=torch``: the reference everywhere). Keys without an implementation of that name
keep the oracle's choice."""

SupportCheck = Callable[[torch.nn.Module, torch.device], "tuple[bool, str]"]


def always_supported(layer: torch.nn.Module, device: torch.device) -> tuple[bool, str]:
    """An ``is_supported`` that accepts every layer on every device (for reference backends)."""
    return True, "runs anywhere"


@dataclass(frozen=True)
class Backend:
    """One way to run a layer of a given kind and weight key.

    - ``name``: short id users can pin (``"torch"``, ``"triton"``, ``"cpu-int8"``).
    - ``activation_key``: the activation key this backend serves (``None`` = weight-only).
    - ``is_supported(layer, device) -> (ok, reason)``: ``reason`` says why in either case, e.g.
      ``"needs CUDA compute capability >= 8.9, found 8.0"``.
    - ``priority``: higher is preferred.
    - ``forward(method, layer, x, *args) -> Tensor``: runs the layer (``args`` are the MoE routing
      tensors); ``None`` leaves the forward to the method's own ``apply``.
    - ``prepare(method, layer) -> None``: run once after the weights are quantized, to repack them
      for this backend (e.g. scales in the dtype a kernel wants); ``None`` for nothing.
    - ``plugin``: the providing plugin, filled in by the core.
    - ``traceable``: the forward is plain torch ops that Dynamo/inductor may trace and fuse.
      Otherwise (the default), under ``torch.compile`` the whole layer forward runs as one opaque
      custom op (``oqcore::linear_forward`` / ``oqcore::moe_forward``, :mod:`oqcore.compiled_ops`)
      that calls the eager forward: the choice for C kernels called through ctypes, Triton
      launchers and data-dependent loops (over the experts that got tokens), which would
      otherwise break the graph or be miscompiled. Eager forwards are the same either way.
    """

    name: str
    activation_key: QuantKey | None
    is_supported: SupportCheck = always_supported
    priority: int = 0
    description: str = ""
    forward: Callable[..., torch.Tensor] | None = None
    prepare: Callable[..., None] | None = None
    plugin: str = ""
    traceable: bool = False


@dataclass(frozen=True)
class Candidate:
    """A backend considered for one layer and the oracle's verdict: ``reason`` is why it was
    rejected, or ``None`` if it was viable."""

    backend: Backend
    reason: str | None


@dataclass(frozen=True)
class BackendChoice:
    """The oracle's answer for one layer: the chosen backend and every candidate with its verdict,
    best first."""

    backend: Backend
    candidates: tuple[Candidate, ...]


def _describe(backend: Backend, name_of: Callable[[QuantKey | None], str]) -> str:
    src = f" ({backend.plugin})" if backend.plugin else ""
    return f"{backend.name}{src} [activation {name_of(backend.activation_key)}]"


def select_backend(
    layer_name: str,
    layer: torch.nn.Module,
    candidates: Sequence[Backend],
    activation_key: QuantKey | None,
    device: torch.device | str,
    *,
    pinned: str | None = None,
    name_of: Callable[[QuantKey | None], str] = lambda k: "none" if k is None else str(k),
    kind: str | None = None,
    weight_name: str | None = None,
    method: str | None = None,
    plugin: str | None = None,
) -> BackendChoice:
    """Choose the backend for ``layer_name``.

    ``candidates`` come from the plugins' ``oq_backend_candidates`` hook; ``activation_key`` is the
    resolved activation key; ``pinned`` a backend name the config pins for this kind; ``name_of``
    names keys in messages. ``kind``, ``weight_name``, ``method`` (class name) and ``plugin`` (the
    method's plugin) describe the layer in the error. Raises :class:`oqcore.NoBackendError` naming
    the layer, its kind, weight key, method and plugin, and listing every candidate with why it was
    rejected; :class:`oqcore.ConfigError` (field ``backend.<kind>``) if ``pinned`` names no candidate,
    and (fields ``device`` / ``candidates``) for a device that does not exist or candidates that are
    not :class:`Backend` objects.
    """
    from oqcore.devices import resolve_device

    device = resolve_device(device)
    if device is None:
        raise ConfigError("expected a device such as 'cpu' or 'cuda:0', got None", "device")
    if isinstance(candidates, (str, bytes)) or not all(isinstance(b, Backend) for b in candidates):
        raise ConfigError("expected a sequence of oqcore.Backend", "candidates")
    ordered = sorted(candidates, key=lambda b: (-b.priority, b.name))
    if pinned is not None and all(b.name != pinned for b in ordered):
        names = ", ".join(sorted({b.name for b in ordered})) or "(none)"
        raise ConfigError(
            f"backend {pinned!r} is not a candidate for layer {layer_name!r}; candidates: {names}",
            f"backend.{kind}" if kind else "backend",
        )
    verdicts: list[Candidate] = []
    for b in ordered:
        if b.activation_key != activation_key:
            reason = f"serves activation {name_of(b.activation_key)}, the spec asks for {name_of(activation_key)}"
        elif pinned is not None and b.name != pinned:
            reason = f"not the pinned backend {pinned!r}"
        else:
            try:
                ok, why = b.is_supported(layer, device)
            except Exception as e:  # a buggy predicate rejects its own backend, not the plan
                ok, why = False, f"is_supported raised {type(e).__name__}: {e}"
            reason = None if ok else why
        verdicts.append(Candidate(b, reason))
    viable = [c for c in verdicts if c.reason is None]
    if not viable:
        lines = "\n".join(f"  - {_describe(c.backend, name_of)}: {c.reason}" for c in verdicts) or "  (none offered)"
        raise NoBackendError(
            layer_name,
            f"no backend can run {_what(kind, weight_name, method, plugin)} on {device} with activation "
            f"{name_of(activation_key)}. Candidates:\n{lines}",
        )
    verdicts.sort(key=lambda c: c.reason is not None)
    return BackendChoice(viable[0].backend, tuple(verdicts))


def _what(kind: str | None, weight_name: str | None, method: str | None, plugin: str | None) -> str:
    """``this linear layer (weight key fp8_per_block_static, method Fp8BlockLinear from plugin 'fp8')``."""
    if kind is None and weight_name is None and method is None:
        return "it"
    details = []
    if weight_name is not None:
        details.append(f"weight key {weight_name}")
    if method is not None:
        details.append(f"method {method}" + (f" from plugin {plugin!r}" if plugin else ""))
    layer = f"this {kind} layer" if kind else "this layer"
    return f"{layer} ({', '.join(details)})" if details else layer


def resolve_activation_override(
    override: QuantKey | None, declared: QuantKey | None, *, field: str = "activation"
) -> QuantKey | None:
    """Combine a user's activation override with the activation key a checkpoint declares.

    Equal, or either one ``None``: the one that is set wins. Both set and different: a
    :class:`oqcore.ConfigError` telling the user to remove or align the override (vLLM's rule).
    """
    if override is None or declared is None or override == declared:
        return override if override is not None else declared
    raise ConfigError(
        f"activation override {override} conflicts with the checkpoint's declared activation {declared}; "
        "remove the override or set it to the checkpoint's key",
        field,
    )


@dataclass(frozen=True)
class QuantizerCandidate:
    """A quantizer implementation considered for one tensor and the oracle's verdict: ``reason`` is
    why it was rejected, or ``None`` if it was viable."""

    impl: QuantizerImpl
    reason: str | None


@dataclass(frozen=True)
class QuantizerChoice:
    """The oracle's answer for one tensor (or a layer's weights): the chosen implementation and
    every candidate with its verdict, best first."""

    impl: QuantizerImpl
    candidates: tuple[QuantizerCandidate, ...]


def pinned_quantizer() -> str | None:
    """The implementation name :data:`QUANTIZER_ENV` pins, or ``None`` (unset or blank)."""
    import os

    value = os.environ.get(QUANTIZER_ENV, "").strip()
    return value or None


def select_quantizer(
    impls: Sequence[QuantizerImpl],
    device: torch.device,
    shapes: Sequence[tuple[int, ...]],
    dtype: torch.dtype,
    *,
    pinned: str | None = None,
    what: str = "this tensor",
) -> QuantizerChoice:
    """Choose the implementation that quantizes tensors of ``shapes`` (all of them: a MoE layer's
    two expert stacks) in ``dtype`` on ``device``.

    The meta device (a dry run for shapes) always gets the :data:`oqcore.formats.REFERENCE`.
    Otherwise: ``pinned`` (an argument, else :data:`QUANTIZER_ENV`) keeps only that name when the
    key has it; each candidate's ``is_supported(device, shape, dtype)`` must accept every shape; the
    highest ``priority`` wins, ties by name. Raises :class:`oqcore.ConfigError` (field
    ``quantizer``) when ``pinned`` was given as an argument and no implementation has that name (and
    fields ``device``, ``impls``, ``shapes``, ``dtype`` for arguments of the wrong kind), and
    :class:`oqcore.NoBackendError` naming ``what`` when none is supported (a pinned one that cannot
    run there).
    """
    from oqcore.devices import resolve_device

    device = resolve_device(device)
    if device is None:
        raise ConfigError("expected a device such as 'cpu' or 'cuda:0', got None", "device")
    if isinstance(impls, (str, bytes)) or not isinstance(impls, Sequence) or not all(isinstance(i, QuantizerImpl) for i in impls):
        raise ConfigError("expected a sequence of oqcore.QuantizerImpl", "impls")
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, Sequence) or not shapes or not all(
        isinstance(sh, (tuple, list, torch.Size)) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in sh)
        for sh in shapes
    ):
        raise ConfigError(f"expected a non-empty sequence of shapes (tuples of ints >= 0), got {shapes!r}", "shapes")
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"expected a torch.dtype, got {type(dtype).__name__}", "dtype")
    if pinned is not None and not isinstance(pinned, str):
        raise ConfigError(f"expected an implementation name (str), got {type(pinned).__name__}", "quantizer")
    env_pin = pinned is None
    pinned = pinned if pinned is not None else pinned_quantizer()
    names = {i.name for i in impls}
    if pinned is not None and pinned not in names:
        if not env_pin:
            raise ConfigError(
                f"no quantizer implementation {pinned!r} for {what}; implementations: {', '.join(sorted(names))}",
                "quantizer",
            )
        pinned = None  # the environment pin applies to the keys that have that implementation
    ordered = sorted(impls, key=lambda i: (-i.priority, i.name))
    verdicts: list[QuantizerCandidate] = []
    for impl in ordered:
        if device.type == "meta":
            reason = None if impl.name == REFERENCE else "a meta tensor (dry run) goes to the reference"
        elif pinned is not None and impl.name != pinned:
            reason = f"not the pinned implementation {pinned!r}"
        else:
            reason = None
            for shape in shapes:
                try:
                    ok, why = impl.is_supported(device, tuple(shape), dtype)
                except Exception as e:  # a buggy predicate rejects its own implementation
                    ok, why = False, f"is_supported raised {type(e).__name__}: {e}"
                if not ok:
                    reason = why
                    break
        verdicts.append(QuantizerCandidate(impl, reason))
    viable = [c for c in verdicts if c.reason is None]
    if not viable:
        lines = "\n".join(f"  - {c.impl.name} ({c.impl.plugin}): {c.reason}" for c in verdicts) or "  (none offered)"
        raise NoBackendError(what, f"no quantizer implementation can run on {device}. Candidates:\n{lines}")
    verdicts.sort(key=lambda c: c.reason is not None)
    return QuantizerChoice(viable[0].impl, tuple(verdicts))
