"""Checks of a checkpoint against the model it is loaded into, from the headers alone (no tensor is
read): already-quantized checkpoints, expert counts, tensor kinds (floating / integer / bool) and
shapes. Each failure is one :class:`oqcore.CheckpointError` naming the file and the tensor, raised
before the first weight is read.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from oqcore.errors import CheckpointError
from oqcore.loading.checkpoint import TensorEntry, read_json_object
from oqcore.loading.names import TargetGroup, is_expert_fusion
from oqcore.saved_format import QUANT_METHOD
from oqcore.torch_compat import get_buffer, get_parameter, has_parameter

CT_QUANT_METHOD = "compressed-tensors"
"""``quant_method`` of compressed-tensors checkpoints (read by :mod:`oqcore.loading.compressed`)."""

FP8_QUANT_METHOD = "fp8"
"""``quant_method`` of transformers FineGrainedFP8 / vLLM fp8 checkpoints (read through
:mod:`oqcore.loading.peer_configs`)."""

MXFP4_QUANT_METHOD = "mxfp4"
"""``quant_method`` of transformers ``Mxfp4Config`` checkpoints (openai's gpt-oss: fused experts as
``*_blocks`` / ``*_scales``; read through :mod:`oqcore.loading.peer_configs`)."""

MODELOPT_QUANT_METHOD = "modelopt"
"""``quant_method`` (prefix, any case) of NVIDIA ModelOpt checkpoints that say so in config.json."""

MODELOPT_FILE = "hf_quant_config.json"
"""The file in which NVIDIA ModelOpt keeps its quantization metadata (read through
:mod:`oqcore.loading.peer_configs`)."""

READ_FORMATS = (
    f"{CT_QUANT_METHOD!r}, transformers FineGrainedFP8 ({FP8_QUANT_METHOD!r}) and NVIDIA ModelOpt FP8 "
    f"({MODELOPT_QUANT_METHOD!r} or {MODELOPT_FILE}) checkpoints, gpt-oss MXFP4 checkpoints "
    f"({MXFP4_QUANT_METHOD!r}, transformers Mxfp4Config) and its own exports"
)
"""What oqcore reads already quantized, for messages."""

NOT_SUPPORTED = (
    "already quantized; reading such checkpoints is not supported yet (online quantization needs a "
    "bf16/fp16/fp32 checkpoint: load the high-precision original, or this one with the tool that wrote it)"
)

# Files in which other tools keep quantization metadata outside config.json (ModelOpt's
# MODELOPT_FILE is read, not refused: :func:`oqcore.loading.peer_configs.declares_peer_format`).
QUANT_METADATA_FILES = {
    "quantize_config.json": "GPTQ / AutoGPTQ",
    "quant_config.json": "AWQ",
}

# Last name components of tensors only quantized checkpoints hold (compressed-tensors, FineGrainedFP8,
# ModelOpt, GPTQ/AWQ, bitsandbytes, gpt-oss MXFP4, vLLM/oqcore's own names).
QUANT_NAMES = frozenset(
    {
        "weight_scale", "weight_scale_inv", "weight_scale_2", "input_scale", "output_scale", "k_scale",
        "v_scale", "q_scale", "weight_global_scale", "input_global_scale", "weight_zero_point",
        "input_zero_point", "weight_packed", "weight_shape", "weight_g_idx", "qweight", "qzeros", "scales",
        "g_idx", "SCB", "absmax", "quant_map", "nested_absmax", "nested_quant_map",
    }
)  # fmt: skip
QUANT_SUFFIXES = ("_weight_scale", "_scale_inv", "_input_scale", "_blocks", "_scales", "_weight_packed", "_zero_point")


def check_quant_metadata(path: Path, raw: dict) -> None:
    """Refuse a checkpoint whose metadata says it is quantized in a way oqcore cannot run: a
    ``quantization_config`` in ``config.json`` other than oqcore's own, compressed-tensors' and the
    peer formats oqcore reads (the caller routes those to :mod:`oqcore.loading.saved` /
    :mod:`oqcore.loading.compressed`), naming its ``quant_method``, or another tool's quantization
    file beside it (:data:`QUANT_METADATA_FILES`)."""
    qc = raw.get("quantization_config")
    method = qc.get("quant_method") if qc else None
    readable = method in (QUANT_METHOD, CT_QUANT_METHOD, FP8_QUANT_METHOD, MXFP4_QUANT_METHOD) or (
        isinstance(method, str) and method.lower().startswith(MODELOPT_QUANT_METHOD)
    )
    if qc and not readable:
        method = qc.get("quant_method", "unknown")
        raise CheckpointError(
            f"{path / 'config.json'}: the checkpoint is already quantized (quant_method={method!r}), in a format oqcore "
            f"cannot run; oqcore reads {READ_FORMATS}, and quantizes bf16/fp16/fp32 checkpoints online. Load this one "
            "with its own quantization method instead."
        )
    for name, tool in QUANT_METADATA_FILES.items():
        f = path / name
        if not f.exists():
            continue
        said = ""
        try:
            obj = read_json_object(f, f"{tool} quantization metadata")
        except CheckpointError:
            obj = {}
        q = obj.get("quantization") if isinstance(obj.get("quantization"), dict) else obj
        shown = {k: q[k] for k in ("quant_algo", "quant_method", "bits", "w_bit", "group_size") if k in q and q[k] is not None}
        if shown:
            said = " (" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"
        raise CheckpointError(
            f"{f}: {tool} quantization metadata{said} beside a config.json that does not declare it: {NOT_SUPPORTED}"
        )


def _last(name: str) -> str:
    return name.rpartition(".")[2]


def is_quant_name(name: str) -> bool:
    """Whether tensor ``name`` is named like a quantization scale / packed weight / zero point."""
    last = _last(name)
    return last in QUANT_NAMES or last.endswith(QUANT_SUFFIXES) or ".quant_state." in name


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating"
    return "integer"


def placeholder(model: nn.Module, name: str) -> torch.Tensor | None:
    """The (meta) parameter or buffer ``name`` of ``model``, or ``None``."""
    mod_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        return None
    if has_parameter(module, attr):
        return get_parameter(module, attr)
    return get_buffer(module, attr)


def find_prequantized(
    entries: dict[str, TensorEntry], unexpected: list[str], targets: dict[str, torch.Tensor | None]
) -> CheckpointError | None:
    """The error for a checkpoint that holds quantized tensors without saying so, or ``None``.

    ``targets`` maps each checkpoint key that has a place in the model to that place's placeholder;
    ``unexpected`` lists the keys that have none. Signs, strongest first: an fp8 tensor (no
    high-precision model holds one); an integer tensor where the model has a floating weight, or
    named like a packed weight, beside a quantization-named tensor (``weight_scale``, ``qzeros``,
    ``*_scales`` ...); a quantization-named tensor the model has no place for.
    """
    quant_extra = [k for k in unexpected if is_quant_name(k)]

    def sibling(name: str) -> str | None:
        """A quantization tensor of the same module: its own scale (``weight`` -> ``weight_scale``)
        first, else any other (``qweight`` -> ``qzeros``)."""
        prefix = name.rpartition(".")[0] + "."
        own = _last(name)
        rests = [k[len(prefix) :] for k in quant_extra if k.startswith(prefix) and k != name]
        mine = [r for r in rests if r.startswith(own)]
        others = [r for r in rests if "." not in r]
        return (mine or others or [None])[0]

    def error(e: TensorEntry, what: str, sib: str | None) -> CheckpointError:
        """The refusal naming the file, what was found in tensor ``e`` and its scale ``sib``."""
        with_ = f" with a {sib!r}" if sib else ""
        return CheckpointError(f"{e.file} holds {what} {e.name!r}{with_}: {NOT_SUPPORTED}")

    fp8 = [e for e in entries.values() if e.is_float8]
    if fp8:
        # the most telling one: a weight (not itself a scale) with its scale beside it
        fp8.sort(key=lambda e: (is_quant_name(e.name), sibling(e.name) is None))
        e = fp8[0]
        return error(e, f"{_dtype_name(e.dtype)} tensor", sibling(e.name))
    for e in entries.values():
        if _kind(e.dtype) != "integer":
            continue
        target = targets.get(e.name)
        weight_like = _last(e.name) in ("weight", "qweight", "weight_packed") or _last(e.name).endswith(("_weight", "_blocks"))
        into_float = target is not None and target.is_floating_point()
        if (into_float or (e.name in unexpected and weight_like)) and (sibling(e.name) or is_quant_name(e.name)):
            return error(e, f"{_dtype_name(e.dtype)} tensor", sibling(e.name))
    if quant_extra:
        e = entries[quant_extra[0]]
        return CheckpointError(
            f"{e.file} holds {e.name!r} ({e.describe()}), a quantization tensor this model has no place for: "
            f"{NOT_SUPPORTED}"
        )
    return None


def check_against_model(
    model: nn.Module, groups: list[TargetGroup], unexpected: list[str], entries: dict[str, TensorEntry], path: Path
) -> None:
    """Check every checkpoint tensor's header against the model before anything is read: no
    already-quantized tensors (:func:`find_prequantized`), one tensor per expert for fused experts,
    and each tensor of the kind (floating / integer / bool) and shape its place in the model has.
    Raises :class:`oqcore.CheckpointError` naming the file, the tensor, and what the model expects."""
    places = {g.target: placeholder(model, g.target) for g in groups}
    targets = {k: places[g.target] for g in groups for k in g.sources}
    err = find_prequantized(entries, unexpected, targets)
    if err is not None:
        raise err
    check_expert_counts(model, groups, path, entries)
    for g in groups:
        target = places[g.target]
        if target is None:  # pragma: no cover - groups only hold names the model has
            continue
        if g.rule is None:
            if len(g.sources) > 1:
                a, b = (entries[k] for k in g.sources[:2])
                raise CheckpointError(
                    f"tensors {a.name!r} ({a.file}) and {b.name!r} ({b.file}) both map to the model's {g.target!r}; "
                    "a checkpoint must hold each weight once"
                )
            e = entries[g.sources[0]]
            _check_kind(e, target, g.target)
            if e.shape != tuple(target.shape):
                raise CheckpointError(
                    f"{e.file}: tensor {e.name!r} has shape {list(e.shape)} in the checkpoint, the model expects "
                    f"{list(target.shape)} for {g.target!r}"
                )
        elif is_expert_fusion(g.rule):
            direct = [k for k, p in zip(g.sources, g.source_patterns) if p not in g.rule.source_patterns]
            if direct:
                e = entries[direct[0]]
                other = next(k for k in g.sources if k not in direct)
                raise CheckpointError(
                    f"{e.file}: tensor {e.name!r} is the model's fused {g.target!r}, but the checkpoint also holds "
                    f"its per-expert tensors ({other!r}, in {entries[other].file}); a checkpoint must hold each "
                    "weight once: either fused or per expert"
                )
            n = len(g.rule.source_patterns)
            want = (target.shape[1] // n, *target.shape[2:]) if target.dim() >= 2 else None
            for k in g.sources:
                e = entries[k]
                _check_kind(e, target, g.target)
                if want is None or target.shape[1] % n or e.shape != want:
                    raise CheckpointError(
                        f"{e.file}: tensor {e.name!r} has shape {list(e.shape)}; fused into the model's {g.target!r} "
                        f"{list(target.shape)}, each expert's tensor must be {list(want) if want else '?'}"
                    )
        else:
            for k in g.sources:
                _check_kind(entries[k], target, g.target)


def _check_kind(e: TensorEntry, target: torch.Tensor, target_name: str) -> None:
    have, want = _kind(e.dtype), _kind(target.dtype)
    if have == want:
        return
    where = f" for {target_name!r}" if target_name != e.name else ""
    what = "weight" if isinstance(target, nn.Parameter) else "buffer"
    valid = {
        "floating": "a floating tensor (F32, F16, BF16, F64)",
        "integer": "an integer tensor (I64, I32, I16, I8, U8, ...)",
        "bool": "a BOOL tensor",
        "complex": "a complex tensor (C64)",
    }[want]
    raise CheckpointError(
        f"{e.file}: tensor {e.name!r} is {e.describe()} ({have}), but the model's {what}{where} is "
        f"{_dtype_name(target.dtype)} ({want}); valid: {valid}"
    )


def check_expert_counts(
    model: nn.Module, groups: list[TargetGroup], path: Path, entries: dict[str, TensorEntry] | None = None
) -> None:
    """Before reading anything: each fused-experts target needs one tensor per expert per pattern."""
    for g in groups:
        if g.rule is None or not is_expert_fusion(g.rule):
            continue
        experts = model.get_parameter(g.target).shape[0]
        for pattern in g.rule.source_patterns:
            have = [k for k, p in zip(g.sources, g.source_patterns) if p == pattern]
            if len(have) != experts:
                raise CheckpointError(
                    f"{path}: {g.target!r} fuses {experts} experts, but the checkpoint has {len(have)} tensors "
                    f"matching {pattern!r}: {', '.join(have[:6])}{' ...' if len(have) > 6 else ''}"
                )
            check_expert_indices(g.target, pattern, have, experts, path, entries or {})


def check_expert_indices(
    target: str, pattern: str, keys: list[str], experts: int, path: Path, entries: dict[str, TensorEntry]
) -> None:
    """Raise :class:`oqcore.CheckpointError` naming the file and tensor unless the per-expert
    tensors ``keys`` (matching transformers' source ``pattern`` of fused parameter ``target``) hold
    expert indices exactly 0..experts-1: they are stacked in index order, so with ``experts.4`` in
    place of ``experts.3`` (E=4) the count is right but the model would silently get no expert 3.
    Skipped for a pattern without one ``*`` (no index)."""
    parts = pattern.split("*")
    if len(parts) != 2:
        return
    rx = re.compile(re.escape(parts[0]) + r"(\d+)" + re.escape(parts[1]) + "$")
    index: dict[int, str] = {}
    for k in keys:
        m = rx.search(k)
        if m is None:
            return  # a name transformers matched another way: nothing to say about its index
        i = int(m.group(1))
        where = entries[k].file if k in entries else path
        if i >= experts:
            raise CheckpointError(
                f"{where}: tensor {k!r} is expert {i}, but {target!r} has {experts} experts (indices 0..{experts - 1})"
            )
        if i in index:
            raise CheckpointError(f"{where}: tensors {index[i]!r} and {k!r} are both expert {i} of {target!r}")
        index[i] = k
    # the count equals ``experts`` and every index is in range and unique, so all of 0..experts-1 are there
