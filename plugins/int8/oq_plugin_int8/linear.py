"""INT8 online method for dense linears."""

from __future__ import annotations

from oqcore import OnlineLinearMethodBase
from oq_plugin_int8.keys import kInt8DynamicTokenSym, kInt8StaticChannelSym


class Int8LinearMethod(OnlineLinearMethodBase):
    """``nn.Linear`` with int8 per-channel weights (``weight [N, K]`` int8, ``weight_scale [N, 1]``
    float32, vLLM's symmetric +-127 rule; see :mod:`oq_plugin_int8.quant`).

    Activations: ``None`` (weight-only, W8A16; the default, as vLLM's online int8) or
    ``int8_per_token`` (W8A8, dynamic per-token scales). The core base implements the lifecycle
    and the float32 reference forward with the quantizers this plugin registers; the backends
    (:mod:`oq_plugin_int8.backends`) provide the fast forwards.
    """

    weight_key = kInt8StaticChannelSym
    supported_activation_keys = (None, kInt8DynamicTokenSym)
    default_activation_key = None
