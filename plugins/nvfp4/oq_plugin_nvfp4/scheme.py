"""The nvfp4 scheme record: e2m1 elements two per byte, one float8_e4m3fn scale per 16 values along
K and one float32 global scale per tensor (per expert for MoE), compressed-tensors' NVFP4 bytes.

Activations: none (W4A16, the default; compressed-tensors' NVFP4A16) or dynamic ``nvfp4`` (W4A4 with
the global scale computed from each input, torchao's dynamic per-tensor NVFP4 activations; it has no
compressed-tensors form, whose NVFP4 activations carry a calibrated ``input_global_scale``). Shape
rule: every reduction dim a multiple of 16 (oq-plugin-mxfp8's :func:`~oq_plugin_mxfp8.scheme.block_rule`).
"""

from __future__ import annotations

from oqcore import KeyFormat, OnlineLinearMethodBase, OnlineMoEMethodBase, QuantizerImpl, Scheme
from oq_toolkit.quantizers import compiled_quantizer, native_cpu_quantizer, triton_quantizer

from oq_plugin_mxfp8.scheme import block_rule

from oq_plugin_nvfp4 import keys as k
from oq_plugin_nvfp4.backends import backends
from oq_plugin_nvfp4.compiled import quantize_nvfp4_compiled
from oq_plugin_nvfp4.cpu import quantize_nvfp4_checked
from oq_plugin_nvfp4.quant import Nvfp4Options, dequantize_nvfp4, quantize_nvfp4

check_k = block_rule("nvfp4", k.NV_BLOCK)


def _triton_quantize(x, options=None):
    from oq_plugin_nvfp4.kernels.quant import quantize_nvfp4_triton

    return quantize_nvfp4_triton(x, options)


class Nvfp4Linear(OnlineLinearMethodBase):
    """nvfp4's difference from the base linear method: K a multiple of 16."""

    check_layer = classmethod(check_k)


class Nvfp4MoE(OnlineMoEMethodBase):
    """nvfp4's difference from the base MoE method: H and I multiples of 16."""

    check_layer = classmethod(check_k)


IMPLEMENTATIONS = (
    # the reference and the C kernel take an externally reduced amax (takes_amax, tensor
    # parallelism): the per-tensor (per-expert) amax the global scale is made from
    QuantizerImpl("torch", quantize_nvfp4, takes_amax=True, description="compressed-tensors' NVFP4 rules, float32"),
    triton_quantizer(_triton_quantize, "oq_plugin_nvfp4.kernels", "one-pass Triton nvfp4 quantizer"),
    native_cpu_quantizer(quantize_nvfp4_checked, "C nvfp4 quantizer (oq_plugin_nvfp4.cpu)", takes_amax=True),
    # a CPU fallback where no C compiler is found (about 8x slower than the C kernel, measured)
    compiled_quantizer(quantize_nvfp4_compiled, "torch.compile of the nvfp4 graph"),
)

TENSORS = ("qdata", "scale", "global_scale")
"""``weight [N, K/2]`` uint8, ``weight_scale [N, K/16]`` float8_e4m3fn, ``weight_global_scale [1]``
float32 (compressed-tensors' names: its ``weight_packed`` is ``weight`` here)."""

WEIGHT = KeyFormat(
    k.kNvfp4Static,
    dequantize_nvfp4,
    IMPLEMENTATIONS,
    tensors=TENSORS,
    values_per_element=2,
    element="e2m1",
    # vLLM serves fused q/k/v and gate/up with one global scale (their max), as llm-compressor
    # quantizes them: siblings share the per-tensor amax the global scale is made from
    fused_outer_scale=True,
    # compressed-tensors' NVFP4A16 preset weights
    compressed_tensors={
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "strategy": "tensor_group",
        "group_size": k.NV_BLOCK,
        "scale_dtype": "torch.float8_e4m3fn",
        "dynamic": False,
    },
)
DYNAMIC = KeyFormat(
    k.kNvfp4Dynamic, dequantize_nvfp4, IMPLEMENTATIONS, tensors=TENSORS, values_per_element=2, element="e2m1"
)
"""Activations ``[M, K]`` quantized on every call, global scale from the input (no compressed-tensors form)."""

SCHEME = Scheme(
    "nvfp4",
    WEIGHT,
    activations=(None, DYNAMIC),
    default_activation=None,
    options_model=Nvfp4Options,
    backends=backends,
    methods={"linear": Nvfp4Linear, "moe": Nvfp4MoE},
    compressed_tensors_format={None: "nvfp4-pack-quantized"},
    description="nvfp4 weights (e2m1, e4m3 block scales, global scale), weight-only by default; dynamic nvfp4 activations",
)
