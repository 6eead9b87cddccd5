"""The fp8 scheme records: one :class:`oqcore.Scheme` per fp8 weight key (per tensor, per channel,
128x128 blocks), with vLLM's activation pairings stated once here.

Every key's :class:`oqcore.KeyFormat` (``qdata`` float8_e4m3fn of the input's shape, ``scale``
float32 laid out per :mod:`oq_plugin_fp8.quant`) carries the same four quantizer implementations
(same bytes): the torch reference, Triton (CUDA), the C kernel (CPU) and torch.compile (CPU, large
tensors). The reference and the C kernel take an externally reduced amax (``takes_amax``, tensor
parallelism; see :mod:`oq_plugin_fp8.quant`). The core derives the method classes, the quantizer candidates and the reference forward.
"""

from __future__ import annotations

from functools import partial

from oqcore import KeyFormat, QuantizerImpl, Scheme
from oq_toolkit.quantizers import compiled_quantizer, native_cpu_quantizer, triton_quantizer

from oq_plugin_fp8 import keys as k
from oq_plugin_fp8.backends import backends
from oq_plugin_fp8.compiled import quantize_grouped_compiled
from oq_plugin_fp8.cpu import quantize_fp8_grouped
from oq_plugin_fp8.quant import (
    Grouping,
    compressed_tensors_args,
    grouping_of,
    quantize_static_tensor,
    reference_dequantizer,
    reference_quantizer,
)


def _triton(g: Grouping):
    def quantize(w, options=None):
        """Triton fp8 quantizer of one grouping (imports triton on first call); the reference's bytes."""
        from oq_plugin_fp8.kernels.quantize import quantize_grouped

        return quantize_grouped(w, g)

    return quantize


def _cpu(g: Grouping):
    def quantize(w, options=None, amax=None):
        """C fp8 quantizer of one grouping (:mod:`oq_plugin_fp8.cpu`, built on first call; the
        reference without a compiler); raises :class:`oqcore.NonFiniteError` for NaN/Inf.
        ``amax``: an externally reduced per-group amax (the group grid, float32)."""
        return quantize_fp8_grouped(w, g, check_finite=True, amax=amax)

    return quantize


def _compiled(g: Grouping):
    def quantize(w, options=None):
        """torch.compile of the reference graph for one grouping (compiled on first call per shape)."""
        return quantize_grouped_compiled(w, g)

    return quantize


def _format(key) -> KeyFormat:
    g = grouping_of(key)
    implementations = (
        QuantizerImpl(
            "torch", reference_quantizer(g), takes_amax=True, description="compressed-tensors' formula in float32"
        ),
        triton_quantizer(_triton(g), "oq_plugin_fp8.kernels", "one-pass Triton fp8 quantizer"),
        native_cpu_quantizer(_cpu(g), "C fp8 quantizer (oq_plugin_fp8.cpu)", takes_amax=True),
        compiled_quantizer(_compiled(g), "torch.compile of the fp8 graph"),
    )
    return KeyFormat(
        key,
        reference_dequantizer(g),
        implementations,
        element="e4m3fn",
        compressed_tensors=compressed_tensors_args(key),
        # the per-tensor static key is also a static activation key (calibrated input_scale)
        static_quantize=quantize_static_tensor if key == k.kFp8StaticTensorSym else None,
    )


FORMATS: dict = {key: _format(key) for key, _, _ in k.KEYS.values()}
"""QuantKey -> :class:`oqcore.KeyFormat`, one object per key (activation formats are shared by schemes)."""

PAIRINGS = {
    # weight key: (scheme name, supported activation keys, default), as vLLM pairs them
    k.kFp8StaticTensorSym: (
        "fp8_per_tensor",
        (None, k.kFp8DynamicTensorSym, k.kFp8DynamicTokenSym, k.kFp8StaticTensorSym),
        k.kFp8DynamicTensorSym,
    ),
    k.kFp8StaticChannelSym: ("fp8_per_channel", (None, k.kFp8DynamicTokenSym, k.kFp8DynamicTensorSym), k.kFp8DynamicTokenSym),
    k.kFp8Static128BlockSym: ("fp8_per_block", (None, k.kFp8Dynamic128Sym), k.kFp8Dynamic128Sym),
}
"""Per tensor: per-tensor dynamic activations by default (vLLM's ``Fp8LinearMethod``), or static
per-tensor activations with a calibrated ``input_scale`` read from a checkpoint (llm-compressor's FP8
preset, ModelOpt FP8; vLLM's ``CompressedTensorsW8A8Fp8`` / fp8 MoE with static input scales); per channel:
per-token (FP8_DYNAMIC); 128x128 blocks: 1x128 groups (DeepSeek-V3). ``None``: weight-only (W8A16)."""

SCHEMES = tuple(
    Scheme(
        name,
        FORMATS[weight],
        activations=tuple(None if a is None else FORMATS[a] for a in acts),
        default_activation=default,
        backends=partial(backends, weight),
        # compressed-tensors stores fp8 W8A8 as float-quantized and weight-only as naive-quantized
        # (its infer_module_format; the same bytes either way)
        compressed_tensors_format={a: "naive-quantized" if a is None else "float-quantized" for a in acts},
        description=f"fp8 weights ({FORMATS[weight].key.scale.group_shape} scales)",
    )
    for weight, (name, acts, default) in PAIRINGS.items()
)
