"""The ``PreTrainedModel.save_pretrained`` call on the stack, if any: what lets the quantizer's and
the config's hooks (which transformers calls without the folder or the model) know which save they
serve. transformers passes neither to ``is_serializable`` nor to ``QuantizationConfigMixin.to_dict``."""

from __future__ import annotations

import sys
from typing import Any


def save_pretrained_locals(match) -> dict[str, Any] | None:
    """The local variables of the innermost ``transformers.PreTrainedModel.save_pretrained`` frame
    on the caller's stack whose ``self`` (the model being saved) satisfies ``match(model)``, or
    ``None``. Read only; frames are walked from the caller outwards."""
    from transformers.modeling_utils import PreTrainedModel

    code = PreTrainedModel.save_pretrained.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            local = frame.f_locals
            if match(local.get("self")):
                return dict(local)
        frame = frame.f_back
    return None
