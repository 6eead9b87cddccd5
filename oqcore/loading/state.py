"""What oqcore remembers about a model it quantized: config, plan, wrappers, name mapping, figures.

Attached to the model as ``model.oq_state`` (a plain attribute, not a submodule), read by
:func:`oqcore.report`, :func:`oqcore.reload_weights` and :func:`oqcore.save_quantized`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from oqcore.config import QuantizationConfig
from oqcore.planning import QuantPlan


@dataclass
class LoadStats:
    """Figures of one load or in-place quantization. Times in seconds, sizes in bytes.

    ``seconds_build`` is the meta-device build and planning (mostly importing the model's code the
    first time), ``seconds_read`` reading the checkpoint, ``seconds_quantize`` the quantizers.

    ``hp_bytes`` is what the quantized layers' weights took in the high-precision dtype,
    ``quantized_bytes`` what they take now (data + scales); ``model_bytes`` the whole model after.
    ``peak_rss``/``baseline_rss`` bracket the load; ``largest_layer_bytes`` is the biggest single
    quantized layer in the high-precision dtype; ``reused_bytes`` how much of the quantized layers'
    high-precision weights was read into staging buffers reused from an earlier layer.
    """

    seconds_total: float = 0.0
    seconds_build: float = 0.0
    seconds_read: float = 0.0
    seconds_quantize: float = 0.0
    bytes_read: int = 0
    hp_bytes: int = 0
    quantized_bytes: int = 0
    model_bytes: int = 0
    largest_layer_bytes: int = 0
    reused_bytes: int = 0
    baseline_rss: int = 0
    peak_rss: int = 0
    unexpected_keys: list[str] = field(default_factory=list)

    @property
    def peak_added(self) -> int:
        """Peak RSS above the baseline, in bytes."""
        return max(self.peak_rss - self.baseline_rss, 0)


@dataclass
class OqState:
    """The record of a quantized model.

    ``groups`` maps each target parameter to its :class:`oqcore.loading.names.TargetGroup` (the
    checkpoint keys that produce it and transformers' conversion rule) and ``source_shapes`` each
    checkpoint key to its shape, so :func:`oqcore.reload_weights` can map and check new weights
    before touching anything. Both are empty for :func:`oqcore.quantize_` (model naming only).
    """

    config: QuantizationConfig
    plan: QuantPlan
    wrappers: dict[str, nn.Module]
    device: torch.device
    dtype: torch.dtype
    source: Path | None = None
    groups: dict[str, object] = field(default_factory=dict)
    source_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    stats: LoadStats = field(default_factory=LoadStats)
    shards: dict[str, object] = field(default_factory=dict)
    """``{module name: LayerShard}`` of a tensor- / expert-parallel load (:mod:`oqcore.parallel`);
    empty for a model held whole."""
    source_cuts: dict[str, object] = field(default_factory=dict)
    """Checkpoint key -> the :class:`oqcore.loading.slices.SlicedEntry` this rank read of it
    (``source_shapes`` holds the piece's shape): a reload cuts a full tensor the same way."""
    foreign_sources: frozenset[str] = frozenset()
    """Checkpoint keys of experts other ranks own (expert parallel): a reload skips them."""


def get_state(model: nn.Module) -> OqState:
    """The :class:`OqState` of a model oqcore loaded or quantized.

    Raises :class:`oqcore.ConfigError` (field ``model``) if the model was not produced by oqcore.
    """
    from oqcore.errors import ConfigError

    state = getattr(model, "oq_state", None)
    if not isinstance(state, OqState):
        raise ConfigError(
            f"{type(model).__name__} was not loaded or quantized by oqcore (no oq_state); use oqcore.load or oqcore.quantize_",
            "model",
        )
    return state


def tensor_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (recursively), without double-counting shared storage."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_meta:
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
