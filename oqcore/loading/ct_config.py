"""A compressed-tensors checkpoint's ``quantization_config``: parsed with compressed-tensors' own
models, each config group matched to the registered oqcore scheme that declares the same
``QuantizationArgs`` (:attr:`oqcore.KeyFormat.compressed_tensors`). No scheme is named here; the
reading of the tensors is :mod:`oqcore.loading.compressed`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oqcore.errors import CheckpointError
from oqcore.loading.checks import CT_QUANT_METHOD

QUANT_METHOD = CT_QUANT_METHOD
"""``quantization_config.quant_method`` of a compressed-tensors checkpoint."""

ARGS_NOT_COMPARED = frozenset({"zp_dtype", "observer", "observer_kwargs"})
"""QuantizationArgs fields left out when a group's args are compared with a scheme's: ``zp_dtype``
is in-memory only (never written), the observer is how llm-compressor calibrated the scales, not
what the stored tensors mean."""

def declares_compressed_tensors(raw: object) -> bool:
    """Whether a parsed ``config.json`` declares a compressed-tensors checkpoint."""
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


# -- the config ---------------------------------------------------------------------------------------


def _pydantic_problem(e: Exception) -> str:
    """The first problem of a pydantic ValidationError as ``field.path: message``."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            loc = ".".join(str(p) for p in first.get("loc", ()) if not str(p).startswith(("function-", "list[")))
            return f"{loc}: {first.get('msg')} (got {first.get('input')!r})"[:400]
        except (IndexError, KeyError, TypeError):  # pragma: no cover - a ValidationError always has errors()
            return str(e).splitlines()[0][:400]
    return str(e).splitlines()[0][:400]


def ct_config(raw: dict, cfg_file: Path) -> Any:
    """``config.json``'s ``quantization_config`` as a ``compressed_tensors.QuantizationConfig``.

    Raises :class:`oqcore.CheckpointError` naming ``cfg_file`` and the field for a config that
    compressed-tensors itself refuses, or that holds what oqcore does not run: a status other
    than ``compressed``, a KV-cache scheme, sparsity or transforms, output activations.
    """
    from compressed_tensors import QuantizationConfig as CTConfig

    qc = raw["quantization_config"]
    for key, what in (("sparsity_config", "sparsity"), ("transform_config", "transforms")):
        if qc.get(key):
            raise CheckpointError(
                f"{cfg_file}: quantization_config.{key} is set: compressed-tensors {what} is not something oqcore can run; "
                "oqcore reads quantized (not sparse or transformed) compressed-tensors checkpoints"
            )
    if not isinstance(qc.get("config_groups"), dict) or not qc["config_groups"]:
        raise CheckpointError(
            f"{cfg_file}: quantization_config.config_groups must be a non-empty JSON object of compressed-tensors "
            f"config groups, found {qc.get('config_groups')!r}"
        )
    try:
        cfg = CTConfig.model_validate(qc)
    except Exception as e:  # noqa: BLE001 - pydantic's ValidationError, or a preset name compressed-tensors does not know
        raise CheckpointError(
            f"{cfg_file}: quantization_config is not a valid compressed-tensors config: {_pydantic_problem(e)}"
        ) from None
    status = getattr(cfg.quantization_status, "value", cfg.quantization_status)
    if status != "compressed":
        raise CheckpointError(
            f"{cfg_file}: quantization_config.quantization_status is {status!r}; oqcore reads checkpoints stored "
            "'compressed' (as llm-compressor saves them)"
        )
    if cfg.kv_cache_scheme is not None:
        raise CheckpointError(
            f"{cfg_file}: quantization_config.kv_cache_scheme is set; oqcore does not quantize the KV cache "
            "(remove kv_cache_scheme, or serve the checkpoint with vLLM)"
        )
    _check_patterns(cfg_file, "quantization_config.ignore", cfg.ignore or [])
    for name, group in cfg.config_groups.items():
        _check_patterns(cfg_file, f"quantization_config.config_groups.{name}.targets", group.targets or [])
        if group.output_activations is not None:
            raise CheckpointError(
                f"{cfg_file}: quantization_config.config_groups.{name}.output_activations is set; oqcore quantizes "
                "weights and input activations only"
            )
        if group.weights is None:
            raise CheckpointError(
                f"{cfg_file}: quantization_config.config_groups.{name} has no weights args; oqcore's schemes "
                "quantize weights (activation-only groups are not supported)"
            )
    return cfg


def _check_patterns(cfg_file: Path, field: str, patterns: list[str]) -> None:
    """Raise :class:`oqcore.CheckpointError` naming ``field`` for a ``re:`` pattern that is not a
    valid regular expression (compressed-tensors' matcher would raise ``re.error`` on it)."""
    for i, p in enumerate(patterns):
        if isinstance(p, str) and p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise CheckpointError(f"{cfg_file}: {field}[{i}] = {p!r} is not a valid regular expression: {e}") from None


def _written(args: Any) -> dict | None:
    """QuantizationArgs as compared: ``model_dump`` without :data:`ARGS_NOT_COMPARED`."""
    return None if args is None else args.model_dump(exclude=set(ARGS_NOT_COMPARED))


def _declared(fmt: Any) -> dict | None:
    """A KeyFormat's declared compressed-tensors args, validated and dumped like a group's."""
    from compressed_tensors.quantization import QuantizationArgs

    if fmt is None or fmt.compressed_tensors is None:
        return None
    return _written(QuantizationArgs.model_validate(dict(fmt.compressed_tensors)))


PACKED = "weight_packed"
"""compressed-tensors' name of a weight stored packed (several values per stored element)."""
PACKED_SHAPE = "weight_shape"
"""compressed-tensors' name of the unpacked ``[N, K]`` shape written beside a weight packed into words."""


def stored_names(group: Any, default_format: Any) -> tuple[str, ...] | None:
    """The tensor names compressed-tensors' own compressor writes per module for config group
    ``group`` (a ``QuantizationScheme``): ``BaseCompressor.get_value_from_registry(format)
    .compression_param_names(group)``, the format being the group's own ``format`` or the config's
    (``default_format``). ``None`` when no format is given or this compressed-tensors does not
    register it (the stored tensors are then checked against the layer alone)."""
    from compressed_tensors.compressors import BaseCompressor

    fmt = getattr(group, "format", None) or default_format
    fmt = getattr(fmt, "value", fmt)
    if not isinstance(fmt, str):
        return None
    try:
        compressor = BaseCompressor.get_value_from_registry(fmt)
    except (KeyError, ValueError):
        return None
    return tuple(compressor.compression_param_names(group))


def packs_bytes(names: tuple[str, ...] | None) -> bool:
    """Whether a compressor writing ``names`` (:func:`stored_names`) stores :data:`PACKED` as the
    packed bytes themselves, to be read as the layer's ``weight`` unchanged (``nvfp4-pack-quantized``
    / ``mxfp4-pack-quantized``: two e2m1 codes per byte, ``[N, K/2]``), rather than values packed into
    int32 words with their :data:`PACKED_SHAPE` (``pack-quantized``, unpacked by
    ``unpack_from_int32``)."""
    return names is not None and PACKED in names and PACKED_SHAPE not in names


@dataclass(frozen=True)
class GroupScheme:
    """What one config group is in oqcore terms: the weight and activation key names (for the
    config), the scheme, the weights' ``num_bits`` (for unpacking) and ``packed_bytes``
    (:func:`packs_bytes`: a stored ``weight_packed`` is the layer's ``weight`` as stored)."""

    group: str
    weight: str
    activation: str | None
    scheme: Any
    num_bits: int
    packed_bytes: bool = False

    def spec(self) -> dict:
        """The oqcore spec mapping of this group: ``{"weight": name, "activation": name or None}``."""
        return {"weight": self.weight, "activation": self.activation}


def _readable(reg) -> str:
    """Every (weights, input_activations) pair oqcore reads, for an error message."""
    out = []
    for scheme in reg.schemes.values():
        w = _declared(scheme.weight)
        if w is None:
            continue
        acts = [
            "none" if a is None else _short_args(_declared(a))
            for a in scheme.activations
            if a is None or a.compressed_tensors
        ]
        out.append(f"{scheme.name}: weights {_short_args(w)} with input_activations {' or '.join(acts)}")
    return "; ".join(out)


def _short_args(d: dict | None) -> str:
    if d is None:
        return "none"
    return "{" + ", ".join(f"{k}: {v}" for k, v in d.items() if v is not None and v != {}) + "}"


def match_group(name: str, group: Any, cfg_file: Path, reg, default_format: Any = None) -> GroupScheme:
    """The registered scheme whose declared weights args equal group ``name``'s (as written, but
    :data:`ARGS_NOT_COMPARED`), with the activation key whose args equal its ``input_activations``;
    ``default_format`` is the config's ``format`` (for a group that names none, see
    :func:`stored_names`). Raises :class:`oqcore.CheckpointError` naming the group, its args and
    what oqcore can read."""
    w, a = _written(group.weights), _written(group.input_activations)
    where = f"{cfg_file}: quantization_config.config_groups.{name}"
    for scheme in reg.schemes.values():
        if _declared(scheme.weight) != w:
            continue
        for fmt in scheme.activations:
            if (fmt is None and a is None) or (fmt is not None and a is not None and _declared(fmt) == a):
                return GroupScheme(
                    name,
                    reg.name_of(scheme.weight.key, "weight"),
                    None if fmt is None else reg.name_of(fmt.key, "activation"),
                    scheme,
                    int(group.weights.num_bits),
                    packs_bytes(stored_names(group, default_format)),
                )
        acts = ", ".join("none" if f is None else _short_args(_declared(f)) for f in scheme.activations)
        raise CheckpointError(
            f"{where}: oqcore reads these weights as scheme {scheme.name!r}, but not with input_activations "
            f"{_short_args(a)}; {scheme.name!r} runs with input_activations {acts}"
        )
    hint = ""
    if group.weights.symmetric is False:
        hint = " (asymmetric weights with zero points: oqcore's schemes are symmetric)"
    raise CheckpointError(
        f"{where}: no oqcore scheme reads weights {_short_args(w)} with input_activations {_short_args(a)}{hint}; "
        f"oqcore reads: {_readable(reg)}"
    )


