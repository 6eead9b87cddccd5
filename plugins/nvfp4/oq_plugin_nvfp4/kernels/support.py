"""Whether the Triton NVFP4 kernels (:mod:`oq_plugin_nvfp4.kernels.gemm`, ``.moe``, weight-only) can
run a layer on a device: an ``is_supported(layer, device) -> (ok, reason)`` callable for the
``triton`` backends. Cheap to import (no Triton).

W4A16 needs sm_80+: e2m1 nibbles and e4m3 block scales decoded in registers, their (exact)
product fed to a bf16/fp16 tensor-core ``tl.dot`` (Ampere on; the native NVFP4 block-scaled dots
of sm_100 are not used). Every GEMM's K must be a positive multiple of 16 (linear
``in_features``; MoE hidden and intermediate sizes); the kernels refuse it with a ``ValueError``
at run time otherwise.
"""

from __future__ import annotations

import torch
from oq_plugin_mxfp4.kernels.support import shape_reason
from oq_toolkit.triton_support import triton_support

TRITON_MIN_CAPABILITY = (8, 0)
"""bf16 / fp16 ``tl.dot`` on the decoded, block-scaled e2m1 tile: Ampere and newer."""

KERNEL_PACKAGE = "oq_plugin_nvfp4.kernels"


def triton_supported(layer: torch.nn.Module, device: torch.device) -> tuple[bool, str]:
    """``(ok, reason)`` for ``nvfp4_gemm`` / ``fused_moe_nvfp4`` on ``device``. Never raises."""
    what = "e2m1 and e4m3 block scales decoded in registers, bf16/fp16 tl.dot, global scale on the accumulator (needs sm_80+)"
    ok, why = triton_support(device, TRITON_MIN_CAPABILITY, kernel_package=KERNEL_PACKAGE)
    if ok:
        # The kernels import oq_plugin_mxfp4.kernels.gemm's decoders: those must be interpreted too.
        ok, why2 = triton_support(device, TRITON_MIN_CAPABILITY, kernel_package="oq_plugin_mxfp4.kernels")
        why = why if ok else why2
    if ok:
        bad = shape_reason(layer, 16)
        if bad:
            return False, f"{bad}; {what}"
    return ok, f"{why}; {what}"


def triton_supported_w4a4(layer: torch.nn.Module, device: torch.device) -> tuple[bool, str]:
    """``(ok, reason)`` for the W4A4 kernels (``nvfp4_gemm`` with ``a_scale`` / ``a_global`` after
    ``quantize_nvfp4_triton``; ``fused_moe_nvfp4(act_fp4=True)``) on ``device``: the same sm_80
    bf16 dots and shape rule as W4A16. Never raises."""
    ok, why = triton_supported(layer, device)
    return ok, why.replace("bf16/fp16 tl.dot", "NVFP4 activations decoded the same way, bf16 tl.dot")
