"""Whether the Triton MXFP4 kernels (:mod:`oq_plugin_mxfp4.kernels.gemm`, ``.moe``) can run a layer on
a device: ``is_supported(layer, device) -> (ok, reason)`` callables for the ``triton`` backends.
Cheap to import (no Triton).

=======  ============  ==============================================================================
mode     needs         why
=======  ============  ==============================================================================
W4A16    sm_80+        e2m1 nibbles decoded in registers, bf16/fp16 tensor-core ``tl.dot`` (Ampere on)
W4A8     sm_89+        float8_e4m3fn x float8_e4m3fn ``tl.dot`` (Ada / Hopper on; the MXFP8 activation
                       quantizer of oq-plugin-mxfp8 runs first), per-32 scales applied in the K loop
W4A4     sm_80+        both operands' e2m1 decoded to bf16 (exact) for the ``tl.dot``; the Triton
                       MXFP4 quantizer (:mod:`oq_plugin_mxfp4.kernels.quant`) runs first
=======  ============  ==============================================================================

Both also need every GEMM's K to be a multiple of 32 (linear ``in_features``; MoE hidden and
intermediate sizes), which the kernels would otherwise refuse with a ``ValueError`` at run time.
"""

from __future__ import annotations

import torch
from oq_toolkit.triton_support import triton_support

TRITON_MIN_CAPABILITY_W4A16 = (8, 0)
"""bf16 / fp16 ``tl.dot`` on the decoded e2m1 tile (the values are exact in both): Ampere and newer."""

TRITON_MIN_CAPABILITY_W4A8 = (8, 9)
"""float8_e4m3fn ``tl.dot`` (e2m1 re-encoded as e4m3 in registers, exact): Ada / Hopper and newer."""

TRITON_MIN_CAPABILITY_W4A4 = (8, 0)
"""bf16 ``tl.dot`` on both operands' decoded e2m1 codes (products exact): Ampere and newer."""

KERNEL_PACKAGES = ("oq_plugin_mxfp4.kernels", "oq_plugin_mxfp8.kernels")
"""The kernels' modules: this package's, and oq-plugin-mxfp8's (its e8m0 decoder and, for W4A8, its
MXFP8 activation quantizer), both checked for kernels built without the interpreter."""


def gemm_sizes(layer: torch.nn.Module) -> dict[str, int]:
    """The K of each GEMM the kernels run for ``layer``: ``in_features`` of a linear; the hidden
    and intermediate sizes of a fused-MoE layer (``layer.layout``). Empty if neither is known."""
    layout = getattr(layer, "layout", None)
    if layout is not None:
        return {"hidden_size": layout.hidden_size, "intermediate_size": layout.intermediate_size}
    k = getattr(layer, "in_features", None)
    return {} if k is None else {"in_features": k}


def shape_reason(layer: torch.nn.Module, block: int) -> str | None:
    """Why the kernels cannot take ``layer``'s shapes (a K that is not a positive multiple of
    ``block``), or None."""
    for name, k in gemm_sizes(layer).items():
        if k <= 0 or k % block:
            return f"{name} = {k} is not a positive multiple of {block} (one scale per {block} elements along K)"
    return None


def _supported(layer, device, capability, packages, what) -> tuple[bool, str]:
    why_shape = shape_reason(layer, 32)
    reasons = []
    for package in packages:
        ok, why = triton_support(device, capability, kernel_package=package)
        if not ok:
            return False, f"{why}; {what}"
        reasons.append(why)
    if why_shape:
        return False, f"{why_shape}; {what}"
    return True, f"{reasons[0]}; {what}"


def triton_supported_w4a16(layer: torch.nn.Module, device: torch.device) -> tuple[bool, str]:
    """``(ok, reason)`` for the W4A16 Triton kernels (``mxfp4_gemm`` / ``fused_moe_mxfp4`` with
    ``a_s=None`` / ``act_mx=False``) on ``device``. Never raises."""
    return _supported(
        layer,
        device,
        TRITON_MIN_CAPABILITY_W4A16,
        KERNEL_PACKAGES,
        "e2m1 decoded in registers, bf16/fp16 tl.dot with per-32 e8m0 scales in the K loop (needs sm_80+)",
    )


def triton_supported_w4a8(layer: torch.nn.Module, device: torch.device) -> tuple[bool, str]:
    """``(ok, reason)`` for the W4A8 Triton kernels (MXFP8 activations quantized by
    ``quantize_mxfp8_triton``, fp8 ``tl.dot``) on ``device``. Never raises."""
    return _supported(
        layer,
        device,
        TRITON_MIN_CAPABILITY_W4A8,
        KERNEL_PACKAGES,
        "MXFP8 activations, e2m1 re-encoded as e4m3 in registers, float8_e4m3fn tl.dot (needs sm_89+)",
    )


def triton_supported_w4a4(layer: torch.nn.Module, device: torch.device) -> tuple[bool, str]:
    """``(ok, reason)`` for the W4A4 Triton kernels (MXFP4 activations quantized by
    ``quantize_mxfp4_triton``, ``mxfp4_gemm`` with packed ``a`` / ``fused_moe_mxfp4(act_mx="mxfp4")``)
    on ``device``. Never raises."""
    return _supported(
        layer,
        device,
        TRITON_MIN_CAPABILITY_W4A4,
        KERNEL_PACKAGES,
        "MXFP4 activations, both operands' e2m1 decoded in registers, bf16 tl.dot (needs sm_80+)",
    )
