"""The FP8 QuantKeys (float8_e4m3fn elements, float32 dequantization scales), named as vLLM names them.

:data:`KEYS` is the one table of names: the plugin registers exactly these, and every other table
of the plugin (groupings, kernel modes) is derived from the keys' group shapes.
"""

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

KEYS: dict[str, tuple[QuantKey, bool, str]] = {
    # name: (key, valid as a weight too, description). Static keys are weights and (calibrated)
    # activations; dynamic ones only activations.
    "fp8_per_tensor_static": (kFp8StaticTensorSym, True, "fp8, one float32 scale per tensor"),
    "fp8_per_tensor_dynamic": (kFp8DynamicTensorSym, False, "fp8, one scale per tensor per call"),
    "fp8_per_token": (kFp8DynamicTokenSym, False, "fp8, one scale per token per call"),
    "fp8_per_channel_static": (kFp8StaticChannelSym, True, "fp8, one scale per output channel"),
    "fp8_per_block_static": (kFp8Static128BlockSym, True, "fp8, one scale per 128x128 weight block"),
    "fp8_per_block_dynamic": (kFp8Dynamic128Sym, False, "fp8, one scale per 1x128 activation group"),
}
