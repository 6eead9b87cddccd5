"""``reload_weights``: refit a quantized model with new high-precision weights, in place.

For RL loops that update the policy every step: the new weights are re-quantized into the
existing quantized storages (``copy_`` into the same tensors, so ``data_ptr`` and CUDA graphs stay
valid). Everything is checked first (names, shapes, dtypes, NaN/Inf, that each touched layer gets
all of its weights), so bad input raises before the model changes by a single bit.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from oqcore.errors import CheckpointError
from oqcore.loading.online import param_owner
from oqcore.loading.state import OqState, get_state
from oqcore.modules import empty_like
from oqcore.tensor import check_finite


def _hp_shapes(state: OqState) -> dict[str, tuple[int, ...]]:
    """Parameter name -> high-precision shape, for every wrapper parameter before quantization."""
    out = {}
    for name, w in state.wrappers.items():
        for pname, p in empty_like(w).named_parameters(recurse=False):
            out[f"{name}.{pname}"] = tuple(p.shape)
    return out


def reload_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor]) -> list[str]:
    """Re-quantize new high-precision ``weights`` into ``model`` (made by :func:`oqcore.load` or
    :func:`oqcore.quantize_`) without moving any storage.

    ``weights`` are ``(name, tensor)`` pairs (or a dict) in checkpoint naming (per-expert names
    included) or in the model's own parameter naming. A subset of layers may be given; a quantized
    layer must get all of its weights. Returns the names of the layers that were re-quantized.

    Raises :class:`oqcore.CheckpointError` (unknown name, wrong shape or dtype, a layer given only
    part of its weights, a name given twice) and :class:`oqcore.UnsupportedLayerError` (NaN/Inf),
    in every case before anything changes.
    """
    state = get_state(model)
    items = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
    incoming: dict[str, torch.Tensor] = {}
    for name, t in items:
        if name in incoming:
            raise CheckpointError(f"reload: weight {name!r} is given twice")
        incoming[name] = t

    # ---- stage 1: check everything, change nothing ---------------------------------------------
    groups = state.groups
    source_to_group = {k: g for g in groups.values() for k in g.sources}
    hp_shapes = _hp_shapes(state)
    params = dict(model.named_parameters())
    direct: dict[str, torch.Tensor] = {}
    touched_groups: dict[str, object] = {}
    for name, t in incoming.items():
        if name in source_to_group:
            expected = state.source_shapes[name]
            touched_groups[source_to_group[name].target] = source_to_group[name]
        elif name in hp_shapes or (name in params and param_owner(name, state.wrappers) is None):
            expected = hp_shapes.get(name) or tuple(params[name].shape)
            direct[name] = t
        else:
            known = list(source_to_group) + list(hp_shapes) + [n for n in params if param_owner(n, state.wrappers) is None]
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.7)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise CheckpointError(f"reload: {name!r} is not a weight of this model{hint}")
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise CheckpointError(f"reload: {name!r} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != tuple(expected):
            raise CheckpointError(f"reload: {name!r} has shape {list(t.shape)}, expected {list(expected)}")
        check_finite(t, name)
    for g in touched_groups.values():
        missing = [k for k in g.sources if k not in incoming]
        if missing:
            raise CheckpointError(
                f"reload: {g.target!r} needs {len(g.sources)} checkpoint tensors, {len(missing)} missing: "
                + ", ".join(missing[:8])
            )
    provided = set(direct) | set(touched_groups)
    layer_params = {
        name: [f"{name}.{p}" for p, _ in empty_like(w).named_parameters(recurse=False)] for name, w in state.wrappers.items()
    }
    touched_layers = [n for n, ps in layer_params.items() if any(p in provided for p in ps)]
    for layer in touched_layers:
        missing = [p for p in layer_params[layer] if p not in provided]
        if missing:
            raise CheckpointError(f"reload: layer {layer!r} is quantized as a whole; missing {', '.join(missing)}")

    # ---- stage 2: convert, re-quantize, copy into the existing storages --------------------------
    # One target at a time, so at most one layer's high-precision weights are alive at once.
    pending: dict[str, dict[str, torch.Tensor]] = {n: {} for n in touched_layers}
    batches = [{n: t} for n, t in direct.items()] + [lambda g=g: g.convert(model, incoming.__getitem__) for g in touched_groups.values()]
    for batch in batches:
        for name, value in (batch() if callable(batch) else batch).items():
            owner = param_owner(name, state.wrappers)
            if owner is None:
                with torch.no_grad():
                    params[name].copy_(value)
                continue
            pending[owner][name.rpartition(".")[2]] = value
            if len(pending[owner]) == len(layer_params[owner]):
                _requantize(state.wrappers[owner], pending.pop(owner), state)
    return touched_layers


def _requantize(live: nn.Module, hp: dict[str, torch.Tensor], state: OqState) -> None:
    scratch = empty_like(live)
    for pname, value in hp.items():
        placeholder = scratch._parameters[pname]
        scratch._parameters[pname] = nn.Parameter(value.to(state.device, placeholder.dtype), requires_grad=False)
    scratch.method.process_weights_after_loading(scratch)
    with torch.no_grad():
        for kind in ("_parameters", "_buffers"):
            for pname, new in getattr(scratch, kind).items():
                old = getattr(live, kind)[pname]
                if new is None or old is None:
                    continue
                if old.shape != new.shape or old.dtype != new.dtype:
                    raise CheckpointError(f"reload: {live.layer_name}.{pname} changed layout ({old.shape} -> {new.shape})")
                old.copy_(new)
