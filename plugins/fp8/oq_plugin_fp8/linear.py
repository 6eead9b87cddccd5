"""FP8 linear methods: one class per weight key, with vLLM's activation pairings.

The base class (:class:`oqcore.OnlineLinearMethodBase`) already does everything with the
quantizers this plugin registers: ``process_weights_after_loading`` leaves ``weight`` (fp8
``[N, K]``) and ``weight_scale`` (float32, layout per :mod:`oq_plugin_fp8.quant`), and the
reference forward dequantizes in float32. Nothing needs overriding: fp8 has no shape limits
(128x128 blocks accept partial edge blocks).
"""

from __future__ import annotations

from oqcore import OnlineLinearMethodBase

from oq_plugin_fp8 import keys as k


class Fp8PerTensorLinearMethod(OnlineLinearMethodBase):
    """W: fp8, one float32 scale ``[1]``. Activations: per-tensor dynamic (default, as vLLM's
    ``Fp8LinearMethod``), per-token dynamic, or none (W8A16)."""

    weight_key = k.kFp8StaticTensorSym
    supported_activation_keys = (None, k.kFp8DynamicTensorSym, k.kFp8DynamicTokenSym)
    default_activation_key = k.kFp8DynamicTensorSym


class Fp8PerChannelLinearMethod(OnlineLinearMethodBase):
    """W: fp8, one float32 scale per output channel ``[N, 1]``. Activations: per-token dynamic
    (default, vLLM's FP8_DYNAMIC pairing), per-tensor dynamic, or none."""

    weight_key = k.kFp8StaticChannelSym
    supported_activation_keys = (None, k.kFp8DynamicTokenSym, k.kFp8DynamicTensorSym)
    default_activation_key = k.kFp8DynamicTokenSym


class Fp8PerBlockLinearMethod(OnlineLinearMethodBase):
    """W: fp8, 128x128 blocks, scales ``[ceil(N/128), ceil(K/128)]``. Activations: 1x128 dynamic
    groups ``[M, ceil(K/128)]`` (default, DeepSeek-V3 / vLLM block fp8), or none."""

    weight_key = k.kFp8Static128BlockSym
    supported_activation_keys = (None, k.kFp8Dynamic128Sym)
    default_activation_key = k.kFp8Dynamic128Sym


LINEAR_METHODS = (Fp8PerTensorLinearMethod, Fp8PerChannelLinearMethod, Fp8PerBlockLinearMethod)
