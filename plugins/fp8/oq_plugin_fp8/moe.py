"""FP8 fused-MoE methods: one class per weight key, same activation pairings as the linears.

:class:`oqcore.OnlineMoEMethodBase` quantizes ``w13 [E, 2I, H]`` and ``w2 [E, H, I]`` (GPT-OSS's
transposed storage transposed first) through this plugin's quantizers, which keep one scale set
per expert: ``w13_weight_scale`` is ``[E, 1]`` (per tensor), ``[E, 2I, 1]`` (per channel) or
``[E, ceil(2I/128), ceil(H/128)]`` (blocks), likewise for ``w2``. Its reference forward loops over
the experts; the ``triton`` backend replaces it with the fused grouped GEMM.
"""

from __future__ import annotations

from oqcore import OnlineMoEMethodBase

from oq_plugin_fp8 import keys as k


class Fp8PerTensorMoEMethod(OnlineMoEMethodBase):
    """Experts fp8 with one scale per expert and projection. Activations: per-tensor dynamic
    (default; in the reference, the scale is over the tokens each expert receives), per-token, none."""

    weight_key = k.kFp8StaticTensorSym
    supported_activation_keys = (None, k.kFp8DynamicTensorSym, k.kFp8DynamicTokenSym)
    default_activation_key = k.kFp8DynamicTensorSym


class Fp8PerChannelMoEMethod(OnlineMoEMethodBase):
    """Experts fp8 with one scale per output channel of each expert. Activations: per-token
    (default), per-tensor dynamic, none."""

    weight_key = k.kFp8StaticChannelSym
    supported_activation_keys = (None, k.kFp8DynamicTokenSym, k.kFp8DynamicTensorSym)
    default_activation_key = k.kFp8DynamicTokenSym


class Fp8PerBlockMoEMethod(OnlineMoEMethodBase):
    """Experts fp8 in 128x128 blocks per expert. Activations: 1x128 groups (default) or none."""

    weight_key = k.kFp8Static128BlockSym
    supported_activation_keys = (None, k.kFp8Dynamic128Sym)
    default_activation_key = k.kFp8Dynamic128Sym


MOE_METHODS = (Fp8PerTensorMoEMethod, Fp8PerChannelMoEMethod, Fp8PerBlockMoEMethod)
