"""What the compressed-tensors export tests read back from a folder: its tensors and its
``quantization_config`` (shared by ``test_export_ct.py`` and ``test_export_matrix.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file of ``folder``, by its stored name, as stored."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
                out[k] = h.get_tensor(k)
    return out


def ct_config(folder: Path):
    """``(compressed-tensors QuantizationConfig, raw dict)`` of ``folder/config.json``; asserts it
    declares ``quant_method: compressed-tensors`` with ``quantization_status: compressed``."""
    from compressed_tensors.quantization import QuantizationConfig

    raw = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]
    assert raw["quant_method"] == "compressed-tensors" and raw["quantization_status"] == "compressed"
    return QuantizationConfig.model_validate(raw), raw
