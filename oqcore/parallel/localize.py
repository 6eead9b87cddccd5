"""Cut a meta-device model down to one rank's shard, checking every cut against the scale groups.

Runs after planning and before any weight is read: each module the plan splits gets its local
shapes (its meta parameters re-created) and a :class:`~oqcore.parallel.shard.LayerShard`
(attribute ``oq_shard``). A cut through a scale group (a 128x128 block, a 1x32 MX block, a 1x16
NVFP4 block, a 1x128 activation group) cannot give the unsharded bytes: it is refused here, with
the layer, the weight, the sizes and what would be valid. A cut through a group that spans the
whole split dim (per tensor; per channel of a row-split weight) is fine when the key's outermost
scale level is the one cut and a quantizer of the key takes a reduced amax: the amax is then
MAX-reduced over the ranks before quantizing.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from oqcore.errors import UnsupportedLayerError
from oqcore.groups import grid_shape, outer_level, scale_levels, weight_extent
from oqcore.loading.slices import shard_ranges
from oqcore.parallel.comm import Group
from oqcore.parallel.shard import LayerShard, Split


def _meta(shape: tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)


def _divisible(layer: str, what: str, size: int, world: int, style: str) -> None:
    if size % world:
        raise UnsupportedLayerError(
            layer,
            f"{style} over {world} ranks cuts {what} = {size} into unequal parts; it must be a multiple of "
            f"{world} (use a mesh size that divides {size}, or keep the layer whole in the parallel plan)",
        )


def _check_groups(layer: str, method, label: str, shape: tuple[int, ...], split: Split, style: str, world: int) -> bool:
    """Check ``split`` (canonical coords of a weight of ``shape``) against every scale level of
    the method's weight key; whether the outermost level's amax must be reduced over the ranks."""
    ndim = len(shape)
    axis = split.dim - ndim  # -2: rows (N), -1: columns (K); the expert dim cuts no group
    if axis not in (-2, -1):
        return False
    name = method.formats.weight_name if method.formats is not None else ""
    key = method.weight_key
    levels = scale_levels(key)
    reduce = False
    for level in levels:
        extent = weight_extent(level.group_shape)[axis]
        where = "rows (N)" if axis == -2 else "columns (K)"
        if extent == -1:
            if level is not outer_level(key):
                raise UnsupportedLayerError(
                    layer,
                    f"{label} {list(shape)}: {style} over {world} ranks cuts its {level.group_shape} scales of "
                    f"{name or key} along the {where}, and only the outermost scale level can be reduced across ranks",
                )
            if not any(i.takes_amax for i in method.formats.weight.implementations):
                raise UnsupportedLayerError(
                    layer,
                    f"{label} {list(shape)}: {style} over {world} ranks cuts its {level.group_shape} scales of "
                    f"{name or key} along the {where}, and no quantizer of that key takes a reduced amax "
                    "(QuantizerImpl.takes_amax): keep the layer whole in the parallel plan",
                )
            reduce = True
            continue
        _check_cuts(layer, label, shape, split, extent, f"{level.group_shape} scale group of {name or key}", style, world, where)
    return reduce


def _check_cuts(layer, label, shape, split: Split, extent: int, what: str, style: str, world: int, where: str) -> None:
    """Every shard boundary of every rank (the same on all ranks, so all raise the same error)
    must fall on a group boundary of ``extent`` elements, or at the end."""
    if extent <= 1:
        return
    halves = len(split.ranges)
    part, n = split.full // halves, split.ranges[0][1] - split.ranges[0][0]
    edges = sorted({h * part + j * n for h in range(halves) for j in range(world + 1)})
    for edge in edges:
        if edge % extent and edge != split.full:
            raise UnsupportedLayerError(
                layer,
                f"{label} {list(shape)}: {style} over {world} ranks puts a shard boundary at {where} index {edge}, "
                f"inside a {what} ({extent} along that dim); every boundary must be a multiple of {extent} "
                f"(here {part} / {world} = {n} per rank): use a mesh size that keeps whole groups on each rank, "
                "keep the layer whole in the parallel plan, or pick a scheme with smaller groups",
            )


def _check_activation(layer: str, method, label: str, split: Split, style: str, world: int) -> None:
    """A row-split weight's input arrives cut along K: finite activation groups must not be cut
    (per-token / per-tensor dynamic activations are scaled per shard, as vLLM does)."""
    fmt = method.formats.activation if method.formats is not None else None
    if method.activation_key is None or fmt is None:
        return
    cols = weight_extent(method.activation_key.scale.group_shape)[1]
    name = method.formats.activation_name or str(method.activation_key)
    _check_cuts(layer, f"{label} input", (split.full,), split, cols, f"{method.activation_key.scale.group_shape} activation group of {name}", style, world, "columns (K)")


def _quantized(module: nn.Module) -> bool:
    return getattr(module, "method", None) is not None and hasattr(module, "layer_name")


def _linear(name: str, module: nn.Module, style: str, group: Group) -> tuple[LayerShard, tuple[int, int]]:
    """The shard of a linear and its local ``(out, in)`` features; checks only, ``module`` untouched."""
    r, w = group.rank, group.world
    n, k = module.out_features, module.in_features
    has_bias = module.bias is not None if not _quantized(module) else module.has_bias
    shard = LayerShard(group, style)
    if style.startswith("colwise"):
        _divisible(name, "out_features", n, w, style)
        cut = Split(0, shard_ranges(n, r, w), n)
        shard.params = {"weight": cut, **({"bias": Split(0, cut.ranges, n)} if has_bias else {})}
    else:
        _divisible(name, "in_features", k, w, style)
        cut = Split(1, shard_ranges(k, r, w), k)
        shard.params = {"weight": cut}
        shard.rank0 = ("bias",) if has_bias else ()
    shard.weights = {"weight": cut}
    shard.full = {"weight": (n, k), **({"bias": (n,)} if has_bias else {})}
    shard.attrs = {"in_features": k, "out_features": n}
    shard.weight_shapes = {"weight": (n, k)}
    n_l, k_l = cut.local_shape((n, k))
    if _quantized(module):
        method = module.method
        reduce = _check_groups(name, method, "weight", (n, k), cut, style, w)
        if cut.dim == 1:
            _check_activation(name, method, "weight", cut, style, w)
        shard.amax_numel = {"weight": math.prod(grid_shape((n_l, k_l), outer_level(method.weight_key).group_shape)) if reduce else 0}
    return shard, (n_l, k_l)


def _shrink_linear(module: nn.Module, shard: LayerShard, local: tuple[int, int]) -> None:
    """Give a linear (plain or quantized) its local shapes and fresh meta parameters."""
    n, _ = shard.full["weight"]
    n_l, k_l = local
    module.in_features, module.out_features = k_l, n_l
    if _quantized(module):
        module.method.create_weights(module)
        return
    dtype = module.weight.dtype
    module.weight = _meta((n_l, k_l), dtype)
    if module.bias is not None:
        module.bias = _meta((n_l,) if shard.params["weight"].dim == 0 else (n,), dtype)


def _experts(name: str, module: nn.Module, style: str, group: Group) -> tuple[LayerShard, object]:
    """The shard of quantized fused experts and their local layout; checks only, ``module`` untouched."""
    r, w = group.rank, group.world
    lay = module.layout
    e, h, i = lay.num_experts, lay.hidden_size, lay.intermediate_size
    shard = LayerShard(group, style, attrs={"layout": lay}, weight_shapes={"w13_weight": (e, 2 * i, h), "w2_weight": (e, h, i)})
    shard.full = {"gate_up_proj": lay.w13_shape, "down_proj": lay.w2_shape}
    if lay.has_bias:
        shard.full.update(gate_up_proj_bias=(e, 2 * i), down_proj_bias=(e, h))
    names = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias") if lay.has_bias else ("gate_up_proj", "down_proj")
    if style == "ep_experts":
        _divisible(name, "the number of experts", e, w, style)
        cut = Split(0, shard_ranges(e, r, w), e)
        shard.params = {p: cut for p in names}
        shard.weights = {"w13_weight": cut, "w2_weight": cut}
        shard.expert_offset = cut.ranges[0][0]
        local = dataclasses.replace(lay, num_experts=cut.local)
    else:
        _divisible(name, "the intermediate size", i, w, style)
        # gate and up stacked: each half cut alike; interleaved (GPT-OSS): one range keeps the pairs
        w13 = Split(1, shard_ranges(2 * i, r, w, 2 if lay.concatenated else 1), 2 * i)
        w2 = Split(2, shard_ranges(i, r, w), i)
        shard.weights = {"w13_weight": w13, "w2_weight": w2}
        shard.params = {
            "gate_up_proj": w13.transposed(3) if lay.transposed else w13,
            "down_proj": w2.transposed(3) if lay.transposed else w2,
        }
        if lay.has_bias:
            shard.params["gate_up_proj_bias"] = Split(1, w13.ranges, 2 * i)
            shard.rank0 = ("down_proj_bias",)
        local = dataclasses.replace(lay, intermediate_size=i // w)
    method = module.method
    shard.amax_numel = {}
    for prefix, full_shape in zip(("w13_weight", "w2_weight"), ((e, 2 * i, h), (e, h, i))):
        cut = shard.weights[prefix]
        reduce = _check_groups(name, method, prefix, full_shape, cut, style, w)
        if prefix == "w2_weight" and cut.dim == 2:
            _check_activation(name, method, prefix, cut, style, w)
        level = outer_level(method.weight_key).group_shape
        shard.amax_numel[prefix] = math.prod(grid_shape(cut.local_shape(full_shape), level)) if reduce else 0
    return shard, local


def localize(model: nn.Module, styles: dict[str, str], group: Group) -> dict[str, LayerShard]:
    """Cut every module named in ``styles`` (:func:`oqcore.parallel.plan.module_styles`) of the
    meta-device ``model`` to this rank's shard; returns ``{module name: LayerShard}`` (also set
    as each module's ``oq_shard``). Raises :class:`oqcore.UnsupportedLayerError` naming the layer,
    the weight and the sizes for a size the ranks cannot share equally or a cut through a scale
    group, before any module is changed."""
    cuts = []
    for name, style in styles.items():
        module = model.get_submodule(name)
        cut = _experts if style.endswith("experts") else _linear
        cuts.append((module, *cut(name, module, style, group)))
    shards: dict[str, LayerShard] = {}
    for (name, _), (module, shard, local) in zip(styles.items(), cuts):
        if shard.style.endswith("experts"):
            module.layout = local
            module.method.create_weights(module)
        else:
            _shrink_linear(module, shard, local)
        module.oq_shard = shards[name] = shard
    return shards
