"""A user's config on an already-quantized checkpoint: vLLM's overlay semantics.

vLLM lets a config meet a checkpoint that is already (partly) quantized (PR 41566 and its online
quantization docs); :func:`overlay` gives the same meaning to the config passed to
:func:`oqcore.load` with a compressed-tensors checkpoint or an oqcore export. For every layer the
checkpoint stores quantized (weight key ``Ws``, activation ``As``):

- the kind-wide spec (``linear`` / ``moe``) may name ``Ws`` itself (a shorthand of the checkpoint's
  own scheme selects the stored method, nothing is re-quantized) or omit the weight (an
  activation-only spec, ``moe: {activation: mxfp8}``); another weight key is a
  :class:`oqcore.ConfigError` naming both;
- an activation given that way overrides ``As`` when the checkpoint declares none (weight-only
  storage served with quantized activations); asking for ``B != As`` is a ``ConfigError`` telling
  the user to remove the override or align it with the checkpoint; the method must serve the
  pairing (else the ``ConfigError`` binding gives, naming the layer);
- a ``targets`` pattern naming it is a ``ConfigError`` (it keeps its stored quantization);
- an ``ignore`` pattern matching it keeps the stored quantization as it is (no override).

Layers the checkpoint stores in high precision are planned with the config as on a bf16 checkpoint
(composing: ``linear: fp8_per_block`` quantizes them online while loading); activation-only specs
leave them in high precision. The result is one config naming every quantized layer exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from oqcore.config import KINDS, QuantizationConfig, QuantSpec, bind_spec
from oqcore.errors import ConfigError
from oqcore.layers import layer_kind
from oqcore.matching import matches
from oqcore.methods import STATIC_ONLINE, refuse_static_online
from oqcore.planning import plan
from oqcore.plugins import get_registry


@dataclass(frozen=True)
class Overlay:
    """What a load of an already-quantized checkpoint plans with.

    ``config``: the config to plan the model with (the stored config itself when the user's adds
    nothing); ``stored``: the layers read as stored; ``online``: the high-precision layers the
    user's config quantizes while loading."""

    config: QuantizationConfig
    stored: frozenset[str]
    online: frozenset[str]


def stored_specs(model: nn.Module, stored: QuantizationConfig, device: torch.device | str) -> dict[str, QuantSpec]:
    """Each layer ``stored`` quantizes in ``model`` (on meta, not yet wrapped) -> its spec with the
    activation explicit (``QuantSpec(weight, activation, options)``)."""
    return {lp.name: _explicit(lp) for lp in plan(model, stored, device=device).quantized}


def _explicit(lp) -> QuantSpec:
    b = lp.bound
    return QuantSpec.model_validate({"weight": b.spec.weight, "activation": b.activation_key, "options": dict(b.spec.options)})


def _name(key, role: str) -> str:
    return "none" if key is None else get_registry().name_of(key, role)


def _describe(spec: QuantSpec) -> str:
    return f"weight {_name(spec.weight, 'weight')}, activation {_name(spec.activation, 'activation')}"


def overlay(
    model: nn.Module,
    stored: QuantizationConfig,
    per_layer: dict[str, QuantSpec],
    user: QuantizationConfig | None,
    device: torch.device | str,
    where: str,
) -> Overlay:
    """The config a load plans ``model`` (built on meta, not yet wrapped) with, for a checkpoint
    stored quantized as ``stored`` (``per_layer``: :func:`stored_specs` of it) and the user's
    ``user`` config (``None``: as stored), by the rules of the module docstring. ``where`` names
    the checkpoint in messages.

    Raises :class:`oqcore.ConfigError` (field ``linear`` / ``moe`` / ``targets`` ...) for a weight
    key other than the stored one, an activation conflicting with the declared one, a target
    naming a stored layer, a pairing the stored method cannot serve; and whatever planning the
    high-precision layers with ``user`` raises.
    """
    if user is None:
        return Overlay(stored, frozenset(per_layer), frozenset())
    modules = dict(model.named_modules())
    targets: dict[str, QuantSpec] = {}
    changed = False
    for name, s in per_layer.items():
        if any(matches(p, name) for p in user.ignore):
            targets[name] = s  # ignore keeps the checkpoint's quantization
            continue
        hit = next((p for p in user.targets if matches(p, name)), None)
        if hit is not None:
            raise ConfigError(
                f"targets pattern {hit!r} names layer {name!r}, which {where} stores already quantized ({_describe(s)}); "
                "pre-quantized layers keep their quantization: remove the pattern (an activation-only linear/moe spec "
                "overrides their activation), or quantize the high-precision source with this config",
                "targets",
            )
        kind = layer_kind(modules[name])
        u = user.spec_for(kind) if kind in KINDS else None
        if u is None:
            targets[name] = s
            continue
        if not u.activation_only and u.weight != s.weight:
            raise ConfigError(
                f"{kind} weight {_name(u.weight, 'weight')} conflicts with {where}, which stores layer {name!r} already quantized "
                f"as {_name(s.weight, 'weight')}: give the checkpoint's own weight key, only an activation "
                f"({kind}: {{activation: ...}}), or no {kind} spec; to re-quantize, load the high-precision source",
                f"{kind}.weight",
            )
        act = s.activation
        if u.activation_given and u.activation != s.activation:
            if s.activation is not None:
                raise ConfigError(
                    f"{kind} activation {_name(u.activation, 'activation')} conflicts with {where}, which declares "
                    f"activation {_name(s.activation, 'activation')} for layer {name!r}: remove the override or align "
                    "it with the checkpoint",
                    f"{kind}.activation",
                )
            act = u.activation
        spec = QuantSpec.model_validate({"weight": s.weight, "activation": act, "options": dict(s.options)})
        if act != s.activation:
            changed = True
            try:
                bound = bind_spec(spec, kind)
            except ConfigError as e:
                raise ConfigError(f"layer {name!r} of {where} ({_describe(s)}): {e.reason}", f"{kind}.activation") from None
            fmt = bound.formats.activation if bound.formats is not None else None
            if fmt is not None and fmt.is_static_activation:
                raise ConfigError(
                    f"layer {name!r} of {where} ({_describe(s)}) stores no input scale: activation "
                    f"{_name(act, 'activation')} {STATIC_ONLINE}",
                    f"{kind}.activation",
                )
        targets[name] = spec

    online = _online_specs(model, user, per_layer, device)
    targets.update(online)
    if not changed and not online and not user.backend:
        return Overlay(stored, frozenset(per_layer), frozenset())
    data = {"targets": {n: s.to_dict() for n, s in targets.items()}}
    backend = {**stored.backend, **user.backend}
    if backend:
        data["backend"] = backend
    return Overlay(QuantizationConfig.model_validate(data), frozenset(per_layer), frozenset(online))


def _online_specs(
    model: nn.Module, user: QuantizationConfig, stored: dict[str, QuantSpec], device: torch.device | str
) -> dict[str, QuantSpec]:
    """The high-precision layers ``user`` quantizes (planned as on a bf16 checkpoint, stored layers
    ignored, activation-only specs left out) -> their specs."""
    data = user.to_dict()
    for kind in KINDS:
        if kind in data and user.spec_for(kind).activation_only:
            del data[kind]
    if not any(k in data for k in (*KINDS, "targets")):
        return {}
    data["ignore"] = [*data.get("ignore", []), *stored]
    cfg = QuantizationConfig.model_validate(data)
    layers = plan(model, cfg, device=device).quantized
    refuse_static_online(layers)
    return {lp.name: _explicit(lp) for lp in layers}
