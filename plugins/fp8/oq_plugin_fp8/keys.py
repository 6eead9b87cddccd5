"""The FP8 QuantKeys (float8_e4m3fn elements, float32 dequantization scales), named as vLLM names them."""

import torch

from oqcore import GroupShape, QuantKey, ScaleDesc

FP8 = torch.float8_e4m3fn
F32 = torch.float32

kFp8StaticTensorSym = QuantKey(FP8, ScaleDesc(F32, True, GroupShape.PER_TENSOR))
kFp8DynamicTensorSym = QuantKey(FP8, ScaleDesc(F32, False, GroupShape.PER_TENSOR))
kFp8DynamicTokenSym = QuantKey(FP8, ScaleDesc(F32, False, GroupShape.PER_TOKEN))
kFp8StaticChannelSym = QuantKey(FP8, ScaleDesc(F32, True, GroupShape.PER_CHANNEL))
kFp8Static128BlockSym = QuantKey(FP8, ScaleDesc(F32, True, GroupShape(128, 128)))
kFp8Dynamic128Sym = QuantKey(FP8, ScaleDesc(F32, False, GroupShape(1, 128)))
