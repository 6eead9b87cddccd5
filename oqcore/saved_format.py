"""What marks a folder as an oqcore export: the facts both the writer (:mod:`oqcore.export`) and the
reader (:mod:`oqcore.loading.saved`) need, in a leaf module so that neither imports the other.

An export's ``config.json`` carries ``quantization_config = {"quant_method": QUANT_METHOD,
"format_version": FORMAT_VERSION, "config": <QuantizationConfig.to_dict()>}``.
"""

from __future__ import annotations

import json
from pathlib import Path

FORMAT_VERSION = 1
"""The layout version :func:`oqcore.save_quantized` writes and :func:`oqcore.load` reads."""

QUANT_METHOD = "oqcore"
"""``quantization_config.quant_method`` of an export (what transformers and others key on)."""


EXPORT_FORMATS = ("compressed-tensors", "oqcore")
"""What :func:`oqcore.save_quantized` can write (``format=``), the default first: compressed-tensors
(what llm-compressor writes and vLLM serves), or ``oqcore`` (the wrappers' own tensors, for what
compressed-tensors cannot hold: GPT-OSS's fused experts, 128-row blocks straddling gate and up, a
scheme without a compressed-tensors form)."""

DEFAULT_FORMAT = EXPORT_FORMATS[0]


PRODUCER = "oqcore"
"""``quantization_config.producer`` of a compressed-tensors folder oqcore wrote (an extra key
compressed-tensors' config model ignores): what lets a later save replace it."""


PRODUCER_CONFIG = "oqcore_config"
"""``quantization_config`` key of a compressed-tensors folder oqcore wrote holding the oqcore config
the model was quantized with (:meth:`oqcore.QuantizationConfig.to_dict`): scheme options and
backend pins that compressed-tensors' args do not carry. Read back only when it plans exactly the
layers and keys the config groups declare (the groups are what other tools read)."""


def is_export(folder: str | Path) -> bool:
    """Whether ``folder`` holds a ``config.json`` written by :func:`oqcore.save_quantized`, in either
    format (``quant_method == "oqcore"``, or compressed-tensors with ``producer == "oqcore"``).
    Never raises: an unreadable or malformed file is simply not an export."""
    try:
        raw = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    return declares_export(raw) or (isinstance(qc, dict) and qc.get("producer") == PRODUCER)


def declares_export(raw: object) -> bool:
    """Whether a parsed ``config.json`` (``raw``) declares an oqcore export."""
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD
