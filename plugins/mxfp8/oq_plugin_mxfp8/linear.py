"""MXFP8 online method for dense linears."""

from __future__ import annotations

import torch

from oqcore import OnlineLinearMethodBase, UnsupportedLayerError
from oq_plugin_mxfp8.keys import MX_BLOCK, kMxfp8Dynamic, kMxfp8Static
from oq_plugin_mxfp8.quant import Mxfp8Options


class Mxfp8LinearMethod(OnlineLinearMethodBase):
    """``nn.Linear`` with MXFP8 weights: ``weight [N, K]`` float8_e4m3fn and ``weight_scale
    [N, K/32]`` float8_e8m0fnu (one shared exponent per 32 consecutive input features, OCP MX v1.0;
    numbers in :mod:`oq_plugin_mxfp8.quant`).

    Activations: ``mxfp8`` (dynamic 1x32 blocks quantized on every call, W8A8; the default, as
    vLLM's online mxfp8) or ``None`` (weight-only, W8A16). ``options.scale_mode`` (``rceil`` /
    ``floor``) applies to weights and activations. The lifecycle and the float32 reference forward
    are the core base's, driven by the quantizers this plugin registers; the backends
    (:mod:`oq_plugin_mxfp8.backends`) provide the Triton forward.
    """

    weight_key = kMxfp8Static
    supported_activation_keys = (None, kMxfp8Dynamic)
    default_activation_key = kMxfp8Dynamic
    options_model = Mxfp8Options

    @classmethod
    def check_layer(cls, name: str, layer: torch.nn.Module) -> None:
        """K (``in_features``) must be a multiple of 32, the MX block size."""
        k = layer.in_features
        if k % MX_BLOCK:
            raise UnsupportedLayerError(
                name,
                f"mxfp8 needs in_features K divisible by {MX_BLOCK}; weight [N, K] = "
                f"[{layer.out_features}, {k}] has K={k}. Leave the layer unquantized (ignore) or use another scheme",
            )
