"""The MXFP4 QuantKeys: e2m1 elements (two per byte), one e8m0 (uint8 biased exponent) scale per 1x32 block.

The same name ``mxfp4`` means the static key as a weight and the dynamic key as an activation.
"""

import torch

from oqcore import GroupShape, QuantKey, ScaleDesc

MX_BLOCK = 32
kMxfp4Static = QuantKey(torch.float4_e2m1fn_x2, ScaleDesc(torch.float8_e8m0fnu, True, GroupShape(1, MX_BLOCK)))
kMxfp4Dynamic = QuantKey(torch.float4_e2m1fn_x2, ScaleDesc(torch.float8_e8m0fnu, False, GroupShape(1, MX_BLOCK)))
