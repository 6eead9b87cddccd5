"""Other tools' checkpoints (FP8, gpt-oss MXFP4) seen as compressed-tensors checkpoints, so that
:mod:`oqcore.loading.compressed` reads them as stored (nothing is re-quantized).

Three peer formats are translated here; each translation states facts of the PEER's format (what its
metadata and tensor names mean), never an oqcore scheme: the equivalent compressed-tensors
``QuantizationArgs`` are built and the registered scheme declaring the same args is found by
:func:`oqcore.loading.ct_config.match_group`, exactly as for a compressed-tensors checkpoint.

**transformers FineGrainedFP8 / vLLM ``Fp8Config``** (``config.json`` ``quantization_config`` with
``quant_method: "fp8"``; transformers ``utils/quantization_config.py::FineGrainedFP8Config``,
vLLM ``layers/quantization/fp8.py::Fp8Config``):

- ``weight_block_size: [bn, bk]`` -> fp8 weights in ``bn x bk`` blocks, ``weight`` float8 ``[N, K]``
  and ``weight_scale_inv`` float32 ``[ceil(N/bn), ceil(K/bk)]``. Despite its name the scale is the
  multiplier: transformers' ``Fp8Quantize._quantize_one`` stores ``1 / (fp8_max / amax)`` and
  ``Fp8Dequantize._dequantize_one`` computes ``q * scale`` (``integrations/finegrained_fp8.py``), so
  it is read as compressed-tensors' ``weight_scale``. Activations: dynamic, one scale per token per
  ``bk`` columns (DeepSeek-V3's ``act_quant``; vLLM's ``GroupShape(1, bk)``).
- ``weight_block_size`` null or absent -> one scale per tensor (``weight_scale_inv`` in transformers'
  ``FP8Linear``, ``weight_scale`` in vLLM / AutoFP8 checkpoints; both are read) with dynamic
  per-tensor activations (vLLM's ``Fp8LinearMethod`` without CUTLASS; the scheme's default). An
  absent key is per tensor as vLLM reads it (transformers' own writer always writes the key).
- ``activation_scheme`` must be ``dynamic`` (FineGrainedFP8's static activation scales are not
  read; static per-tensor input scales are, from compressed-tensors and ModelOpt checkpoints);
  ``scale_fmt`` must be ``float`` and ``expert_dtype`` ``fp8``; ``modules_to_convert`` (fp8
  embeddings) must be empty; ``dequantize`` is a transformers loading option and ignored.
- ``modules_to_not_convert`` (alias ``ignored_layers``) keeps transformers' meaning
  (``quantizers_utils.should_convert_module``): a key matches a module name as a regex from the
  start up to a module boundary, or as a suffix; absent, transformers' default list applies
  (``quantizers/base.py::get_keys_to_not_convert``: output embeddings, tied and last weights), plus
  the model's ``_keep_in_fp32_modules``.

**gpt-oss MXFP4 / transformers ``Mxfp4Config``** (``config.json`` ``quantization_config:
{"quant_method": "mxfp4", "modules_to_not_convert": [...]}``, openai's gpt-oss checkpoints;
transformers ``integrations/mxfp4.py``, ``quantizers/quantizer_mxfp4.py``):

- the fused experts of every MoE block (transformers' ``replace_with_mxfp4_linear`` converts each
  ``GptOssMLP``'s ``experts`` that ``should_convert_module`` keeps) are stored as
  ``<experts>.gate_up_proj_blocks`` U8 ``[E, 2I, H/32, 16]``, ``gate_up_proj_scales`` U8
  ``[E, 2I, H/32]``, ``down_proj_blocks`` U8 ``[E, H, I/32, 16]``, ``down_proj_scales``
  ``[E, H, I/32]``, with ``gate_up_proj_bias [E, 2I]`` / ``down_proj_bias [E, H]`` in high precision.
  Blocks are NOT transposed like the bf16 ``gate_up_proj [E, H, 2I]``: ``convert_moe_packed_tensors``
  decodes them to ``[E, 2I, H]`` (byte ``j`` -> elements ``2j`` low nibble, ``2j + 1`` high nibble,
  times ``2**(scale - 127)``) and then transposes; rows of gate_up are gate and up interleaved,
  as the bf16 columns are. So ``*_blocks`` is compressed-tensors' mxfp4-pack-quantized
  ``weight_packed`` of the canonical ``[E, N, K]`` stack, ``*_scales`` its ``weight_scale``
  (groups of 32 along K, e8m0 as U8), no input activations (W4A16); everything else is stored as is.
- ``modules_to_not_convert`` keeps transformers' meaning, as for FineGrainedFP8; ``dequantize`` is
  a loading option and ignored; any other field is refused.

**NVIDIA ModelOpt** (``hf_quant_config.json`` ``{"producer": {"name": "modelopt"}, "quantization":
{"quant_algo", "kv_cache_quant_algo", "exclude_modules"}}``, or the same in ``config.json``
``quantization_config`` with ``quant_method: "modelopt"``, either nested under ``quantization`` or
flat with ``ignore`` / ``kv_cache_scheme`` as newer exports write it; vLLM
``layers/quantization/modelopt.py::ModelOptQuantConfigBase.from_config``; ModelOpt
``torch/export/unified_export_hf.py::_export_quantized_weight``):

- ``FP8``: ``weight`` float8, ``weight_scale`` float32 scalar (amax / fp8_max), ``input_scale``
  float32 scalar (a STATIC, calibrated activation scale). Read as compressed-tensors' FP8 preset
  (weights fp8 per tensor, input activations fp8 per tensor ``dynamic: false``): every quantized
  layer runs with its stored ``input_scale``, as vLLM's ``ModelOptFp8LinearMethod`` /
  ``ModelOptFp8MoEMethod`` serve it (experts: one input scale per layer and projection, the max
  over the experts).
- ``FP8_PER_CHANNEL_PER_TOKEN``: ``weight_scale`` ``[N]`` (read as ``[N, 1]``, the same bytes),
  dynamic per-token activations.
- any other ``quant_algo`` (NVFP4, W4A8_AWQ, MXFP8, FP8_PB_WO, ...) and any KV-cache quantization
  are refused, naming the field.
- ``exclude_modules`` (``ignore``) are matched as vLLM's ``is_layer_excluded`` does: a substring of
  the module name, or an ``fnmatch`` wildcard.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oqcore.errors import CheckpointError
from oqcore.loading.checkpoint import TensorEntry, read_json_object
from oqcore.loading.checks import (
    CT_QUANT_METHOD,
    FP8_QUANT_METHOD,
    MODELOPT_FILE,
    MODELOPT_QUANT_METHOD,
    MXFP4_QUANT_METHOD,
)

_STORED_SCALE = "weight_scale"
"""compressed-tensors' name of a weight's dequantization scale (what the view renames to)."""


def _fp8_args(strategy: str, dynamic: bool, **extra) -> dict:
    """compressed-tensors ``QuantizationArgs`` fields of 8-bit symmetric float (e4m3) quantization:
    what both peers store (a fact of their format, not an oqcore scheme)."""
    return {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": dynamic, "strategy": strategy, **extra}


@dataclass(frozen=True)
class PeerView:
    """A peer checkpoint's quantization metadata as compressed-tensors sees a checkpoint.

    ``format`` names the peer format for messages; ``source`` is the file the metadata came from
    (``config.json`` or ``hf_quant_config.json``); ``field`` the JSON path of the metadata in it;
    ``quantization_config`` the equivalent compressed-tensors ``quantization_config`` (one group
    targeting ``Linear``, its ``ignore`` the peer's skip list as ``re:`` patterns); ``renames`` maps
    a stored local tensor name to compressed-tensors' (``weight_scale_inv`` -> ``weight_scale``);
    ``skipped`` maps local tensor names that are not read to the reason (warned once per load);
    ``scale_shape`` turns a stored scale's shape into the compressed-tensors one (same elements,
    same order); ``default_skips`` says transformers' default skip list applies;
    ``transformers_skips`` that transformers' ``HfQuantizer.get_modules_to_not_convert`` rules apply
    (:meth:`model_ignore`). ``fused_experts``: the peer quantizes the fused experts modules, stored
    whole (gpt-oss: ``<experts>.gate_up_proj_blocks`` ...), not the ``Linear`` s: the group targets
    every fused-experts module of the model (:meth:`model_targets`) and the stored tensors are
    moved to compressed-tensors' names under ``<experts>.<parameter>`` (:func:`gpt_oss_entries`).
    """

    format: str
    source: Path
    field: str
    quantization_config: dict
    renames: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    scale_shape: Callable[[tuple[int, ...]], tuple[int, ...]] | None = None
    default_skips: bool = False
    transformers_skips: bool = False
    fused_experts: bool = False

    def config_json(self) -> dict:
        """A ``config.json`` mapping holding only the compressed-tensors ``quantization_config``
        (what :func:`oqcore.loading.ct_config.ct_config` parses)."""
        return {"quantization_config": self.quantization_config}

    def model_ignore(self, model: Any) -> list[str]:
        """The ``ignore`` patterns that depend on the model: transformers' default skip list (when
        the checkpoint gives none) and the model's ``_keep_in_fp32_modules``, as transformers adds
        them in ``HfQuantizer.get_modules_to_not_convert``; empty for ModelOpt."""
        if not self.transformers_skips:
            return []
        keys: list[str] = []
        if self.default_skips:
            from transformers.quantizers.base import get_keys_to_not_convert

            keys += get_keys_to_not_convert(model)
        keys += list(getattr(model, "_keep_in_fp32_modules", None) or [])
        return [p for k in sorted(set(keys)) for p in transformers_skip_patterns(k)]

    def model_targets(self, model: Any) -> list[str] | None:
        """The config group's targets when they depend on the model (:attr:`fused_experts`: the
        names of its fused-experts modules, which transformers' ``replace_with_mxfp4_linear``
        converts), else ``None`` (the view's own targets stand)."""
        if not self.fused_experts:
            return None
        from oqcore.layers import layer_kind

        return [n for n, m in model.named_modules() if layer_kind(m) == "moe"]

    def tensor_entries(self, entries: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
        """``entries`` (checkpoint name -> header entry) under compressed-tensors' names: scales
        renamed (the entry keeps its stored ``name``, so messages name the tensor as stored) and
        reshaped to compressed-tensors' layout, the :attr:`skipped` ones left out (one
        ``UserWarning`` naming how many and why). Nothing is read.

        Raises :class:`oqcore.CheckpointError` naming the file and tensors for a float8 ``weight``
        without its scale, or a module holding two scales (the peer's name and compressed-tensors').
        """
        if self.fused_experts:
            entries = gpt_oss_entries(entries)
        out: dict[str, TensorEntry] = {}
        dropped: dict[str, list[str]] = {}
        modules: dict[str, dict[str, TensorEntry]] = {}
        for key, e in entries.items():
            mod, _, local = key.rpartition(".")
            if local in self.skipped:
                dropped.setdefault(local, []).append(key)
                continue
            new = self.renames.get(local, local)
            if new in modules.setdefault(mod, {}):
                other = modules[mod][new]
                raise CheckpointError(
                    f"{e.file}: tensors {other.name!r} and {e.name!r} are both the scale of {mod!r}; a {self.format} "
                    "checkpoint holds one"
                )
            if new == _STORED_SCALE and self.scale_shape is not None:
                e = dataclasses.replace(e, shape=self.scale_shape(e.shape))
            modules[mod][new] = e
            out[f"{mod}.{new}" if mod else new] = e
        for mod, local in modules.items():
            w = local.get("weight")
            if w is not None and w.is_float8 and _STORED_SCALE not in local:
                names = " or ".join(
                    repr(f"{mod}.{n}")
                    for n, to in [*self.renames.items(), (_STORED_SCALE, _STORED_SCALE)]
                    if to == _STORED_SCALE
                )
                raise CheckpointError(
                    f"{w.file}: tensor {w.name!r} is {w.describe()}, but its scale ({names}) is missing: a {self.format} "
                    "checkpoint stores one beside each quantized weight"
                )
        for local, keys in dropped.items():
            warnings.warn(
                f"oqcore.load: {len(keys)} {local!r} tensor(s) of this {self.format} checkpoint are not used "
                f"({keys[0]!r}{' ...' if len(keys) > 1 else ''}): {self.skipped[local]}",
                UserWarning,
                stacklevel=4,
            )
        return out


FINEGRAINED = "transformers FineGrainedFP8"
MODELOPT = "NVIDIA ModelOpt"


def declares_peer_format(path: Path, raw: object) -> bool:
    """Whether a folder's metadata declares a peer format this module reads (cheap: no check of
    the fields): ``quant_method`` ``fp8`` or ``modelopt*`` in ``config.json``, or an
    ``hf_quant_config.json`` beside a ``config.json`` without ``quantization_config``."""
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    if isinstance(qc, dict):
        method = qc.get("quant_method")
        return isinstance(method, str) and (
            method in (FP8_QUANT_METHOD, MXFP4_QUANT_METHOD) or method.lower().startswith(MODELOPT_QUANT_METHOD)
        )
    return qc is None and (Path(path) / MODELOPT_FILE).is_file()


def peer_view(path: Path, raw: dict, registry: Any = None) -> PeerView | None:
    """The compressed-tensors view of the folder ``path`` (parsed ``config.json`` ``raw``), or
    ``None`` when it is not a peer format (:func:`declares_peer_format`).

    With ``registry`` (:func:`oqcore.plugins.get_registry`), the view is checked to be readable:
    some registered scheme declares its weights and input-activation args. Raises
    :class:`oqcore.CheckpointError` naming the file and the field for anything oqcore cannot read
    as stored (see the module docstring).
    """
    path = Path(path)
    if not declares_peer_format(path, raw):
        return None
    qc = raw.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == FP8_QUANT_METHOD:
        view = _finegrained(path / "config.json", qc)
    elif isinstance(qc, dict) and qc.get("quant_method") == MXFP4_QUANT_METHOD:
        view = _gpt_oss(path / "config.json", qc)
    elif isinstance(qc, dict):
        view = _modelopt_config_json(path / "config.json", qc)
    else:
        f = path / MODELOPT_FILE
        obj = read_json_object(f, "NVIDIA ModelOpt quantization metadata")
        q = obj.get("quantization")
        if not isinstance(q, dict):
            raise CheckpointError(f"{f}: field 'quantization' must be an object with 'quant_algo', found {q!r}")
        view = _modelopt(
            f,
            "quantization",
            q.get("quant_algo"),
            q.get("kv_cache_quant_algo"),
            "kv_cache_quant_algo",
            q.get("exclude_modules"),
            "exclude_modules",
        )
    if registry is not None:
        _check_readable(view, registry)
    return view


# -- transformers FineGrainedFP8 -------------------------------------------------------------------


def transformers_skip_patterns(key: str) -> list[str]:
    """compressed-tensors ``re:`` patterns (``re.match``) matching the module names transformers'
    ``should_convert_module`` skips for ``modules_to_not_convert`` entry ``key``: ``key`` as a regex
    from the start of the name up to a module boundary, or the name ending with ``key`` (also a
    module under such a name: a per-expert projection under the fused experts transformers skips)."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return [f"re:(?:{key}){boundary}", f"re:.*{re.escape(key)}(?:\\..*)?\\Z"]


def _transformers_skips(qc: dict, skip_field: str, bad: Callable[..., CheckpointError]) -> tuple[Any, list[str]]:
    """``(the skip list as stored, its compressed-tensors ignore patterns)`` of a transformers
    quantization config's ``skip_field`` (``modules_to_not_convert``); ``bad(field, value, valid)``
    makes the error for a value that is not a list of regular expressions."""
    skip = qc.get(skip_field)
    if skip is not None and not (isinstance(skip, list) and all(isinstance(s, str) for s in skip)):
        raise bad(skip_field, skip, "it must be a list of module names or patterns")
    ignore = []
    for s in skip or []:
        try:
            re.compile(s)
        except re.error as e:
            raise bad(
                skip_field, skip, f"entry {s!r} is not a regular expression transformers can match ({e})"
            ) from None
        ignore += transformers_skip_patterns(s)
    return skip, ignore


def _finegrained(cfg_file: Path, qc: dict) -> PeerView:
    where = "quantization_config"

    def bad(name: str, value: Any, valid: str) -> CheckpointError:
        """The error for field ``name`` holding ``value``, naming the file and what is valid."""
        return CheckpointError(f"{cfg_file}: {where}.{name} is {value!r}; {valid}")

    scheme = qc.get("activation_scheme", "dynamic")
    if not isinstance(scheme, str) or scheme.lower() not in ("dynamic", "static"):
        raise bad("activation_scheme", scheme, "transformers and vLLM accept 'dynamic' or 'static'")
    if scheme.lower() == "static":
        raise bad(
            "activation_scheme", scheme,
            "static FineGrainedFP8 activation scales (activation_scale / input_scale tensors, per block "
            "layout) are not read: oqcore reads FineGrainedFP8 checkpoints with activation_scheme 'dynamic' "
            "(static per-tensor fp8 input scales are read from compressed-tensors and ModelOpt checkpoints)",
        )  # fmt: skip
    for name, want in (("scale_fmt", "float"), ("expert_dtype", "fp8")):
        if qc.get(name, want) != want:
            raise bad(name, qc[name], f"oqcore reads {want!r} (float32 block scales, fp8 experts) only")
    if qc.get("modules_to_convert"):
        raise bad(
            "modules_to_convert", qc["modules_to_convert"], "oqcore does not quantize embeddings; it must be empty"
        )
    block = qc.get("weight_block_size")
    if block is not None and not (
        isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)
    ):
        raise bad("weight_block_size", block, "it must be two positive integers [rows, columns] or null (per tensor)")
    skip_field = "modules_to_not_convert" if qc.get("modules_to_not_convert") is not None else "ignored_layers"
    skip, ignore = _transformers_skips(qc, skip_field, bad)
    if block is None:
        weights = _fp8_args("tensor", False)
        acts = _fp8_args("tensor", True)
    else:
        weights = _fp8_args("block", False, block_structure=list(block))
        acts = _fp8_args("group", True, group_size=block[1])
    return PeerView(
        FINEGRAINED,
        cfg_file,
        f"{where}.weight_block_size",
        _ct_config(weights, acts, ignore),
        renames={"weight_scale_inv": _STORED_SCALE},
        default_skips=skip is None,
        transformers_skips=True,
    )


# -- gpt-oss MXFP4 (transformers Mxfp4Config) --------------------------------------------------------

GPT_OSS = "gpt-oss MXFP4 (transformers Mxfp4Config)"

GPT_OSS_FIELDS = ("quant_method", "modules_to_not_convert", "dequantize")
"""The fields of transformers' ``Mxfp4Config`` (``utils/quantization_config.py``; its ``to_dict``
writes the first two, ``dequantize`` is a loading option and is ignored)."""

GPT_OSS_BLOCK_BYTES = 16
"""gpt-oss stores each MX block of 32 e2m1 values as 16 bytes, two values per byte (the last dim
of ``*_blocks``; ``convert_moe_packed_tensors`` unpacks byte ``j`` to elements ``2j`` (low nibble)
and ``2j + 1`` (high nibble))."""

_GPT_OSS_TENSORS = {"_blocks": "weight_packed", "_scales": _STORED_SCALE}
"""gpt-oss tensor suffix -> compressed-tensors' local name (mxfp4-pack-quantized)."""

_E2M1_BITS = 4
"""Bits of one e2m1 (fp4) element."""


def _mxfp4_args() -> dict:
    """compressed-tensors ``QuantizationArgs`` of what gpt-oss stores: 4-bit floats in groups of
    32 along K, one shared exponent per group stored as unsigned bytes (``U8``: compressed-tensors
    records such scales as ``scale_dtype: "torch.uint8"``), static weights."""
    from oqcore.loading.checkpoint import ST_DTYPES

    return {
        "num_bits": _E2M1_BITS, "type": "float", "symmetric": True, "strategy": "group",
        "group_size": GPT_OSS_BLOCK_BYTES * (8 // _E2M1_BITS), "scale_dtype": str(ST_DTYPES["U8"]), "dynamic": False,
    }  # fmt: skip


def _gpt_oss(cfg_file: Path, qc: dict) -> PeerView:
    """The view of a ``quant_method: mxfp4`` config (openai's gpt-oss checkpoints, what
    transformers' ``Mxfp4HfQuantizer`` reads): the fused experts of every MoE block are MXFP4 with
    no activation quantization (W4A16; an activation-only override such as ``moe.activation=mxfp8``
    applies, the checkpoint declaring none), everything else stays as stored.
    ``modules_to_not_convert`` keeps transformers' meaning (``should_convert_module`` on
    ``<mlp>.experts``); absent, transformers' default skip list applies. Raises
    :class:`oqcore.CheckpointError` naming the field for any other field or a bad skip list."""
    where = "quantization_config"

    def bad(name: str, value: Any, valid: str) -> CheckpointError:
        """The error for field ``name`` holding ``value``, naming the file and what is valid."""
        return CheckpointError(f"{cfg_file}: {where}.{name} is {value!r}; {valid}")

    unknown = [k for k in qc if k not in GPT_OSS_FIELDS]
    if unknown:
        raise CheckpointError(
            f"{cfg_file}: {where}.{unknown[0]} is not a field of transformers' Mxfp4Config (quant_method "
            f"{MXFP4_QUANT_METHOD!r}); its fields are {', '.join(GPT_OSS_FIELDS)}"
        )
    skip, ignore = _transformers_skips(qc, "modules_to_not_convert", bad)
    qconf = _ct_config(_mxfp4_args(), None, ignore, fmt="mxfp4-pack-quantized")
    return PeerView(
        GPT_OSS, cfg_file, f"{where}.quant_method", qconf,
        default_skips=skip is None, transformers_skips=True, fused_experts=True,
    )  # fmt: skip


def gpt_oss_entries(entries: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
    """gpt-oss's fused expert tensors under compressed-tensors' mxfp4-pack-quantized names, one
    module per fused parameter: ``<experts>.<p>_blocks`` U8 ``[E, N, K/32, 16]`` ->
    ``<experts>.<p>.weight_packed`` ``[E, N, K/2]`` (the same bytes: rows N of the canonical
    ``[E, N, K]`` expert stack, as transformers' ``convert_moe_packed_tensors`` reads them before
    transposing to its ``[E, K, N]`` parameter; gate_up's rows interleaved gate, up, gate, ...) and
    ``<experts>.<p>_scales`` U8 ``[E, N, K/32]`` -> ``<experts>.<p>.weight_scale`` (biased e8m0
    exponents, value ``2**(s - 127)``). Every other tensor is unchanged (the entries keep their
    stored names for messages).

    Raises :class:`oqcore.CheckpointError` naming the file and tensor for a ``_blocks`` without its
    ``_scales`` (or the reverse), blocks whose last dim is not 16 bytes, or scales whose shape is
    not the blocks' without that dim."""
    out: dict[str, TensorEntry] = {}
    found: dict[str, dict[str, TensorEntry]] = {}
    for key, e in entries.items():
        for suffix in _GPT_OSS_TENSORS:
            if key.endswith(suffix) and "." in key:
                found.setdefault(key[: -len(suffix)], {})[suffix] = e
                break
        else:
            out[key] = e
    for base, got in found.items():
        blocks, scales = got.get("_blocks"), got.get("_scales")
        if blocks is None or scales is None:
            have = blocks or scales
            missing = f"{base}_scales" if blocks is not None else f"{base}_blocks"
            raise CheckpointError(
                f"{have.file}: tensor {have.name!r} has no {missing!r} beside it: a gpt-oss MXFP4 checkpoint stores "
                "each fused expert weight as its packed e2m1 blocks and their e8m0 scales"
            )
        if len(blocks.shape) < 2 or blocks.shape[-1] != GPT_OSS_BLOCK_BYTES:
            raise CheckpointError(
                f"{blocks.file}: tensor {blocks.name!r} is {blocks.describe()}; gpt-oss MXFP4 blocks are U8 "
                f"[E, N, K/32, {GPT_OSS_BLOCK_BYTES}] ({GPT_OSS_BLOCK_BYTES} bytes of two e2m1 values per block of 32)"
            )
        if scales.shape != blocks.shape[:-1]:
            raise CheckpointError(
                f"{scales.file}: tensor {scales.name!r} is {scales.describe()}; the scales of {blocks.name!r} "
                f"({blocks.describe()}) must be U8 {list(blocks.shape[:-1])} (one per block)"
            )
        packed = (*blocks.shape[:-2], blocks.shape[-2] * blocks.shape[-1])
        out[f"{base}.{_GPT_OSS_TENSORS['_blocks']}"] = dataclasses.replace(blocks, shape=packed)
        out[f"{base}.{_GPT_OSS_TENSORS['_scales']}"] = scales
    return out


# -- NVIDIA ModelOpt ---------------------------------------------------------------------------------


def _modelopt_config_json(cfg_file: Path, qc: dict) -> PeerView:
    q = qc.get("quantization")
    if isinstance(q, dict):  # the hf_quant_config.json layout, nested in config.json
        return _modelopt(cfg_file, "quantization_config.quantization", q.get("quant_algo"), q.get("kv_cache_quant_algo"),
                         "kv_cache_quant_algo", q.get("exclude_modules"), "exclude_modules")  # fmt: skip
    return _modelopt(cfg_file, "quantization_config", qc.get("quant_algo"), qc.get("kv_cache_scheme"), "kv_cache_scheme",
                     qc.get("ignore"), "ignore")  # fmt: skip


def _per_channel_scale(shape: tuple[int, ...]) -> tuple[int, ...]:
    """ModelOpt's per-channel ``weight_scale [N]`` as compressed-tensors' ``[N, 1]``."""
    return (*shape, 1) if len(shape) == 1 else shape


# quant_algo -> (weights args, input-activation args, skipped tensors, scale reshape)
_MODELOPT_ALGOS: dict[str, tuple[dict, dict | None, dict[str, str], Callable | None]] = {
    "FP8": (_fp8_args("tensor", False), _fp8_args("tensor", False), {}, None),  # static input_scale, read
    "FP8_PER_CHANNEL_PER_TOKEN": (_fp8_args("channel", False), _fp8_args("token", True), {}, _per_channel_scale),
}


def _modelopt(src: Path, where: str, algo: Any, kv: Any, kv_field: str, exclude: Any, exclude_field: str) -> PeerView:
    if not isinstance(algo, str) or algo.upper() not in _MODELOPT_ALGOS:
        raise CheckpointError(
            f"{src}: {where}.quant_algo is {algo!r}; oqcore reads NVIDIA ModelOpt checkpoints with quant_algo "
            f"{', '.join(map(repr, _MODELOPT_ALGOS))} (fp8 weights); serve others with vLLM or TensorRT-LLM"
        )
    if kv is not None:
        raise CheckpointError(
            f"{src}: {where}.{kv_field} is {kv!r}: the checkpoint quantizes the KV cache (k_scale / v_scale), which "
            "oqcore does not do; export without KV-cache quantization, or serve the checkpoint with vLLM"
        )
    if exclude is not None and not (isinstance(exclude, list) and all(isinstance(s, str) for s in exclude)):
        raise CheckpointError(
            f"{src}: {where}.{exclude_field} is {exclude!r}; it must be a list of module names or wildcards"
        )
    weights, acts, skipped, reshape = _MODELOPT_ALGOS[algo.upper()]
    ignore = [p for s in exclude or [] for p in modelopt_exclude_patterns(s)]
    return PeerView(
        f"{MODELOPT} {algo.upper()}", src, f"{where}.quant_algo", _ct_config(weights, acts, ignore),
        skipped=dict(skipped), scale_shape=reshape,
    )  # fmt: skip


def modelopt_exclude_patterns(pattern: str) -> list[str]:
    """compressed-tensors ``re:`` patterns matching the module names vLLM's
    ``ModelOptQuantConfigBase.is_layer_excluded`` excludes for ``pattern``: the name contains it
    (exact names included), or ``fnmatch`` matches it as a wildcard."""
    return [f"re:.*{re.escape(pattern)}", "re:" + fnmatch.translate(pattern)]


# -- shared ------------------------------------------------------------------------------------------


def _ct_config(weights: dict, acts: dict | None, ignore: list[str], fmt: str = "float-quantized") -> dict:
    """A compressed-tensors ``quantization_config`` of one group over every ``Linear`` (a
    :attr:`PeerView.fused_experts` view replaces the targets per model), stored in ``fmt``."""
    return {
        "quant_method": CT_QUANT_METHOD,
        "quantization_status": "compressed",
        "format": fmt,
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
        "ignore": ignore,
    }


def _check_readable(view: PeerView, registry: Any) -> None:
    """Some registered scheme reads the view's group; else :class:`oqcore.CheckpointError` naming
    the peer's field (not the translated config group)."""
    from oqcore.loading.ct_config import ct_config, match_group

    cfg = ct_config(view.config_json(), view.source)
    for name, group in cfg.config_groups.items():
        try:
            match_group(name, group, view.source, registry)
        except CheckpointError as e:
            why = str(e).split(": ", 2)[-1]
            raise CheckpointError(
                f"{view.source}: {view.field}: no registered oqcore scheme reads this {view.format} layout: {why}"
            ) from None
