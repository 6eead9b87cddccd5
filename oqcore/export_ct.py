"""A quantized model in compressed-tensors' format: what llm-compressor writes and vLLM serves.

:func:`compressed_tensors_checkpoint` turns the tensors :func:`oqcore.save_quantized` would write
(oqcore's names) into a compressed-tensors checkpoint: the tensors under the source checkpoint's
names (transformers' own reverse conversion mapping, so fused experts go back to
``experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj`` or Mixtral's ``w1`` / ``w3`` / ``w2``), each
quantized layer's tensors named as its compressed-tensors format stores them, and the
``quantization_config`` built with compressed-tensors' own pydantic models from what each scheme
declares (:attr:`oqcore.KeyFormat.compressed_tensors`, :attr:`oqcore.Scheme.compressed_tensors_format`):
no scheme is named here.

Stored per quantized layer (prefix = the checkpoint module name):

- ``weight``: ``qdata`` as it is (``naive-``, ``float-``, ``int-``, ``mxfp8-quantized``);
  ``weight_packed`` as it is where the format's compressor stores its values under that name
  (``nvfp4-`` / ``mxfp4-pack-quantized``: two e2m1 values per byte); or ``weight_packed`` int32 +
  ``weight_shape`` for ``pack-quantized`` (compressed-tensors' ``pack_to_int32``);
- ``weight_scale`` (and ``weight_<name>`` for any other tensor of the format), viewed as the args'
  ``scale_dtype`` when they declare one (e8m0 exponents as uint8 bytes); float scales stay float32
  (compressed-tensors writes them in the weight's dtype; both load the same).

Experts' per-tensor w13 tensors (``[E, 1]``: a per-tensor scale, a global scale) are written for
gate and up alike; a w13 scale grid
that does not split at the gate/up boundary (128x128 blocks with I % 128 != 0) is a
:class:`oqcore.SaveError`, not a wrong file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from oqcore.errors import SaveError
from oqcore.formats import DATA
from oqcore.loading.state import OqState
from oqcore.methods import OnlineMoEMethodBase
from oqcore.planning import LayerPlan
from oqcore.plugins import get_registry

QUANT_METHOD = "compressed-tensors"
_OTHER_FORMAT = "save with format='oqcore' (oq quantize --format oqcore), which oqcore.load reads back"
PACKED = "pack-quantized"


def compressed_tensors_checkpoint(
    model: nn.Module, state: OqState, tensors: dict[str, torch.Tensor], dest: str, checkpoint_names: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``tensors`` (what oqcore would save, in the model's own names) -> ``(checkpoint tensors in
    compressed-tensors naming, quantization_config dict)``. ``dest`` names the folder in errors.
    ``checkpoint_names=False`` stops before the last renaming step (transformers'
    ``revert_weight_conversion`` of the whole dict, which leaves the per-expert tensors, already in
    checkpoint naming, as they are): what ``save_pretrained`` takes, as it runs that step itself.

    Raises :class:`oqcore.SaveError` for a quantized layer whose scheme declares no
    compressed-tensors form (a v1 plugin, or a pairing compressed-tensors has no format for), an
    expert layout compressed-tensors cannot hold (GPT-OSS's fused, interleaved experts), or a w13
    scale grid that does not split between gate and up.
    """
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    if not state.plan.quantized:
        raise SaveError(
            f"cannot save {dest} as compressed-tensors: no layer of the model is quantized (the config "
            f"{state.config.to_dict()} matches none), and a compressed-tensors config needs at least one config group; "
            f"{_OTHER_FORMAT}, or save the high-precision model with transformers' save_pretrained"
        )
    reg = get_registry()
    out = dict(tensors)
    groups: dict[tuple, list[LayerPlan]] = {}
    group_args: dict[tuple, tuple[Mapping[str, Any], Mapping[str, Any] | None, str]] = {}
    for lp in state.plan.quantized:
        weights, activations, fmt_name = _declared(reg, lp, dest)
        key = (json.dumps(dict(weights), sort_keys=True), json.dumps(None if activations is None else dict(activations), sort_keys=True), fmt_name)
        group_args[key] = (weights, activations, fmt_name)
        wrapper = state.wrappers[lp.name]
        if lp.kind == "linear":
            _linear(out, wrapper, lp.name, weights, fmt_name)
        else:
            _experts(model, out, wrapper, lp.name, weights, fmt_name, dest)
        groups.setdefault(key, []).append(lp)
    if checkpoint_names:
        out = _to_checkpoint_names(model, out)

    schemes = {}
    for i, (key, members) in enumerate(groups.items()):
        weights, activations, fmt_name = group_args[key]
        schemes[f"group_{i}"] = QuantizationScheme(
            targets=_targets(model, members, single=len(groups) == 1),
            weights=QuantizationArgs.model_validate(dict(weights)),
            input_activations=None if activations is None else QuantizationArgs.model_validate(dict(activations)),
            format=fmt_name,
        )
    formats = {s.format for s in schemes.values()}
    config = QuantizationConfig(
        config_groups=schemes,
        quantization_status=QuantizationStatus.COMPRESSED,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        ignore=sorted(_checkpoint_module_names(model, _high_precision_modules(model, state))),
    )
    data = config.model_dump()
    data["quant_method"] = QUANT_METHOD
    from compressed_tensors.version import __version__ as ct_version

    data["version"] = ct_version
    return out, data


def _targets(model: nn.Module, members: list[LayerPlan], single: bool) -> list[str]:
    """A group's ``targets``. One group (one scheme for every quantized layer): ``["Linear"]``, as
    llm-compressor writes it, with every layer left in high precision in ``ignore``: what vLLM's
    fused-MoE loader and transformers expect. Several groups: the dense layers by checkpoint name
    and each experts module's per-expert linears by one ``re:`` pattern."""
    if single:
        return ["Linear"]
    dense = _checkpoint_module_names(model, [lp.name for lp in members if lp.kind == "linear"])
    experts = _checkpoint_module_names(model, [lp.name for lp in members if lp.kind != "linear"])
    return sorted(dense) + [f"re:^{re.escape(e)}\\.\\d+\\.[^.]+$" for e in sorted(experts)]


def _high_precision_modules(model: nn.Module, state: OqState) -> list[str]:
    """Every layer kept in high precision that a ``Linear`` target could reach: the plan's skipped
    layers, and any other module holding a 2-D weight of its own (MoE routers, whatever their
    class) except embeddings: ``ignore`` lists them, as llm-compressor lists its routers."""
    names = {lp.name for lp in state.plan.skipped}
    for name, module in model.named_modules():
        if name in state.wrappers or isinstance(module, nn.Embedding):
            continue
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and name not in names and not any(name.startswith(q + ".") for q in state.wrappers):
            names.add(name)
    return sorted(names)


def _declared(reg, lp: LayerPlan, dest: str) -> tuple[Mapping[str, Any], Mapping[str, Any] | None, str]:
    """The layer's weights args, activation args and format as its scheme declares them."""
    assert lp.bound is not None
    weight_key, act = lp.bound.spec.weight, lp.bound.activation_key
    scheme = reg.schemes.get(weight_key)
    what = f"layer {lp.name!r} ({reg.name_of(weight_key, 'weight')}, activation {reg.name_of(act, 'activation')})"
    if scheme is None or scheme.weight.compressed_tensors is None:
        raise SaveError(f"cannot save {dest} as compressed-tensors: {what}: its plugin declares no compressed-tensors form; {_OTHER_FORMAT}")
    fmt_name = scheme.compressed_tensors_format.get(act)
    act_fmt = scheme.activation_format(act)
    if fmt_name is None or (act is not None and (act_fmt is None or act_fmt.compressed_tensors is None)):
        raise SaveError(
            f"cannot save {dest} as compressed-tensors: {what}: compressed-tensors has no format for this pairing "
            f"({_OTHER_FORMAT})"
        )
    return scheme.weight.compressed_tensors, None if act is None else act_fmt.compressed_tensors, fmt_name


def _encode(prefix: str, named: dict[str, torch.Tensor], weights: Mapping[str, Any], fmt_name: str) -> dict[str, torch.Tensor]:
    """One weight's format tensors (``qdata``, ``scale``, ...) -> compressed-tensors' tensors under ``prefix``."""
    from compressed_tensors.quantization import QuantizationArgs

    args = QuantizationArgs.model_validate(dict(weights))
    out: dict[str, torch.Tensor] = {}
    for name, t in named.items():
        if name == DATA:
            if fmt_name == PACKED:
                from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

                out[f"{prefix}.weight_packed"] = pack_to_int32(t.contiguous(), args.num_bits)
                out[f"{prefix}.weight_shape"] = torch.tensor(list(t.shape))
            else:
                # qdata as stored: ``weight``, or ``weight_packed`` bytes where the format's
                # compressor names it so (nvfp4- / mxfp4-pack-quantized: two e2m1 values per byte)
                out[f"{prefix}.{_data_name(fmt_name, args)}"] = t
            continue
        if args.scale_dtype is not None and t.dtype != args.scale_dtype and t.element_size() == torch.empty((), dtype=args.scale_dtype).element_size():
            t = t.view(args.scale_dtype)  # e8m0 exponents as their bytes
        out[f"{prefix}.weight_{name}"] = t
    return out


def _data_name(fmt_name: str, args: Any) -> str:
    """The tensor name compressed-tensors' compressor for format ``fmt_name`` stores a weight's
    values under (``compression_param_names`` of the registered compressor): ``weight_packed`` for
    the byte-packed formats, ``weight`` otherwise."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    compressor = BaseCompressor.get_value_from_registry(fmt_name)
    names = compressor.compression_param_names(QuantizationScheme(targets=["Linear"], weights=args))
    return "weight_packed" if "weight_packed" in names else "weight"


def _format_tensors(wrapper: nn.Module, prefix: str, tensors: dict[str, torch.Tensor], full: str) -> dict[str, torch.Tensor]:
    """The format's tensors of the weight ``prefix`` (``weight``, ``w13_weight``) of a wrapper, taken out of ``tensors``."""
    fmt = wrapper.method.formats.weight
    named = {}
    for n in fmt.tensors:
        key = f"{full}.{fmt.param_name(prefix, n)}"
        named[n] = tensors.pop(key)
    return named


def _linear(out: dict[str, torch.Tensor], wrapper: nn.Module, name: str, weights: Mapping[str, Any], fmt_name: str) -> None:
    named = _format_tensors(wrapper, "weight", out, name)
    out.update(_encode(name, named, weights, fmt_name))


def _experts(
    model: nn.Module, out: dict[str, torch.Tensor], wrapper: nn.Module, name: str, weights: Mapping[str, Any], fmt_name: str, dest: str
) -> None:
    """Fused ``w13_*`` / ``w2_*`` -> per-expert tensors under the checkpoint's names (the other
    tensors are renamed by :func:`_to_checkpoint_names`)."""
    from transformers.core_model_loading import revert_weight_conversion

    lay = wrapper.layout
    if lay.transposed:
        raise SaveError(
            f"cannot save {dest} as compressed-tensors: experts {name!r} are GPT-OSS-style fused and interleaved "
            "(gate_up_proj [E, H, 2I]); compressed-tensors stores experts as per-expert linears that transformers cannot "
            f"load back for this architecture; {_OTHER_FORMAT}"
        )
    (hp13, p13), (hp2, p2) = OnlineMoEMethodBase.QUANTIZED_NAMES.items()
    w13 = _format_tensors(wrapper, p13, out, name)
    w2 = _format_tensors(wrapper, p2, out, name)
    i_size = lay.intermediate_size
    per_expert: dict[str, dict[str, torch.Tensor]] = {}
    for n in w13:
        a, b = w13[n], w2[n]
        if n != DATA:
            a = _splittable_w13(a, wrapper.method.weight_key.scale.group_shape.row, i_size, name, n, dest)
        fake = {f"{name}.{hp13}": a, f"{name}.{hp2}": b}
        for key, t in revert_weight_conversion(model, fake).items():
            module, _, _ = key.rpartition(".")
            per_expert.setdefault(module, {})[n] = t
    for module, named in per_expert.items():
        out.update(_encode(module, named, weights, fmt_name))
    _expert_input_state(model, out, wrapper, name, p13, p2)


def _expert_input_state(model: nn.Module, out: dict[str, torch.Tensor], wrapper: nn.Module, name: str, p13: str, p2: str) -> None:
    """The experts' static activation state (one ``w13_input_scale`` / ``w2_input_scale`` per
    layer) written per expert projection as compressed-tensors stores it (``input_scale`` beside
    each gate, up and down): the layer's value for every expert, which vLLM's fp8 MoE reads back
    as the same one value (the max over experts)."""
    from transformers.core_model_loading import revert_weight_conversion

    from oqcore.formats import input_param

    state = wrapper.method.activation_state()
    if not state:
        return
    (hp13, _), (hp2, _) = OnlineMoEMethodBase.QUANTIZED_NAMES.items()
    e = wrapper.layout.num_experts
    fmt = wrapper.method.formats.activation
    for n in fmt.activation_state():
        s13 = out.pop(f"{name}.{input_param(p13, n)}")
        s2 = out.pop(f"{name}.{input_param(p2, n)}")
        # shaped as a per-tensor weight scale of the stacks ([E, 2] gate/up, [E, 1] down), which the
        # reverse conversion splits per expert and projection as it does the weight scales
        fake = {f"{name}.{hp13}": s13.reshape(1, 1).expand(e, 2).contiguous(), f"{name}.{hp2}": s2.reshape(1, 1).expand(e, 1).contiguous()}
        for key, t in revert_weight_conversion(model, fake).items():
            module, _, _ = key.rpartition(".")
            out[f"{module}.input_{n}"] = t.reshape(1).clone()


def _splittable_w13(scale: torch.Tensor, rows_per_group: int, i_size: int, name: str, tensor: str, dest: str) -> torch.Tensor:
    """A w13 tensor other than qdata, ``[E, R, ...]``, made to split at the gate/up boundary.
    ``[E, 1]`` is one value per expert (a per-tensor scale, or a global scale over block scales),
    repeated for gate and up. Otherwise ``rows_per_group`` is the weight key's group shape row
    extent (1: per row; r > 1: blocks of r rows, which split only when I % r == 0)."""
    if scale.dim() == 2 and scale.shape[1] == 1:
        return scale.expand(scale.shape[0], 2).contiguous()
    if rows_per_group > 1 and i_size % rows_per_group:
        raise SaveError(
            f"cannot save {dest} as compressed-tensors: the {tensor} of experts {name!r} has groups of "
            f"{rows_per_group} rows and I = {i_size}: the groups straddle the gate/up boundary, so gate and up cannot "
            f"be stored apart (needs I % {rows_per_group} == 0); {_OTHER_FORMAT}"
        )
    return scale


def _to_checkpoint_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model names -> the source checkpoint's names (transformers' reverse renamings; fused
    experts were split already)."""
    from transformers.core_model_loading import revert_weight_conversion

    return dict(revert_weight_conversion(model, tensors))


def _checkpoint_module_names(model: nn.Module, modules: list[str]) -> list[str]:
    """Module names in the checkpoint's naming (a renamed prefix such as Mixtral's
    ``block_sparse_moe``): each name is passed through the same reverse renaming as a weight."""
    from transformers.core_model_loading import revert_weight_conversion

    probe = {f"{m}.weight": torch.empty(0) for m in modules}
    names = revert_weight_conversion(model, probe)
    return [re.sub(r"\.weight$", "", k) for k in names]
