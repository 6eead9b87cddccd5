"""INT8 online method for fused routed experts."""

from __future__ import annotations

from oqcore import OnlineMoEMethodBase
from oq_plugin_int8.keys import kInt8DynamicTokenSym, kInt8StaticChannelSym


class Int8MoEMethod(OnlineMoEMethodBase):
    """Fused experts with int8 per-channel weights, quantized per expert: ``w13_weight [E, 2I, H]``
    int8 + ``w13_weight_scale [E, 2I, 1]`` float32, ``w2_weight [E, H, I]`` + ``w2_weight_scale
    [E, H, 1]`` (GPT-OSS's transposed storage is transposed to this layout before quantizing).

    Weight-only by default (``int8_per_channel_weight_only``, as vLLM's online int8 MoE); W8A8 with
    ``int8_per_token`` activations is also supported.
    """

    weight_key = kInt8StaticChannelSym
    supported_activation_keys = (None, kInt8DynamicTokenSym)
    default_activation_key = None
