"""The INT8 QuantKeys: int8 elements with float32 scales (vLLM's symmetric +-127 convention)."""

import torch

from oqcore import GroupShape, QuantKey, ScaleDesc

kInt8StaticChannelSym = QuantKey(torch.int8, ScaleDesc(torch.float32, True, GroupShape.PER_CHANNEL))
kInt8DynamicTokenSym = QuantKey(torch.int8, ScaleDesc(torch.float32, False, GroupShape.PER_TOKEN))
