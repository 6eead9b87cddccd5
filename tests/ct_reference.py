"""Reference compressed-tensors checkpoints written by compressed-tensors' own code (a test utility).

``write_ct_checkpoint(src, out, scheme)`` turns a bf16/f32 safetensors checkpoint folder into the
``quant_method: compressed-tensors`` folder that llm-compressor's ``model_free_ptq`` writes for the
same preset, using only compressed-tensors objects and functions for everything that decides bytes:
the preset ``QuantizationScheme`` / ``QuantizationArgs``, ``initialize_module_for_quantization``
(qparam shapes and dtypes), ``calculate_qparams`` (the scale arithmetic, in the weight's dtype, as
llm-compressor's min-max observer calls it), ``compress_module`` (the format compressors:
float-quantized, mxfp8-quantized, pack-quantized) and ``QuantizationConfig`` (the config JSON).
The only steps written here are the ones llm-compressor does around them, which compressed-tensors
does not ship: the weight's per-strategy min/max (``llmcompressor.observers.helpers.
flatten_for_calibration`` + ``amin/amax(dim=(0, -1))``) and, for gpt-oss, splitting the fused
transposed experts into per-expert linears the way llm-compressor's ``GptOssExpertMLP`` does
(gate = even columns, up = odd columns). llm-compressor is not a dependency of the tests.

MoE experts are written per expert under the names transformers' reverse conversion mapping gives
on ``save_pretrained`` (``...experts.{e}.{gate,up,down}_proj.weight`` / Mixtral ``w1,w3,w2``);
those are already the names on disk of the checkpoints ``oqcore.synthetic.make_tiny_moe`` writes,
except gpt-oss, whose checkpoint keeps 3D fused experts (see :func:`split_gpt_oss_experts`).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

# Names of the schemes this module writes -> compressed-tensors preset name (or None: built here,
# because compressed-tensors has no preset for it).
SCHEMES: dict[str, str | None] = {
    "FP8": "FP8",  # fp8 per-tensor static weights, static per-tensor activations (dense only)
    "FP8_W8A16": "FP8",  # the FP8 preset's weights without activations (what model_free_ptq can write)
    "FP8_DYNAMIC": "FP8_DYNAMIC",  # fp8 per-channel weights, dynamic per-token activations
    "FP8_BLOCK": "FP8_BLOCK",  # fp8 128x128 blocks, dynamic group-128 activations
    "MXFP8": "MXFP8",  # fp8 group 32 + e8m0 scales, dynamic MX activations
    "MXFP8A16": "MXFP8A16",  # the same weights, no activation quantization
    "W8A16": "W8A16",  # int8 group 128 symmetric, weight only (the preset)
    "W8A16_CHANNEL": None,  # int8 per-channel symmetric, weight only
}

# Routers stay in high precision, as in the ignore lists llm-compressor's MoE examples pass.
ROUTER_IGNORE = ("re:.*mlp\\.gate$", "re:.*block_sparse_moe\\.gate$", "re:.*mlp\\.router$")


def quantization_scheme(scheme: str, targets=("Linear",)):
    """The compressed-tensors ``QuantizationScheme`` for one of :data:`SCHEMES`."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationScheme,
        QuantizationStrategy,
        QuantizationType,
        preset_name_to_scheme,
    )

    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; valid: {sorted(SCHEMES)}")
    preset = SCHEMES[scheme]
    if preset is not None:
        qs = preset_name_to_scheme(preset, list(targets))
        if scheme == "FP8_W8A16":
            qs.input_activations = None
        return qs
    weights = QuantizationArgs(
        num_bits=8,
        type=QuantizationType.INT,
        strategy=QuantizationStrategy.CHANNEL,
        symmetric=True,
        dynamic=False,
    )
    return QuantizationScheme(targets=list(targets), weights=weights)


def _observe_weight(weight: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """min/max of ``weight`` per scale, in the weight's dtype: llm-compressor's
    ``flatten_for_calibration(weight, "weight", args)`` then ``amin/amax(dim=(0, -1))``."""
    from compressed_tensors.quantization import QuantizationStrategy
    from compressed_tensors.quantization.utils import maybe_pad_tensor_for_block_quant

    s = args.strategy
    if s == QuantizationStrategy.TENSOR:
        flat = weight.reshape(1, 1, -1)
    elif s == QuantizationStrategy.CHANNEL:
        flat = weight.unsqueeze(-2).unsqueeze(0)
    elif s in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
        flat = weight.unflatten(-1, (-1, args.group_size)).unsqueeze(0)
    elif s == QuantizationStrategy.BLOCK:
        bh, bw = args.block_structure
        # zero padding, as llm-compressor does, so partial blocks keep their own amax
        w = maybe_pad_tensor_for_block_quant(weight, args.block_structure)
        rows, cols = w.shape
        flat = w.reshape(rows // bh, bh, cols // bw, bw).transpose(1, 2).flatten(-2, -1).unsqueeze(0)
    else:
        raise ValueError(f"strategy {s} is not a weight strategy")
    return torch.amin(flat, dim=(0, -1)), torch.amax(flat, dim=(0, -1))


def compress_linear_weight(weight: torch.Tensor, scheme) -> dict[str, torch.Tensor]:
    """Quantize and compress one 2D ``weight`` [N, K] with compressed-tensors, exactly as
    llm-compressor's model-free path does for one tensor. Returns the module-local tensors
    (``weight`` or ``weight_packed``/``weight_shape``, ``weight_scale``, ...)."""
    from compressed_tensors.compressors import compress_module
    from compressed_tensors.offload import update_offload_parameter
    from compressed_tensors.quantization import QuantizationStatus, initialize_module_for_quantization
    from compressed_tensors.quantization.utils import calculate_qparams

    if weight.ndim != 2:
        raise ValueError(f"expected a 2D linear weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    module = torch.nn.Linear(k, n, bias=False, dtype=weight.dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
    scheme = scheme.model_copy(deep=True)
    initialize_module_for_quantization(module, scheme, force_zero_point=False)
    mn, mx = _observe_weight(module.weight.detach(), scheme.weights)
    scale, zp = calculate_qparams(mn, mx, scheme.weights)
    update_offload_parameter(module, "weight_scale", scale)
    if hasattr(module, "weight_zero_point"):
        update_offload_parameter(module, "weight_zero_point", zp)
    module.quantization_status = QuantizationStatus.FROZEN
    compress_module(module)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def split_gpt_oss_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gpt-oss stores experts fused and transposed: ``experts.gate_up_proj`` [E, H, 2I] with gate
    and up interleaved (even / odd columns), ``experts.down_proj`` [E, I, H], and biases. Split them
    into per-expert linears ``experts.{e}.{gate,up,down}_proj.{weight,bias}`` ([out, in]), the
    module names llm-compressor's linearized ``GptOssLinearExperts`` saves (transformers has no
    reverse mapping for gpt-oss: its checkpoints are fused on disk)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        m = re.fullmatch(r"(.*\.experts)\.(gate_up_proj|down_proj)(_bias)?", name)
        if m is None:
            out[name] = t
            continue
        prefix, proj, bias = m.groups()
        for e in range(t.shape[0]):
            if proj == "gate_up_proj":
                if bias:
                    out[f"{prefix}.{e}.gate_proj.bias"] = t[e, 0::2].contiguous()
                    out[f"{prefix}.{e}.up_proj.bias"] = t[e, 1::2].contiguous()
                else:
                    out[f"{prefix}.{e}.gate_proj.weight"] = t[e][:, 0::2].T.contiguous()
                    out[f"{prefix}.{e}.up_proj.weight"] = t[e][:, 1::2].T.contiguous()
            elif bias:
                out[f"{prefix}.{e}.down_proj.bias"] = t[e].contiguous()
            else:
                out[f"{prefix}.{e}.down_proj.weight"] = t[e].T.contiguous()
    return out


def _linear_module_names(src: Path, tensors: dict[str, torch.Tensor]) -> set[str]:
    """Names of the modules whose ``.weight`` is an nn.Linear weight: the Linear modules of the
    model transformers builds from ``config.json`` (on the meta device), plus per-expert
    projections (fused in memory in transformers v5, per expert on disk)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(src)
    archs = getattr(cfg, "architectures", None) or []
    cls = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in archs) else AutoModel
    with torch.device("meta"):
        model = cls.from_config(cfg)
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    expert = re.compile(r".*\.experts\.\d+\.[^.]+$")
    for key, t in tensors.items():
        mod, _, param = key.rpartition(".")
        if param == "weight" and t.ndim == 2 and expert.fullmatch(mod):
            names.add(mod)
    return names


def calibrate_input_scales(src: Path, modules: set[str], args, seed: int = 0) -> dict[str, torch.Tensor]:
    """Static per-tensor input scales for the Linear ``modules`` of the dense model in ``src``, as
    llm-compressor's ``static_minmax`` input observer gives them: running min/max of each layer's
    input over a calibration batch (seeded random token ids, no data set), then compressed-tensors'
    ``calculate_qparams`` in the activation dtype. Returns {module name: input_scale [1]}."""
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(src)
    archs = getattr(cfg, "architectures", None) or []
    cls = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in archs) else AutoModel
    model = cls.from_pretrained(src).eval()
    stats: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, m in model.named_modules():
        if name in modules:

            def hook(mod, inp, name=name):
                x = inp[0].detach()
                mn, mx = torch.aminmax(x)
                if name in stats:
                    mn, mx = torch.min(mn, stats[name][0]), torch.max(mx, stats[name][1])
                stats[name] = [mn, mx]

            hooks.append(m.register_forward_pre_hook(hook))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (2, 16), generator=gen)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return {n: calculate_qparams(mn, mx, args)[0].reshape(1) for n, (mn, mx) in stats.items()}


def _read_safetensors(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    if not tensors:
        raise FileNotFoundError(f"no *.safetensors in {src}")
    return tensors


def write_ct_checkpoint(
    src_model_dir: str | Path,
    out_dir: str | Path,
    scheme: str,
    ignore: tuple[str, ...] = ("lm_head",),
) -> Path:
    """Write ``src_model_dir`` quantized with ``scheme`` (one of :data:`SCHEMES`) to ``out_dir`` in
    compressed-tensors' compressed format, and return ``out_dir``.

    Every nn.Linear weight and every per-expert projection is quantized unless its module name
    matches ``ignore`` (compressed-tensors names: exact or ``re:`` patterns) or a router pattern
    (:data:`ROUTER_IGNORE`, added for MoE models); other tensors (embeddings, norms, biases) are
    copied as they are. One ``model.safetensors`` is written, plus every non-weight file of the
    source, and ``config.json`` gets the ``quantization_config`` compressed-tensors writes.
    Raises ``ValueError`` for an unknown scheme or a weight shape the scheme cannot take (e.g. a
    group-128 scheme on K % 128 != 0), as llm-compressor does.
    """
    from compressed_tensors.base import COMPRESSION_VERSION_NAME, QUANTIZATION_CONFIG_NAME
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
    from compressed_tensors.utils import match_name
    from compressed_tensors.version import __version__ as ct_version
    from safetensors.torch import save_file

    src, out = Path(src_model_dir), Path(out_dir)
    qscheme = quantization_scheme(scheme)
    tensors = _read_safetensors(src)
    cfg = json.loads((src / "config.json").read_text())
    is_moe = any(re.search(r"\.experts\.", k) for k in tensors)
    if cfg.get("model_type") == "gpt_oss":
        tensors = split_gpt_oss_experts(tensors)
    ignore_list = list(ignore) + ([p for p in ROUTER_IGNORE] if is_moe else [])
    linears = _linear_module_names(src, tensors)
    targeted = {m for m in linears if not any(match_name(m, ign) for ign in ignore_list)}
    input_scales: dict[str, torch.Tensor] = {}
    acts = qscheme.input_activations
    if acts is not None and not acts.dynamic:
        if is_moe:
            raise ValueError(
                f"scheme {scheme!r} has static input activations, which need calibration through "
                "every expert (llm-compressor oneshot); not written for MoE models here"
            )
        input_scales = calibrate_input_scales(src, targeted, acts)

    result: dict[str, torch.Tensor] = {}
    fmt = None
    for name, t in tensors.items():
        mod, _, param = name.rpartition(".")
        quantize = param == "weight" and t.ndim == 2 and mod in targeted
        if not quantize:
            result[name] = t.contiguous()
            continue
        local = compress_linear_weight(t, qscheme)
        for k, v in local.items():
            result[f"{mod}.{k}"] = v.contiguous()
        if "input_scale" in local:
            if mod not in input_scales:
                raise ValueError(f"calibration never reached {mod!r}; its input_scale would be garbage")
            # the scale's dtype is the activation dtype, as initialize_qparams makes it
            result[f"{mod}.input_scale"] = input_scales[mod].to(local["input_scale"].dtype)
    # compress_module chose the format from the scheme (infer_module_format); record the same one
    from compressed_tensors.compressors.format import infer_module_format

    fmt = infer_module_format(torch.nn.Linear, qscheme)
    qscheme.format = fmt.value if hasattr(fmt, "value") else fmt

    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors" or f.name == "model.safetensors.index.json":
            continue
        dst = out / f.name
        if f.is_dir():
            shutil.copytree(f, dst, dirs_exist_ok=True)
        else:
            shutil.copyfile(f, dst)
    save_file(result, out / "model.safetensors", metadata={"format": "pt"})

    qconfig = QuantizationConfig(
        config_groups={"group_0": qscheme},
        ignore=ignore_list,
        quantization_status=QuantizationStatus.COMPRESSED,
        format=qscheme.format,
    )
    data = qconfig.model_dump()
    data[COMPRESSION_VERSION_NAME] = ct_version
    cfg[QUANTIZATION_CONFIG_NAME] = data
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return out
