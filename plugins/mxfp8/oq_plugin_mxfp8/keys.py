"""The MXFP8 QuantKeys: float8_e4m3fn elements, one e8m0 (uint8 biased exponent) scale per 1x32 block.

The same name ``mxfp8`` means the static key as a weight and the dynamic key as an activation.
"""

import torch

from oqcore import GroupShape, QuantKey, ScaleDesc

MX_BLOCK = 32
kMxfp8Static = QuantKey(torch.float8_e4m3fn, ScaleDesc(torch.float8_e8m0fnu, True, GroupShape(1, MX_BLOCK)))
kMxfp8Dynamic = QuantKey(torch.float8_e4m3fn, ScaleDesc(torch.float8_e8m0fnu, False, GroupShape(1, MX_BLOCK)))
