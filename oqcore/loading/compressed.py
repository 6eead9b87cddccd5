"""Reading a compressed-tensors checkpoint (llm-compressor's format, what vLLM serves) as stored.

:func:`oqcore.load` routes a folder whose ``config.json`` declares ``quantization_config.quant_method
== "compressed-tensors"`` here. Nothing is re-quantized: every quantized layer gets the stored
bytes and runs through the oqcore method of the matching plugin scheme and the oracle's forward
backends, exactly as a folder written by :func:`oqcore.save_quantized` does
(:mod:`oqcore.loading.saved`).

No scheme knowledge lives here. ``quantization_config`` is parsed with compressed-tensors' own
pydantic models; each config group's ``weights`` / ``input_activations`` args are compared with
what every registered :class:`oqcore.Scheme` declares (:attr:`oqcore.KeyFormat.compressed_tensors`),
and the layers a group covers are found with compressed-tensors' own matcher
(``compressed_tensors.utils.is_match``; the config side is :mod:`oqcore.loading.ct_config`). The tensors a quantized layer must hold come from its
method (:func:`oqcore.layer_tensors.quantized_tensors`); stored tensors are converted to them by
dtype only (``pack-quantized``'s ``weight_packed`` int32 words -> the 1-byte integers
compressed-tensors' ``unpack_from_int32`` gives; a ``weight_packed`` its format's compressor writes
as the packed bytes themselves (``nvfp4-pack-quantized``, ``mxfp4-pack-quantized``: two e2m1 codes
per byte, no ``weight_shape``) is the layer's ``weight`` unchanged; unsigned bytes -> the expected
1-byte float dtype reinterpreted (e8m0 exponents), bf16/f16 scales -> float32, exactly). Per-expert
tensors of MoE
checkpoints are mapped to the fused experts with transformers' own conversion mapping
(:class:`oqcore.loading.names.NameMapper`) and stacked into the wrapper's ``w13_*`` (gate then up)
and ``w2_*`` tensors; gate and up stored with different values of a tensor kept once per expert
(a per-tensor scale, an NVFP4 global scale) are requantized to one (:func:`_requantize_shards`).
A fused-experts layer may also be stored whole, one ``[E, ...]`` stack per fused parameter under
``<experts>.<parameter>`` with its biases beside it (how the gpt-oss peer view presents
``*_blocks`` / ``*_scales``).

compressed-tensors is imported only when such a checkpoint is loaded.
"""

from __future__ import annotations

import re
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oqcore.config import QuantizationConfig
from oqcore.devices import resolve_device
from oqcore.errors import CheckpointError, ConfigError, OqError
from oqcore.layer_tensors import TensorSpec, quantized_tensors
from oqcore.layers import layer_kind
from oqcore.loading.checkpoint import TensorEntry, TensorReader, checkpoint_entries
from oqcore.loading.checks import CT_QUANT_METHOD, check_against_model, check_expert_indices, is_quant_name
from oqcore.loading.ct_config import PACKED, PACKED_SHAPE, GroupScheme, ct_config, match_group
from oqcore.loading.install import OnlineFeed, install_wrappers
from oqcore.loading.meta import build_meta_model, read_model_config
from oqcore.loading.names import NameMapper, TargetGroup, is_expert_fusion
from oqcore.loading.overlay import overlay, stored_specs
from oqcore.loading.peer_configs import peer_view
from oqcore.loading.place import assign_tensor
from oqcore.loading.saved import check_quantized_values, finish_stored_load
from oqcore.loading.state import LoadStats
from oqcore.methods import OnlineMoEMethodBase
from oqcore.planning import plan

_MOE_PREFIX = OnlineMoEMethodBase.QUANTIZED_NAMES  # fused experts' parameters -> their quantized tensors' prefix

_PACKED, _PACKED_SHAPE = PACKED, PACKED_SHAPE



# -- which layers the groups quantize -------------------------------------------------------------------


@dataclass
class Feed:
    """The stored modules that feed one quantized layer: ``prefixes`` maps each quantized weight's
    prefix (``weight``; ``w13_weight`` / ``w2_weight`` for experts) to one list per expert (a single
    list for a linear) of the checkpoint modules stacked along rows (gate then up)."""

    layer: str
    kind: str
    group: GroupScheme
    prefixes: dict[str, list[list[str]]] = field(default_factory=dict)
    stacked: bool = False
    """Fused experts stored whole: each prefix's one module holds the ``[E, ...]`` stack."""
    hp_module: str | None = None
    """The stored module holding a stacked feed's high-precision tensors (the experts' biases)
    under the layer's own parameter names."""

    def modules(self) -> list[str]:
        """Every stored (checkpoint) module name feeding this layer, in order."""
        mods = [m for lists in self.prefixes.values() for mods in lists for m in mods]
        return mods + ([self.hp_module] if self.hp_module is not None else [])


@dataclass
class _Expert:
    module: str  # checkpoint module name, e.g. model.layers.0.mlp.experts.3.gate_proj
    fused: str  # the fused experts module, e.g. model.layers.0.mlp.experts
    param: str  # its high-precision parameter this one fills: gate_up_proj / down_proj
    shard: int  # position among the rule's source patterns (gate 0, up 1)
    pattern: str
    expert: int = -1


def _ckpt_modules(entries: dict[str, TensorEntry]) -> dict[str, dict[str, TensorEntry]]:
    """Checkpoint module name -> {local tensor name: entry}."""
    out: dict[str, dict[str, TensorEntry]] = defaultdict(dict)
    for name, e in entries.items():
        mod, _, attr = name.rpartition(".")
        out[mod][attr] = e
    return out


def _quantized_locals(local: dict[str, TensorEntry]) -> bool:
    return any(is_quant_name(n) or e.is_float8 for n, e in local.items())


def plan_feeds(
    model: nn.Module, cfg: Any, schemes: dict[str, GroupScheme], entries: dict[str, TensorEntry], path: Path
) -> tuple[list[Feed], set[str]]:
    """The quantized layers of ``model`` (built on meta, not yet wrapped) and the checkpoint
    modules feeding them, by compressed-tensors' own matching of each group's ``targets`` and the
    config's ``ignore`` against the module names (the checkpoint's and the model's; a per-expert
    projection as an ``nn.Linear`` named ``<experts>.<e>.<proj>``). Returns ``(feeds, checkpoint
    modules they read)``. Raises :class:`oqcore.CheckpointError` for a layer two groups match,
    experts of one fused module quantized differently (or partly), or quantized tensors of a module
    this model cannot place (e.g. per-expert gpt-oss tensors, fused on disk)."""
    from compressed_tensors.utils import is_match

    cfg_file = path / "config.json"
    ignore = list(cfg.ignore or [])
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    mapper = NameMapper(model, names)
    modules = dict(model.named_modules())
    by_module = _ckpt_modules(entries)
    linears: dict[str, str] = {}  # model linear -> checkpoint module
    experts: dict[str, _Expert] = {}
    stacked: dict[str, dict[str, str]] = defaultdict(dict)  # fused experts -> {its parameter: stored module}
    for mod, local in by_module.items():
        fused, _, hp = mod.rpartition(".")
        if hp in _MOE_PREFIX and fused in modules and layer_kind(modules[fused]) == "moe" and _quantized_locals(local):
            stacked[fused][hp] = mod  # a whole quantized expert stack (a peer view's name for gpt-oss's blocks)
            continue
        target, pattern = mapper.target_of(f"{mod}.weight")
        rule = mapper._pattern_to_converter.get(pattern) if pattern is not None else None
        if rule is not None and is_expert_fusion(rule):
            fused, _, param = target.rpartition(".")
            experts[mod] = _Expert(mod, fused, param, list(rule.source_patterns).index(pattern), pattern)
            continue
        owner = target.rpartition(".")[0] if target.endswith(".weight") else None
        if owner in modules and layer_kind(modules[owner]) == "linear" and pattern is None:
            linears[owner] = mod
        elif _quantized_locals(local) and (owner not in modules or layer_kind(modules[owner]) != "linear"):
            e = next(e for n, e in local.items() if is_quant_name(n) or e.is_float8)
            raise CheckpointError(
                f"{e.file}: tensor {e.name!r} is quantized, but module {mod!r} is not a linear layer of "
                f"{type(model).__name__} and transformers' conversion mapping places it nowhere in the model "
                "(per-expert tensors of a model whose checkpoints keep the experts fused, such as gpt-oss, cannot be read)"
            )
    # expert indices, in natural order per (fused parameter, pattern), checked 0..E-1
    per_source: dict[tuple[str, str], list[str]] = defaultdict(list)
    for x in experts.values():
        per_source[(f"{x.fused}.{x.param}", x.pattern)].append(x.module)
    for (target, pattern), mods in per_source.items():
        mods.sort(key=lambda m: [(0, int(p)) if p.isdigit() else (1, p) for p in m.split(".")])
        n_exp = _num_experts(modules[target.rpartition(".")[0]])
        keys = [f"{m}.weight" for m in mods]
        if len(mods) != n_exp:
            raise CheckpointError(
                f"{path}: {target!r} fuses {n_exp} experts, but the checkpoint has {len(mods)} modules matching "
                f"{pattern!r}: {', '.join(mods[:6])}{' ...' if len(mods) > 6 else ''}"
            )
        check_expert_indices(target, pattern, keys, n_exp, path, {})
        for i, m in enumerate(mods):
            experts[m].expert = i

    # what a per-expert projection is to compressed-tensors' matcher (a Linear), built per call: no
    # module is made at import time
    expert_probe = nn.Linear(1, 1, device="meta")

    def group_of(names_: set[str], module: nn.Module, what: str) -> GroupScheme | None:
        """The one config group whose targets match ``module`` under any of ``names_`` (its
        checkpoint and model names), ``None`` when ignored or unmatched; two groups is a
        :class:`oqcore.CheckpointError` naming ``what``."""
        hits = [g for g, s in cfg.config_groups.items() if any(is_match(n, module, s.targets) for n in names_)]
        if any(is_match(n, module, ignore) for n in names_):
            return None
        if len(hits) > 1:
            raise CheckpointError(
                f"{cfg_file}: {what} is matched by config groups {hits[0]!r} and {hits[1]!r} "
                "(quantization_config.config_groups.*.targets); a layer has one scheme"
            )
        return schemes[hits[0]] if hits else None

    feeds: list[Feed] = []
    used: set[str] = set()
    for name, module in modules.items():
        kind = layer_kind(module)
        if kind == "linear":
            ck = linears.get(name, name)
            g = group_of({name, ck}, module, f"layer {name!r}")
            if g is not None:
                feeds.append(Feed(name, "linear", g, {"weight": [[ck]]}))
                used.add(ck)
        elif kind == "moe" and name in stacked:
            g = group_of({name}, module, f"experts {name!r}")
            if g is None:
                e = next(iter(by_module[next(iter(stacked[name].values()))].values()))
                raise CheckpointError(
                    f"{e.file}: the experts {name!r} are stored quantized (tensor {e.name!r}, {e.describe()}), but "
                    f"{cfg_file.name}'s quantization_config does not quantize them (ignored, or matched by no config group)"
                )
            missing = [hp for hp in _MOE_PREFIX if hp not in stacked[name]]
            if missing:
                raise CheckpointError(
                    f"{path}: the experts {name!r} store {', '.join(repr(m) for m in stacked[name].values())} quantized "
                    f"but not their {', '.join(missing)}: a fused experts module is quantized as a whole"
                )
            feed = Feed(name, "moe", g, {prefix: [[stacked[name][hp]]] for hp, prefix in _MOE_PREFIX.items()}, True)
            feed.hp_module = name if name in by_module else None
            feeds.append(feed)
            used.update(feed.modules())
        elif kind == "moe":
            mine = [x for x in experts.values() if x.fused == name]
            if not mine:
                continue
            got = {}
            for x in mine:
                last = x.module.rpartition(".")[2]
                got[x.module] = group_of(
                    {x.module, f"{name}.{x.expert}.{last}"}, expert_probe, f"expert projection {x.module!r}"
                )
            distinct = {None if g is None else g.group for g in got.values()}
            if distinct == {None}:
                continue
            if len(distinct) > 1:
                by = defaultdict(list)
                for m, g in got.items():
                    by["not quantized (ignored or matched by no group)" if g is None else f"group {g.group!r}"].append(
                        m
                    )
                shown = "; ".join(
                    f"{k}: {v[0]}" + (f" and {len(v) - 1} more" if len(v) > 1 else "") for k, v in by.items()
                )
                raise CheckpointError(
                    f"{cfg_file}: the experts fused into {name!r} are not all quantized with one scheme ({shown}); "
                    "oqcore quantizes a fused experts module as a whole"
                )
            g = next(iter(got.values()))
            feed = Feed(name, "moe", g)
            n_exp = _num_experts(module)
            for param, prefix in _MOE_PREFIX.items():
                shards = sorted({x.shard for x in mine if x.param == param})
                lists = [[""] * len(shards) for _ in range(n_exp)]
                for x in mine:
                    if x.param == param:
                        lists[x.expert][shards.index(x.shard)] = x.module
                feed.prefixes[prefix] = lists
            if any(not m for lists in feed.prefixes.values() for mods in lists for m in mods):
                raise CheckpointError(
                    f"{path}: the checkpoint lacks per-expert projections of {name!r} (gate, up and down per expert)"
                )
            feeds.append(feed)
            used.update(feed.modules())
    return feeds, used


def _num_experts(module: nn.Module) -> int:
    from oqcore.layers import moe_layout

    return moe_layout(module).num_experts


# -- the tensors ---------------------------------------------------------------------------------------


def _dtype(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _convertible(stored: torch.dtype, spec: TensorSpec) -> bool:
    """Whether a stored dtype becomes the expected one by :func:`_convert` (exactly)."""
    if stored == spec.dtype or (spec.high_precision and stored.is_floating_point):
        return True
    if _raw_bytes(stored, spec.dtype):
        return True  # compressed-tensors stores e8m0 exponents as uint8
    return spec.dtype == torch.float32 and stored in (torch.bfloat16, torch.float16)


def _raw_bytes(stored: torch.dtype, want: torch.dtype) -> bool:
    """Unsigned bytes stored for a 1-byte float dtype safetensors or the writer has no tag for:
    reinterpreted, not converted."""
    return (
        not stored.is_floating_point and not stored.is_signed and stored != torch.bool and stored.itemsize == 1
        and want.is_floating_point and want.itemsize == 1
    )  # fmt: skip


def _small_int(d: torch.dtype) -> bool:
    """A signed 1-byte integer dtype: what ``unpack_from_int32`` gives."""
    return not d.is_floating_point and d.is_signed and d != torch.bool and d.itemsize == 1


_WORD = torch.int32
"""The word ``pack-quantized`` packs values into."""
_WORD_BITS = torch.iinfo(_WORD).bits


def _convert(value: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    if _raw_bytes(value.dtype, spec.dtype):
        return value.view(spec.dtype)
    return value.to(spec.dtype)


def _shape_ok(have: tuple[int, ...], want: tuple[int, ...]) -> bool:
    return have == want or (_numel(have) == 1 and _numel(want) == 1)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass
class _Part:
    """One stored module's share of one quantized tensor: ``rows`` of expert ``expert`` (``None``:
    the whole tensor of a linear), or the whole per-expert tensor when ``shared`` (one value per
    expert that every shard must hold identically: a per-tensor w13 scale)."""

    param: str
    module: str
    local: str
    expert: int | None
    rows: slice | None
    shared: bool
    shape: tuple[int, ...]
    reduce: bool = False  # static activation state: one value per layer, the max over every stored copy


def plan_parts(
    feed: Feed,
    wrapper: nn.Module,
    specs: dict[str, TensorSpec],
    by_module: dict[str, dict[str, TensorEntry]],
    path: Path,
) -> list[_Part]:
    """Every stored tensor a quantized layer reads and where it goes, checked against the
    layer's expected tensors from the headers alone. Raises :class:`oqcore.CheckpointError` naming
    the file, tensor and layer for a missing, extra, wrongly shaped or wrongly typed tensor."""
    method = type(wrapper.method).__name__
    layer = feed.layer
    parts: list[_Part] = []
    covered: set[str] = set()
    for prefix, lists in feed.prefixes.items():
        params = {p: s for p, s in specs.items() if p == prefix or p.startswith(prefix + "_")}
        covered.update(params)
        for e_idx, mods in enumerate(lists):
            expert = None if feed.kind == "linear" or feed.stacked else e_idx
            n = len(mods)
            for shard, mod in enumerate(mods):
                local = dict(by_module.get(mod, {}))
                extra_hp = {}
                if feed.kind == "linear":  # the linear's high-precision tensors (bias) sit beside its weight
                    for p, s in specs.items():
                        if s.high_precision and p not in params and p in local:
                            extra_hp[p] = local.pop(p)
                            covered.add(p)
                packed = local.pop(_PACKED, None)
                packed_shape = None if feed.group.packed_bytes else local.pop(_PACKED_SHAPE, None)
                stored_bytes = packed if feed.group.packed_bytes else None
                if packed is not None and feed.group.packed_bytes:
                    # the packed bytes are the layer's weight as stored: checked and read as a plain tensor
                    if "weight" in local:
                        raise CheckpointError(
                            f"{packed.file}: module {mod!r} holds both {packed.name!r} and {local['weight'].name!r}; "
                            f"a {feed.group.group!r} layer stores its weight once, as {_PACKED!r}"
                        )
                    local["weight"] = packed
                    packed = None
                want_local = {"weight" + p[len(prefix) :]: p for p in params}
                have = set(local) | ({"weight"} if packed is not None else set())
                for lname, param in want_local.items():
                    spec = params[param]
                    full = spec.shape if expert is None else spec.shape[1:]
                    if lname not in have:
                        shown = _PACKED if lname == "weight" and feed.group.packed_bytes else lname
                        raise CheckpointError(
                            f"{path}: missing tensor '{mod}.{shown}' ({_dtype(spec.dtype)}) of quantized layer {layer!r} "
                            f"({method}, quantization_config group {feed.group.group!r})"
                        )
                    rows, shared, want = _share(full, n, shard, wrapper, layer, mods, param, prefix, params[prefix])
                    if lname == "weight" and packed is not None:
                        e = packed
                        cols = -(-want[-1] * feed.group.num_bits // _WORD_BITS)
                        if e.dtype != _WORD or e.shape != (*want[:-1], cols) or not _small_int(spec.dtype):
                            raise CheckpointError(
                                f"{e.file}: tensor {e.name!r} is {e.describe()}; quantized layer {layer!r} ({method}) expects "
                                f"int32 {[*want[:-1], cols]} ({feed.group.num_bits}-bit values packed into int32, "
                                f"unpacking to {spec.describe() if expert is None else _dtype(spec.dtype) + ' ' + str(list(want))})"
                            )
                        if packed_shape is None:
                            raise CheckpointError(
                                f"{path}: missing tensor '{mod}.{_PACKED_SHAPE}' beside {e.name!r} (the unpacked shape)"
                            )
                        if packed_shape.dtype.is_floating_point or packed_shape.shape != (len(want),):
                            raise CheckpointError(
                                f"{packed_shape.file}: tensor {packed_shape.name!r} is {packed_shape.describe()}; expected an "
                                f"integer tensor [{len(want)}] holding the unpacked shape {list(want)}"
                            )
                        parts.append(_Part(param, mod, _PACKED, expert, rows, shared, want))
                        continue
                    e = local.pop(lname)
                    if lname == "weight" and e is stored_bytes:
                        lname = _PACKED  # read back under its stored name
                    if not _shape_ok(e.shape, want) or not _convertible(e.dtype, spec):
                        raise CheckpointError(
                            f"{e.file}: tensor {e.name!r} is {e.describe()}, quantized layer {layer!r} ({method}) expects "
                            f"{_dtype(spec.dtype)} {list(want)}"
                            + (f" for expert {expert}" if expert is not None else "")
                            + (
                                " (or its bytes as uint8)"
                                if spec.dtype.is_floating_point and spec.dtype.itemsize == 1
                                else ""
                            )
                            + (
                                " (or bfloat16 / float16 scales, converted exactly)"
                                if spec.dtype == torch.float32
                                else ""
                            )
                        )
                    parts.append(_Part(param, mod, lname, expert, rows, shared, want))
                if packed_shape is not None and packed is None:
                    local[_PACKED_SHAPE] = packed_shape
                parts.extend(_state_parts(prefix, mod, local, specs, covered, layer, method, feed, path))
                for lname, e in local.items():
                    if lname in want_local:
                        continue
                    why = ""
                    if "zero_point" in lname:
                        why = "; zero points mean asymmetric quantization, oqcore's schemes are symmetric"
                    elif lname == "input_scale":
                        why = (
                            "; input_scale is a static input activation scale, read only for a config group whose "
                            "input_activations are static (dynamic: false)"
                        )
                    raise CheckpointError(
                        f"{e.file}: unexpected tensor {e.name!r}: quantized layer {layer!r} ({method}, quantization_config "
                        f"group {feed.group.group!r}) holds {', '.join(sorted(want_local))}{why}"
                    )
                for p, e in extra_hp.items():
                    spec = specs[p]
                    if e.shape != spec.shape or not e.dtype.is_floating_point:
                        raise CheckpointError(
                            f"{e.file}: tensor {e.name!r} is {e.describe()}, quantized layer {layer!r} ({method}) expects a "
                            f"floating tensor {list(spec.shape)}"
                        )
                    parts.append(_Part(p, mod, p, None, None, False, spec.shape))
    if feed.hp_module is not None:  # stacked experts: their biases sit in the experts module, under their own names
        local = dict(by_module.get(feed.hp_module, {}))
        for p, spec in specs.items():
            if spec.high_precision and p not in covered and p in local:
                e = local.pop(p)
                if e.shape != spec.shape or not e.dtype.is_floating_point:
                    raise CheckpointError(
                        f"{e.file}: tensor {e.name!r} is {e.describe()}, quantized layer {layer!r} ({method}) expects a "
                        f"floating tensor {list(spec.shape)}"
                    )
                parts.append(_Part(p, feed.hp_module, p, None, None, False, spec.shape))
                covered.add(p)
        if local:
            e = next(iter(local.values()))
            stored = [x.name for lists in feed.prefixes.values() for mods in lists for m in mods for x in by_module[m].values()]
            raise CheckpointError(
                f"{e.file}: unexpected tensor {e.name!r} ({e.describe()}): quantized experts {layer!r} ({method}) are "
                f"stored as {', '.join(repr(n) for n in stored)}, with "
                f"{', '.join(repr(p) for p, s in specs.items() if s.high_precision) or 'nothing'} beside them"
            )
    missing = [p for p in specs if p not in covered]
    if missing:
        p = missing[0]
        where = feed.prefixes.get("weight", [[layer]])[0][0]
        what = "a bias (the stored layer has none)" if specs[p].high_precision else "a tensor"
        raise CheckpointError(
            f"{path}: missing tensor '{where}.{p}' ({specs[p].describe()}) of quantized layer {layer!r} ({method}): {what} "
            "the layer holds"
        )
    return parts


def _state_parts(
    prefix: str,
    mod: str,
    local: dict[str, TensorEntry],
    specs: dict[str, TensorSpec],
    covered: set[str],
    layer: str,
    method: str,
    feed: Feed,
    path: Path,
) -> list[_Part]:
    """The static activation state (``input_scale``) stored beside one module feeding weight
    ``prefix``, taken out of ``local``. Every stored copy (gate and up, every expert) goes into the
    layer's one value by their max, as vLLM's fp8 MoE keeps one input scale per layer."""
    base = prefix[: -len("weight")] if prefix.endswith("weight") else f"{prefix}_"
    out = []
    for q, spec in specs.items():
        if not (spec.state and q.startswith(base + "input_")):
            continue
        lname = q[len(base) :]
        covered.add(q)
        e = local.pop(lname, None)
        if e is None:
            raise CheckpointError(
                f"{path}: missing tensor '{mod}.{lname}' ({spec.describe()}): quantized layer {layer!r} ({method}, "
                f"quantization_config group {feed.group.group!r}) runs static input activations, which need the "
                "calibrated input scale"
            )
        if not _shape_ok(e.shape, spec.shape) or not _convertible(e.dtype, spec):
            raise CheckpointError(
                f"{e.file}: tensor {e.name!r} is {e.describe()}, quantized layer {layer!r} ({method}) expects "
                f"{_dtype(spec.dtype)} {list(spec.shape)} (one static input scale)"
            )
        out.append(_Part(q, mod, lname, None, None, False, spec.shape, reduce=True))
    return out


def _share(
    full: tuple[int, ...],
    n: int,
    shard: int,
    wrapper: nn.Module,
    layer: str,
    mods: list[str],
    param: str,
    prefix: str,
    qdata: TensorSpec,
):
    """``(rows, shared, shard shape)`` of shard ``shard`` of ``n`` stacked along rows into a
    per-expert tensor of shape ``full``."""
    if n == 1:
        return None, False, full
    qrows = qdata.shape[1] // n
    group_rows = getattr(wrapper.method.weight_key.scale.group_shape, "row", 1)
    if group_rows > 1 and qrows % group_rows:
        raise CheckpointError(
            f"quantized layer {layer!r}: its scales cover blocks of {group_rows} rows, and the {n} projections fused "
            f"into {prefix} ({', '.join(mods)}) have {qrows} rows each, not a multiple of {group_rows}: a block would "
            "straddle two of them, so they cannot be stacked into one tensor as stored"
        )
    if full and full[0] >= n and full[0] % n == 0:  # rows split evenly: stack the shards
        r = full[0] // n
        return slice(shard * r, (shard + 1) * r), False, (r, *full[1:])
    if _numel(full) == 1:
        return None, True, full
    raise CheckpointError(
        f"quantized layer {layer!r}: {param} is {list(full)} per expert, which the {n} stored projections "
        f"({', '.join(mods)}) cannot be stacked into"
    )


def read_parts(
    feed: Feed,
    wrapper: nn.Module,
    specs: dict[str, TensorSpec],
    parts: list[_Part],
    by_module: dict[str, dict[str, TensorEntry]],
    reader: TensorReader,
    device: torch.device,
) -> int:
    """Read, convert and stack one quantized layer's stored tensors into its parameters (checked
    values); returns the bytes read."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    out: dict[str, torch.Tensor] = {}
    shared_seen: dict[tuple[str, int], tuple[str, torch.Tensor]] = {}
    shards: dict[tuple[str, int], dict[str, torch.Tensor]] = {}  # per-tensor scale of each stored shard
    differing: set[tuple[str, int]] = set()
    nbytes = 0
    for pt in parts:
        spec = specs[pt.param]
        local = by_module[pt.module]
        if pt.local == _PACKED and not feed.group.packed_bytes:
            e, es = local[_PACKED], local[_PACKED_SHAPE]
            stored_shape = tuple(int(x) for x in reader.read(es).tolist())
            nbytes += es.nbytes
            if stored_shape != pt.shape:
                raise CheckpointError(
                    f"{es.file}: tensor {es.name!r} says {list(stored_shape)}, the layer {feed.layer!r} expects {list(pt.shape)}"
                )
            value = unpack_from_int32(reader.read(e), feed.group.num_bits, torch.Size(pt.shape))
        else:
            e = local[pt.local]
            value = reader.read(e)
            value = value if spec.high_precision else _convert(value, spec).reshape(pt.shape)
        nbytes += e.nbytes
        if not spec.high_precision:
            check_quantized_values(e.file, e.name, value, "compressed-tensors checkpoint")
        if pt.reduce:
            value = value.reshape(spec.shape)
            out[pt.param] = value if pt.param not in out else torch.maximum(out[pt.param], value)
            continue
        if pt.expert is None:
            out[pt.param] = value
            continue
        if pt.param not in out:
            out[pt.param] = torch.empty(spec.shape, dtype=spec.dtype)
        if pt.shared:
            key = (pt.param, pt.expert)
            shards.setdefault(key, {})[pt.module] = value
            if key in shared_seen:
                first_name, first = shared_seen[key]
                if not torch.equal(first, value):
                    differing.add(key)
                continue
            shared_seen[key] = (e.name, value)
            out[pt.param][pt.expert].copy_(value.reshape(spec.shape[1:]))
        elif pt.rows is None:
            out[pt.param][pt.expert].copy_(value)
        else:
            out[pt.param][pt.expert, pt.rows].copy_(value)
    done: set[tuple[str, int]] = set()
    for key in sorted(differing):
        if key not in done:  # one requantization per expert and weight, whichever of its tensors differ
            done |= {(p, key[1]) for p in _requantize_shards(feed, wrapper, parts, out, key, shards)}
    from oqcore.torch_compat import delete_parameter, own_parameters, set_parameter

    for k in [k for k, p in own_parameters(wrapper).items() if p.is_meta]:
        delete_parameter(wrapper, k)
    for param, value in out.items():
        spec = specs[param]
        set_parameter(wrapper, param, nn.Parameter(value.to(device=device, dtype=spec.dtype), requires_grad=False))
    return nbytes


def _requantize_shards(
    feed: Feed,
    wrapper: nn.Module,
    parts: list[_Part],
    out: dict[str, torch.Tensor],
    key: tuple[str, int],
    shards: dict[tuple[str, int], dict[str, torch.Tensor]],
) -> list[str]:
    """Gate and up of one expert stored with different values of a tensor oqcore keeps once per
    expert (a per-tensor fp8 scale, an NVFP4 global scale): dequantize each stored shard with its
    own tensors (the format's reference dequantizer, float32: its rows of the row-split tensors,
    its own copy of the per-expert ones), stack them, and quantize the expert's w13 again with the
    scheme's reference quantizer, as vLLM requantizes both shards to one scale when it loads such a
    checkpoint. The one lossy step of reading a checkpoint. ``shards`` holds every stored shard's
    copy of each per-expert tensor, by (parameter, expert) then module. Returns the parameters
    rewritten (every tensor of that expert's weight)."""
    from oqcore.formats import DATA, dequantize, run_quantizer

    param, expert = key
    fmt = wrapper.method.formats.weight
    prefix = next((p for p in ("w13_weight", "w2_weight") for n in fmt.tensors if fmt.param_name(p, n) == param), None)
    if prefix is None:
        listed = ", ".join(f"{m}: {v.float().flatten().tolist()}" for m, v in shards[key].items())
        raise CheckpointError(
            f"quantized layer {feed.layer!r}, expert {expert}: the stored shards' {param} differ ({listed}), and it is "
            f"not a tensor of the weight format ({', '.join(fmt.tensors)}) that could be requantized to one"
        )
    qparam = fmt.param_name(prefix, DATA)
    rows = {(pt.param, pt.module): pt.rows for pt in parts if pt.expert == expert and pt.rows is not None}
    modules = sorted({m for (p, m) in rows if p == qparam}, key=lambda m: rows[(qparam, m)].start)
    pieces = []
    for module in modules:
        tensors = {}
        for n in fmt.tensors:
            p = fmt.param_name(prefix, n)
            if (p, expert) in shards:
                tensors[n] = shards[(p, expert)][module].reshape(out[p].shape[1:])
            else:
                tensors[n] = out[p][expert, rows[(p, module)]]
        pieces.append(dequantize(fmt, tensors, torch.float32, wrapper.method.options))
    w = torch.cat(pieces)
    name = f"{feed.layer}[expert {expert}]"
    qt = run_quantizer(fmt, fmt.reference, w, wrapper.method.options, name, wrapper.method.formats.weight_name or str(fmt.key))
    written = []
    for n in fmt.tensors:
        p = fmt.param_name(prefix, n)
        out[p][expert].copy_(qt[n].reshape(out[p].shape[1:]))
        written.append(p)
    return written


# -- the load --------------------------------------------------------------------------------------------


def oq_config(feeds: list[Feed], ct_ignore: list[str], model: nn.Module) -> QuantizationConfig:
    """The oqcore config of what the checkpoint holds: one exact-name target per quantized layer
    with its group's weight and activation keys, and the checkpoint's ``ignore`` patterns that
    oqcore reads the same way (exact names and ``re:`` patterns that match no quantized layer)."""
    from oqcore.matching import matches

    targets = {f.layer: f.group.spec() for f in feeds}
    names = set(targets)
    ignore = [
        p for p in ct_ignore
        if (p.startswith("re:") or not set("*?[") & set(p)) and not any(matches(p, n) for n in names) and _compiles(p)
    ]  # fmt: skip
    return QuantizationConfig.model_validate({"targets": targets, "ignore": ignore})


def _compiles(p: str) -> bool:
    if not p.startswith("re:"):
        return True
    try:
        re.compile(p[3:])
    except re.error:
        return False
    return True


def _read_plan(path: Path, dtype: torch.dtype):
    """Everything decided before a tensor is read: ``(ct config, header entries, meta model, feeds,
    used modules, the oqcore config, what the checkpoint is for messages)``. A peer's FP8 checkpoint (FineGrainedFP8, ModelOpt) is read
    through its compressed-tensors view (:func:`oqcore.loading.peer_configs.peer_view`): its
    config, its tensors under compressed-tensors' names."""
    from oqcore.plugins import get_registry

    cfg_file = path / "config.json"
    raw = read_model_config(path)
    reg = get_registry()
    peer = peer_view(path, raw, reg)
    if peer is not None:
        raw, cfg_file = peer.config_json(), peer.source
    cfg = ct_config(raw, cfg_file)
    schemes = {name: match_group(name, g, cfg_file, reg, cfg.format) for name, g in cfg.config_groups.items()}
    entries = {e.name: e for e in checkpoint_entries(path)}
    if peer is not None:
        entries = peer.tensor_entries(entries)
    model = build_meta_model(path, dtype)
    if peer is not None:
        cfg.ignore = [*(cfg.ignore or []), *peer.model_ignore(model)]
        targets = peer.model_targets(model)
        if targets is not None:
            for g in cfg.config_groups.values():
                g.targets = list(targets)
    feeds, used = plan_feeds(model, cfg, schemes, entries, path)
    if not feeds:
        raise CheckpointError(
            f"{cfg_file}: quantization_config's config groups ({', '.join(cfg.config_groups)}) match no layer of "
            f"{type(model).__name__} (targets {[t for g in cfg.config_groups.values() for t in g.targets]}, "
            f"ignore {cfg.ignore})"
        )
    recorded = _recorded_config(raw, feeds, model)
    what = f"{peer.format if peer is not None else CT_QUANT_METHOD} checkpoint {path}"
    return cfg, entries, model, feeds, used, recorded or oq_config(feeds, list(cfg.ignore or []), model), what


def _recorded_config(raw: dict, feeds: list[Feed], model: nn.Module) -> QuantizationConfig | None:
    """The oqcore config an oqcore export recorded beside its config groups
    (:data:`oqcore.saved_format.PRODUCER_CONFIG`: scheme options, backend pins), when it quantizes
    exactly the layers the groups do with the same weight and activation keys; ``None`` otherwise
    (not an oqcore export, or edited since: the groups are what every tool reads, so they win)."""
    from oqcore.plugins import get_registry
    from oqcore.saved_format import PRODUCER, PRODUCER_CONFIG

    qc = raw["quantization_config"]
    if qc.get("producer") != PRODUCER or not isinstance(qc.get(PRODUCER_CONFIG), dict):
        return None
    try:
        cfg = QuantizationConfig.from_any(qc[PRODUCER_CONFIG])
        layers = plan(model, cfg, device="meta").quantized
    except OqError:
        return None
    reg = get_registry()
    planned = {
        lp.name: {
            "weight": reg.name_of(lp.bound.spec.weight, "weight"),
            "activation": None if lp.bound.activation_key is None else reg.name_of(lp.bound.activation_key, "activation"),
        }
        for lp in layers
        if lp.bound is not None
    }
    grouped = {f.layer: f.group.spec() for f in feeds}
    return cfg if planned == grouped else None


def stored_config(path: str | Path) -> QuantizationConfig:
    """The oqcore config a compressed-tensors checkpoint reads as (one target per quantized layer,
    see :func:`oq_config`), from its config.json and tensor headers only: no tensor is read.
    Raises :class:`oqcore.CheckpointError` as :func:`load_compressed` does before reading."""
    return _read_plan(Path(path), torch.bfloat16)[5]


def load_compressed(
    path: str | Path,
    config: QuantizationConfig | dict | str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    progress=None,
) -> nn.Module:
    """Read a compressed-tensors checkpoint as stored (called by :func:`oqcore.load`).

    ``config`` is ``None`` (as stored: one target per quantized layer, see :func:`oq_config`) or
    a config overlaid on it with vLLM's rules (:mod:`oqcore.loading.overlay`: the checkpoint's own
    weight key or an activation-only spec keep the stored bytes, an activation the checkpoint does
    not declare is applied, layers stored in high precision are quantized online as the config
    says); a conflicting weight key or activation, or a target naming a stored layer, is a
    :class:`oqcore.ConfigError` naming both. ``device``/``dtype``/``progress`` as for
    :func:`oqcore.load`.

    Before any tensor is read: ``config.json``'s ``quantization_config`` is parsed by
    compressed-tensors, every config group is matched to a registered scheme, its targets to the
    model's layers, and every stored tensor of each quantized layer is checked (names, shapes,
    dtypes) against what the layer's method holds; the other tensors as for a high-precision
    checkpoint. Raises :class:`oqcore.CheckpointError` naming config.json and the field, or the
    file, tensor and layer; nothing half-built is returned.
    """
    t0 = time.perf_counter()
    path = Path(path)
    device = resolve_device(device)
    cfg_file = path / "config.json"
    _, entries, model, feeds, used, oq_cfg, what = _read_plan(path, dtype)
    user = None if config is None else QuantizationConfig.from_any(config)
    try:
        per_layer = stored_specs(model, oq_cfg, device)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_file}: the checkpoint's quantization does not fit the model: {e}") from e
    except OqError as e:
        if type(e).__name__ == "NoBackendError":
            raise
        raise CheckpointError(f"{cfg_file}: the checkpoint's quantization does not fit the model: {e}") from e
    ov = overlay(model, oq_cfg, per_layer, user, device, what)
    qplan = plan(model, ov.config, device=device)
    wrappers = install_wrappers(model, qplan)
    stored = {n: w for n, w in wrappers.items() if n in ov.stored}
    online = {n: w for n, w in wrappers.items() if n in ov.online}
    expected = quantized_tensors(stored)
    by_module = _ckpt_modules(entries)
    plans = {f.layer: plan_parts(f, wrappers[f.layer], expected[f.layer], by_module, path) for f in feeds}
    # everything else: the high-precision tensors, mapped with transformers' rules
    rest = {k: e for k, e in entries.items() if k.rpartition(".")[0] not in used}
    for k, e in rest.items():
        if is_quant_name(k) or e.is_float8:
            raise CheckpointError(
                f"{e.file}: tensor {e.name!r} ({e.describe()}) is quantized, but config.json's quantization_config does "
                f"not quantize layer {k.rpartition('.')[0]!r} (ignored, or matched by no config group)"
            )
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    groups, unexpected = NameMapper(model, names).group(rest)
    check_against_model(model, groups, unexpected, rest, path)
    _check_fed(model, stored, groups, path)
    stats = LoadStats()
    total = sum(e.nbytes for e in entries.values())
    feed_online = OnlineFeed(model, online)

    def run(reader: TensorReader, tick) -> None:
        """Read every quantized layer's stored tensors, then the high-precision ones (quantizing
        the layers the user's config adds as each is complete), calling ``tick(bytes)`` after each
        (progress)."""
        for f in feeds:
            tick(read_parts(f, wrappers[f.layer], expected[f.layer], plans[f.layer], by_module, reader, device))
        for g in groups:
            converted = g.convert(model, lambda k: reader.read(rest[k]))
            for name in list(converted):
                assign_tensor(model, name, converted.pop(name), device)
                feed_online.placed(name)
            tick(sum(rest[k].nbytes for k in g.sources))
        feed_online.check_complete(path)

    model = finish_stored_load(model, run, total, ov.config, qplan, wrappers, path, device, dtype, stats, t0, progress)
    if unexpected:
        shown = ", ".join(repr(k) for k in unexpected[:5]) + (
            f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        )
        warnings.warn(
            f"oqcore.load: {len(unexpected)} tensor(s) of {path} are not used by {type(model).__name__} and were skipped: {shown}",
            UserWarning,
            stacklevel=3,
        )
    return model


def _check_fed(model: nn.Module, wrappers: dict[str, nn.Module], groups: list[TargetGroup], path: Path) -> None:
    """Before reading: every parameter outside the quantized layers has a checkpoint tensor
    (skipped when a transformers rule makes several parameters from one group)."""
    if any(len(getattr(g.rule, "target_patterns", None) or ()) > 1 for g in groups):
        return
    fed = {g.target for g in groups}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [
        n for n, _ in model.named_parameters(remove_duplicate=False)
        if n.rpartition(".")[0] not in wrappers and n not in fed and n not in tied
    ]  # fmt: skip
    if missing:
        shown = ", ".join(repr(m) for m in missing[:6]) + (
            f" (and {len(missing) - 6} more)" if len(missing) > 6 else ""
        )
        raise CheckpointError(f"{path}: the checkpoint has no tensor for {len(missing)} model weight(s): {shown}")
