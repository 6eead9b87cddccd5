"""``reload_weights``: refit a quantized model with new high-precision weights, in place.

For RL loops that update the policy every step: the new weights are re-quantized into the
existing quantized storages (``copy_`` into the same tensors, so ``data_ptr`` and CUDA graphs stay
valid). All or nothing, in three passes:

1. check every given tensor (name, type, device, dtype, shape, NaN/Inf, and that its values stay
   finite once converted to the model's dtype) and that each touched layer gets all its weights;
2. quantize every touched layer into a scratch copy of its wrapper, one layer's high-precision
   weights at a time, keeping only the quantized results;
3. only when every layer succeeded, copy the staged results and the unquantized parameters into
   the model's storages.

Memory: beyond the caller's tensors, one layer's converted high-precision weights at a time plus
the staged quantized results of all touched layers (data + scales: about half their bf16 size
for the 8-bit schemes). To bound it for a very large model, reload a few layers per call: each
call is all-or-nothing for the layers it gets.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from oqcore.errors import CheckpointError, ConfigError, InternalError, OqError, PluginError, UnsupportedLayerError
from oqcore.loading.install import method_plugin, process_layer
from oqcore.loading.names import TargetGroup, is_expert_fusion
from oqcore.loading.siblings import SiblingQueue, sibling_groups
from oqcore.loading.state import OqState
from oqcore.modules import empty_like
from oqcore.parallel.shard import join_as_failed
from oqcore.tensor import HP_DTYPES, check_finite, dtype_names
from oqcore.torch_compat import get_buffer, get_parameter, own_buffers, own_parameters, set_parameter

Weights = Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor]


def reload_weights(model: nn.Module, weights: Weights) -> list[str]:
    """Re-quantize new high-precision ``weights`` into ``model`` (made by :func:`oqcore.load` or
    :func:`oqcore.quantize_`) without moving any storage.

    ``weights`` is a dict ``{name: tensor}`` or an iterable of ``(name, tensor)`` pairs (a
    generator is consumed once, fully, before anything changes), in checkpoint naming (per-expert
    names included) or in the model's own parameter naming. Tensors: float32, bfloat16, float16 or
    float64, on the CPU or on the model's device, of the parameter's (or checkpoint tensor's)
    shape. A subset of layers may be given; a quantized layer must get all of its weights.
    Returns the names of the layers that were re-quantized.

    All or nothing: on any error every parameter and buffer of the model is bit for bit as before,
    at the same address. Memory: one layer's high-precision weights at a time plus the quantized
    results of all touched layers, staged until every layer succeeded (reload a few layers per
    call to bound it).

    Raises

    - :class:`oqcore.ConfigError` (field ``model``): ``model`` was not loaded or quantized by
      oqcore, or its quantized layers were replaced since;
    - :class:`oqcore.CheckpointError` naming the weight: ``weights`` is not a mapping or iterable
      of pairs, a name that is not a str or not a weight of the model (with a did-you-mean), a
      value that is not a tensor, a meta tensor, a tensor on another device, a dtype other than
      the four above, a wrong shape, a name given twice (or one parameter given under two names),
      a layer given only part of its weights, the iterable raising while it is read;
    - :class:`oqcore.UnsupportedLayerError` naming the weight: NaN/Inf, or values that overflow
      the model's dtype (a float32 3.4e38 into bfloat16);
    - :class:`oqcore.PluginError` naming the plugin and layer: its method or quantizer failed, or
      produced tensors of another layout than the layer holds. Other typed errors a quantizer
      raises (:class:`oqcore.UnsupportedLayerError`) pass through.
    """
    state = _state_of(model)
    if state.shards:
        return _reload_sharded(model, state, weights)
    incoming = _add_tied(state, _collect(weights))
    job = _Job(model, state)
    job.check(incoming)
    staged = job.quantize(incoming)
    job.commit(_unalias(model, incoming), staged)
    return job.touched_layers


def _reload_sharded(model: nn.Module, state: OqState, weights: Weights) -> list[str]:
    """The three passes on one rank of a sharded model (:mod:`oqcore.parallel.reload`): a status
    collective after the checks and after quantizing, so no rank commits unless every rank can;
    a rank that failed keeps joining the collectives the others run, then raises its own error
    (the others raise :class:`oqcore.DistributedError` at the same point)."""
    from oqcore.parallel.reload import localize_incoming

    group = next(iter(state.shards.values())).group
    job, failure, incoming = _Job(model, state), None, {}
    try:
        incoming = localize_incoming(state, _add_tied(state, _collect(weights)))
        job.check(incoming)
    except Exception as e:
        failure = e
    group.check(failure is not None, "reloading (checking the weights)")
    if failure is not None:
        raise failure
    staged = job.quantize(incoming)  # joins every collective even when it fails (job.failure)
    group.check(job.failure is not None, "reloading (quantizing)")
    if job.failure is not None:
        raise job.failure
    job.commit(_unalias(model, incoming), staged)
    return job.touched_layers


# ---- the model and the weights -----------------------------------------------------------------


def _state_of(model: nn.Module) -> OqState:
    """``model.oq_state``, checked to still describe the model (its wrappers are in place)."""
    state = getattr(model, "oq_state", None) if isinstance(model, nn.Module) else None
    if not isinstance(state, OqState):
        raise ConfigError(
            f"{type(model).__name__} was not loaded or quantized by oqcore (no oq_state); use oqcore.load or "
            "oqcore.quantize_ first",
            "model",
        )
    for name, w in state.wrappers.items():
        try:
            live = model.get_submodule(name)
        except AttributeError:
            live = None
        if live is not w:
            raise ConfigError(
                f"quantized layer {name!r} of model.oq_state is no longer in the model (found "
                f"{type(live).__name__ if live is not None else 'nothing'} there): the model was changed after "
                "oqcore quantized it",
                "model",
            )
    return state


def _collect(weights: Weights) -> dict[str, torch.Tensor]:
    """``weights`` as a dict, read fully (so a generator failing half-way changes nothing);
    raises :class:`oqcore.CheckpointError` for a bad container, pair, name or duplicate."""
    if isinstance(weights, (str, bytes, torch.Tensor)) or not isinstance(weights, (Mapping, Iterable)):
        hint = " (pass model.named_parameters() or a state_dict)" if isinstance(weights, nn.Module) else ""
        raise CheckpointError(
            f"reload: weights must be a mapping of names to tensors or an iterable of (name, tensor) pairs, "
            f"got {type(weights).__name__}{hint}"
        )
    out: dict[str, torch.Tensor] = {}
    pairs: Iterator = iter(weights.items()) if isinstance(weights, Mapping) else iter(weights)
    i = 0
    while True:
        try:
            item = next(pairs)
        except StopIteration:
            break
        except OqError:
            raise
        except Exception as e:
            last = f" (last: {next(reversed(out))!r})" if out else ""
            raise CheckpointError(
                f"reload: reading the weights failed after {len(out)} tensor(s){last}: {type(e).__name__}: {e}; "
                "nothing was changed"
            ) from e
        if not (isinstance(item, tuple) and len(item) == 2):
            raise CheckpointError(f"reload: weights item #{i} must be a (name, tensor) pair, got {type(item).__name__}")
        name, t = item
        if not isinstance(name, str):
            raise CheckpointError(f"reload: weights item #{i}: the name must be a str, got {type(name).__name__} {name!r}")
        if name in out:
            raise CheckpointError(f"reload: weight {name!r} is given twice")
        out[name] = t
        i += 1
    return out


def _add_tied(state: OqState, incoming: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give a quantized layer whose weight was tied to another parameter (an lm_head tied to the
    embedding, recorded by :func:`oqcore.quantize_` as ``oq_tied``) the value given for that
    parameter, unless the layer's own weight is given too. ``model.named_parameters()`` lists a
    tied tensor once, so without this the lm_head would silently keep the old weight."""
    out = incoming
    for layer, w in state.wrappers.items():
        for pname, others in (getattr(w, "oq_tied", None) or {}).items():
            own = f"{layer}.{pname}"
            given = next((o for o in others if o in incoming), None)
            if own not in incoming and given is not None:
                out = dict(out) if out is incoming else out
                out[own] = incoming[given]
    return out


def _unalias(model: nn.Module, incoming: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``incoming`` with a private copy of every tensor that shares storage with one of the
    model's parameters or buffers. The commit copies one tensor after another, so a value read
    from the model itself (its own parameters swapped, an overlapping or expanded view of one)
    would otherwise be read after an earlier copy overwrote it: silently wrong values."""
    storages = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers()) if not t.is_meta}
    out = dict(incoming)
    for name, t in incoming.items():
        if t.device.type != "meta" and t.untyped_storage().data_ptr() in storages:
            out[name] = t.detach().clone()
    return out


# ---- the three passes --------------------------------------------------------------------------


@dataclass
class _Target:
    """Where one given tensor goes: its expected shape and the dtype its values end up in."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    group: TargetGroup | None = None  # set for a checkpoint-named source


@dataclass
class _Job:
    model: nn.Module
    state: OqState
    targets: dict[str, _Target] = field(default_factory=dict)
    direct: list[str] = field(default_factory=list)  # model-named weights, in the order given
    groups: dict[str, TargetGroup] = field(default_factory=dict)  # touched groups by target
    touched_layers: list[str] = field(default_factory=list)
    failure: Exception | None = None  # a sharded reload's first error (the loop runs on, dry)

    def __post_init__(self) -> None:
        state = self.state
        self.params = dict(self.model.named_parameters())
        # high-precision parameters of every wrapper (what the method registers before quantizing)
        self.hp: dict[str, torch.Tensor] = {}
        self.layer_params: dict[str, list[str]] = {}
        for name, w in state.wrappers.items():
            names = []
            for pname, p in empty_like(w).named_parameters(recurse=False):
                self.hp[f"{name}.{pname}"] = p
                names.append(f"{name}.{pname}")
            self.layer_params[name] = names
        self.source_to_group = {k: g for g in state.groups.values() for k in g.sources}
        self.device = torch.device(state.device)
        self.siblings = sibling_groups(state.wrappers)
        self.queue = SiblingQueue(self.siblings, process_layer)  # fused siblings share a global scale
        self.scratches: dict[str, nn.Module] = {}

    def owner(self, param: str) -> str | None:
        """The wrapper owning parameter ``param``, or ``None``."""
        owner = param.rpartition(".")[0]
        return owner if owner in self.state.wrappers else None

    def target_dtype(self, param: str) -> torch.dtype:
        """The dtype a value for parameter ``param`` is converted to."""
        return self.hp[param].dtype if param in self.hp else self.params[param].dtype

    # -- pass 1: check ---------------------------------------------------------------------------

    def check(self, incoming: dict[str, torch.Tensor]) -> None:
        """Map every name, check every tensor and that every touched layer is complete."""
        claimed: dict[str, str] = {}  # parameter -> how it was given
        self._map_unknown_names(incoming)
        for name, t in incoming.items():
            if name in self.source_to_group:
                g = self.source_to_group[name]
                # a group mapped here (not by the load) has no recorded source shape: the converted
                # result is checked against the parameter's shape in pass 2 instead
                shape = self.state.source_shapes.get(name, self.derived_shapes.get(name))
                target = _Target(tuple(shape), self.target_dtype(g.target), g)
                self.groups[g.target] = g
                param, how = g.target, f"the checkpoint tensors {', '.join(repr(s) for s in g.sources[:3])}"
            elif name in self.hp or (name in self.params and self.owner(name) is None):
                p = self.hp.get(name, self.params.get(name))
                target = _Target(tuple(p.shape), p.dtype)
                self.direct.append(name)
                param, how = name, repr(name)
            else:
                raise CheckpointError(f"reload: {name!r} is not a weight of this model{self._did_you_mean(name)}")
            earlier = claimed.setdefault(param, how)
            if earlier != how:
                raise CheckpointError(f"reload: parameter {param!r} is given twice: as {earlier} and as {how}")
            self.targets[name] = target
            _check_tensor(name, t, target, self.device)
        for g in self.groups.values():
            missing = [k for k in g.sources if k not in incoming]
            if missing:
                raise CheckpointError(
                    f"reload: {g.target!r} needs {len(g.sources)} checkpoint tensors, {len(missing)} missing: "
                    + ", ".join(missing[:8])
                )
        provided = set(self.direct) | set(self.groups)
        self.touched_layers = [n for n, ps in self.layer_params.items() if any(p in provided for p in ps)]
        for layer in self.touched_layers:
            missing = [p for p in self.layer_params[layer] if p not in provided]
            if missing:
                raise CheckpointError(f"reload: layer {layer!r} is quantized as a whole; missing {', '.join(missing)}")
            apart = [m for m in self.siblings.get(layer, ()) if m not in self.touched_layers]
            if apart:
                raise CheckpointError(
                    f"reload: layer {layer!r} shares its outermost scale with {', '.join(map(repr, apart))} (fused siblings, "
                    "served as one GEMM with one global scale): give their weights in the same call"
                )

    def _map_unknown_names(self, incoming: dict[str, torch.Tensor]) -> None:
        """Map checkpoint names the load did not see (a model loaded from a saved quantized folder
        knows only that folder's names, not the original per-expert ones) with transformers' own
        conversion rules, as a load of the high-precision checkpoint would."""
        self.derived_shapes: dict[str, tuple[int, ...]] = {}
        unknown = [n for n in incoming if n not in self.source_to_group and n not in self.hp and n not in self.params]
        if not unknown:
            return
        from oqcore.loading.names import NameMapper

        targets = list(self.hp) + [n for n in self.params if self.owner(n) is None]
        try:
            groups, _ = NameMapper(self.model, targets).group(unknown)
        except OqError:
            raise
        except Exception:  # names no rule maps stay unknown and are reported by name below
            return
        for g in groups:
            # a target the load already mapped keeps the load's names (an unknown name reaching it,
            # a typo'd expert index, stays unknown and is reported with a did-you-mean)
            if (g.rule is None and g.target == g.sources[0]) or g.target in self.state.groups:
                continue
            for k in g.sources:
                self.source_to_group[k] = g
                t = incoming[k]
                self.derived_shapes[k] = tuple(t.shape) if isinstance(t, torch.Tensor) else ()

    def _did_you_mean(self, name: str) -> str:
        known = list(self.source_to_group) + list(self.hp) + [n for n in self.params if self.owner(n) is None]
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.7)
        return f"; did you mean {close[0]!r}?" if close else ""

    # -- pass 2: quantize into scratch ------------------------------------------------------------

    def quantize(self, incoming: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
        """Quantize every touched layer into a scratch wrapper; returns ``{layer: scratch}``.

        Groups producing unquantized parameters are converted and checked here too (the result is
        dropped and made again in the commit, so no high-precision copy is kept)."""
        staged: dict[str, nn.Module] = {}
        pending: dict[str, dict[str, torch.Tensor]] = {n: {} for n in self.touched_layers}
        # model-named weights first (no conversion cost), then one group at a time, the groups of
        # one layer together (so converted high-precision tensors wait for one layer at most); a
        # plain checkpoint tensor of an unquantized parameter was fully checked in pass 1
        order = {name: i for i, name in enumerate(self.state.wrappers)}
        groups = sorted(
            (g for g in self.groups.values() if not self._plain_unquantized(g)),
            key=lambda g: order.get(self.owner(g.target), -1),
        )
        batches = [(lambda n=n: {n: incoming[n]}, [n]) for n in self.direct] + [
            (lambda g=g: self._convert(g, incoming), [g.target]) for g in groups
        ]
        for batch, names in batches:
            if self.failure is not None:
                self._dry(names, pending)
                continue
            try:
                self._place(batch(), pending, staged)
            except Exception as e:
                if not self.state.shards:
                    raise
                self.failure = e  # keep joining the collectives the other ranks run
                self._dry(names, pending)
                for owner in self.touched_layers:
                    shard = getattr(self.state.wrappers[owner], "oq_shard", None)
                    if shard is not None and shard.pending:
                        shard.fail_pending("reloading")
                for layer in self.queue.unprocessed:  # fused siblings of the layer that raised
                    _join_failed(layer)
        if self.failure is not None:
            return staged
        incomplete = list(pending)  # complete layers were popped
        if incomplete:
            raise CheckpointError(f"reload: layer(s) {', '.join(map(repr, incomplete))} did not get all their weights")
        return staged

    def _dry(self, names: list[str], pending: dict[str, dict]) -> None:
        """After this rank failed: count ``names`` as placed and join the collectives of each
        sharded layer they complete, as failed."""
        for name in names:
            owner = self.owner(name)
            if owner is None or owner not in pending:
                continue
            pending[owner][name.rpartition(".")[2]] = None
            if len(pending[owner]) == len(self.layer_params[owner]):
                pending.pop(owner)
                self.queue.complete(owner, self.state.wrappers[owner], dry=_join_failed)

    def _place(self, values: dict[str, torch.Tensor], pending: dict[str, dict], staged: dict[str, nn.Module]) -> None:
        """Put one batch's converted values in ``pending``; quantize each layer they complete."""
        for name, value in values.items():
            owner = self.owner(name)
            if owner is None:
                if name not in self.direct:  # a converted group result: check it like a given tensor
                    p = self.params.get(name)
                    if p is None:
                        raise CheckpointError(f"reload: converting the checkpoint tensors gave {name!r}, not a weight of this model")
                    _check_tensor(name, value, _Target(tuple(p.shape), p.dtype), self.device)
                continue
            want = tuple(self.hp[name].shape) if name in self.hp else None
            if want is not None and tuple(value.shape) != want:
                raise CheckpointError(
                    f"reload: the given tensors make {name!r} of shape {list(value.shape)}, expected {list(want)}"
                )
            pname = name.rpartition(".")[2]
            if owner not in pending:  # a one-to-many rule reaching into another layer
                pending[owner] = {}
                self.touched_layers.append(owner)
            if pname in pending[owner]:
                raise CheckpointError(f"reload: parameter {name!r} is given twice (directly and through checkpoint tensors)")
            pending[owner][pname] = value
            if len(pending[owner]) == len(self.layer_params[owner]):
                self._quantize_layer(owner, pending.pop(owner), staged)

    def _plain_unquantized(self, g: TargetGroup) -> bool:
        """A one-to-one checkpoint tensor (no transformers rule) of a parameter no wrapper owns."""
        return g.rule is None and self.owner(g.target) is None

    def _convert(self, g: TargetGroup, incoming: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A group's parameters from its given sources, read into the target's dtype as a load
        reads them (one-to-many transformers rules run on the given dtype, as in a load)."""
        want = self.target_dtype(g.target) if g.rule is None or is_expert_fusion(g.rule) else None

        def load(key: str) -> torch.Tensor:
            """Incoming tensor ``key``, detached, in the target's floating dtype when one is set."""
            t = incoming[key].detach()
            return t.to(want) if want is not None else t

        try:
            return g.convert(self.model, load)
        except OqError:
            raise
        except Exception as e:
            raise CheckpointError(
                f"reload: converting the checkpoint tensors of {g.target!r} ({', '.join(g.sources[:3])}...) failed: "
                f"{type(e).__name__}: {e}"
            ) from e

    def _quantize_layer(self, owner: str, hp: dict[str, torch.Tensor], staged: dict[str, nn.Module]) -> None:
        """Quantize layer ``owner`` from its converted weights ``hp`` into a scratch copy (fused
        siblings wait for each other: :mod:`oqcore.loading.siblings`); put every scratch quantized
        now in ``staged``."""
        scratch = self._scratch(owner, hp)
        self.scratches[owner] = scratch
        for name in self.queue.complete(owner, scratch):
            done = self.scratches.pop(name)
            _check_layout(self.state.wrappers[name], done)
            staged[name] = done

    def _scratch(self, owner: str, hp: dict[str, torch.Tensor]) -> nn.Module:
        """A scratch copy of layer ``owner`` holding its new high-precision weights ``hp``."""
        live = self.state.wrappers[owner]
        scratch = empty_like(live)
        for pname in list(hp):
            # popped: the unconverted value is freed as soon as its converted copy exists
            value = hp.pop(pname).detach()
            with torch.no_grad():
                value = value.to(self.device, get_parameter(scratch, pname).dtype)
            set_parameter(scratch, pname, nn.Parameter(value, requires_grad=False))
            del value
        # the static activation state (a calibrated input_scale) is not computed from the weights:
        # the layer keeps it while its weights are quantized again
        for pname in live.method.activation_state():
            set_parameter(scratch, pname, nn.Parameter(get_parameter(live, pname).detach().clone(), requires_grad=False))
        return scratch

    # -- pass 3: commit ---------------------------------------------------------------------------

    def commit(self, incoming: dict[str, torch.Tensor], staged: dict[str, nn.Module]) -> None:
        """Copy the staged quantized tensors and the unquantized parameters into the model."""
        try:
            with torch.no_grad():
                for owner, scratch in staged.items():
                    live = self.state.wrappers[owner]
                    for pname, new in own_parameters(scratch).items():
                        get_parameter(live, pname).copy_(new)
                    for bname, new in own_buffers(scratch).items():
                        get_buffer(live, bname).copy_(new)
                for name in self.direct:
                    if self.owner(name) is None:
                        self.params[name].copy_(incoming[name])
                for g in self.groups.values():
                    if self._plain_unquantized(g):
                        self.params[g.target].copy_(incoming[g.sources[0]])
                    elif self.owner(g.target) is None:
                        for name, value in self._convert(g, incoming).items():
                            self.params[name].copy_(value)
        except Exception as e:  # every check passed: this is a bug, and the model is partly updated
            raise InternalError(
                f"reload: copying into the model failed after every check passed ({type(e).__name__}: {e}); the model "
                "is partly updated: reload it again"
            ) from e


def _join_failed(layer: nn.Module) -> None:
    """A failed rank's stand-in for quantizing ``layer`` (:func:`~oqcore.parallel.shard.join_as_failed`)."""
    join_as_failed(layer, "reloading")


def _check_tensor(name: str, t: object, target: _Target, device: torch.device) -> None:
    """One given tensor: type, device, dtype, shape, and finite values that stay finite in the
    dtype they are converted to."""
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"reload: {name!r} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_meta:
        raise CheckpointError(f"reload: {name!r} is on the meta device (no values); give a materialized tensor")
    if t.layout != torch.strided:
        # sparse/compressed layouts reach no quantizer (and fail deep inside torch ops): say so here
        raise CheckpointError(f"reload: {name!r} has layout {t.layout}; give a dense tensor (t.to_dense())")
    if t.device.type != "cpu" and not _same_device(t.device, device):
        raise CheckpointError(f"reload: {name!r} is on {t.device}; give it on cpu or on the model's device ({device})")
    if t.dtype not in HP_DTYPES:
        raise CheckpointError(f"reload: {name!r} must be a floating-point tensor ({dtype_names()}), got {t.dtype}")
    if tuple(t.shape) != tuple(target.shape):
        raise CheckpointError(f"reload: {name!r} has shape {list(t.shape)}, expected {list(target.shape)}")
    if t.numel() == 0:
        return
    # One min/max pass answers both questions: NaN/Inf propagate into it, and rounding to a
    # narrower dtype is monotonic, so if the min and max stay finite once converted, every value does.
    lo, hi = torch.aminmax(t.detach())
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        check_finite(t, name)  # raises, naming the count (and the expert of a stack)
    if target.dtype == t.dtype or target.dtype not in HP_DTYPES:
        return
    if bool(torch.isfinite(lo.to(target.dtype)) & torch.isfinite(hi.to(target.dtype))):
        return
    over = int((~torch.isfinite(t.detach().to(target.dtype))).sum())
    biggest = max(abs(float(lo)), abs(float(hi)))
    raise UnsupportedLayerError(
        name,
        f"{over} value(s) overflow the model's dtype {target.dtype} (largest magnitude {biggest:.4g}, "
        f"{target.dtype} max {torch.finfo(target.dtype).max:.4g}): they would become Inf; refusing to reload",
    )


def _check_layout(live: nn.Module, scratch: nn.Module) -> None:
    """The re-quantized tensors must fit the live storages exactly (same names, shapes, dtypes)."""
    for kind, own in (("parameter", own_parameters), ("buffer", own_buffers)):
        old, new = own(live), own(scratch)
        for pname in sorted(old.keys() | new.keys()):
            a, b = old.get(pname), new.get(pname)
            if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
                def show(t):
                    """``[shape] dtype`` of ``t``, or ``nothing``."""
                    return "nothing" if t is None else f"{list(t.shape)} {t.dtype}"

                raise PluginError(
                    f"plugin {method_plugin(live.method)!r}: re-quantizing layer {live.layer_name!r} gave "
                    f"{kind} {pname!r} as {show(b)}, the model holds {show(a)}; "
                    f"{type(live.method).__name__}.process_weights_after_loading must give the same layout every time"
                )


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)
