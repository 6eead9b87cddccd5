"""MXFP8 online method for fused routed experts."""

from __future__ import annotations

import torch

from oqcore import OnlineMoEMethodBase, UnsupportedLayerError
from oqcore.layers import moe_layout
from oq_plugin_mxfp8.keys import MX_BLOCK, kMxfp8Dynamic, kMxfp8Static
from oq_plugin_mxfp8.quant import Mxfp8Options


class Mxfp8MoEMethod(OnlineMoEMethodBase):
    """Fused experts with MXFP8 weights, quantized per expert: ``w13_weight [E, 2I, H]`` with
    ``w13_weight_scale [E, 2I, H/32]`` and ``w2_weight [E, H, I]`` with ``w2_weight_scale
    [E, H, I/32]`` (float8_e4m3fn / float8_e8m0fnu). The GPT-OSS transposed layout is transposed
    to the canonical one before quantizing (the core base does it), so blocks always run along
    the reduction dim (H for gate-up, I for down).

    Activations: ``mxfp8`` (default, W8A8) or ``None`` (W8A16); ``options.scale_mode`` as for
    :class:`oq_plugin_mxfp8.linear.Mxfp8LinearMethod`.
    """

    weight_key = kMxfp8Static
    supported_activation_keys = (None, kMxfp8Dynamic)
    default_activation_key = kMxfp8Dynamic
    options_model = Mxfp8Options

    @classmethod
    def check_layer(cls, name: str, layer: torch.nn.Module) -> None:
        """The hidden size H (K of gate-up) and the intermediate size I (K of down) must be
        multiples of 32."""
        lay = getattr(layer, "layout", None) or moe_layout(layer)
        if lay is None:
            return
        bad = [f"{what}={v}" for what, v in (("H", lay.hidden_size), ("I", lay.intermediate_size)) if v % MX_BLOCK]
        if bad:
            raise UnsupportedLayerError(
                name,
                f"mxfp8 experts need the hidden size H (K of gate_up_proj) and the intermediate size I "
                f"(K of down_proj) divisible by {MX_BLOCK}; experts {lay} have {', '.join(bad)}",
            )
