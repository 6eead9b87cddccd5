"""The NVFP4 QuantKeys: e2m1 elements (two per byte), one float8_e4m3fn scale per 1x16 block and a
float32 per-tensor global scale (``scale2``).

The same name ``nvfp4`` means the static key as a weight and the dynamic key as an activation
(block scales and the global scale computed from each input).
"""

import torch

from oqcore import GroupShape, QuantKey, ScaleDesc

NV_BLOCK = 16
kNvfp4Static = QuantKey(
    torch.float4_e2m1fn_x2,
    ScaleDesc(torch.float8_e4m3fn, True, GroupShape(1, NV_BLOCK)),
    scale2=ScaleDesc(torch.float32, True, GroupShape.PER_TENSOR),
)
kNvfp4Dynamic = QuantKey(
    torch.float4_e2m1fn_x2,
    ScaleDesc(torch.float8_e4m3fn, False, GroupShape(1, NV_BLOCK)),
    scale2=ScaleDesc(torch.float32, False, GroupShape.PER_TENSOR),
)
