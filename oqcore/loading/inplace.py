"""``quantize_``: the same plan applied to a model that is already in memory."""

from __future__ import annotations

import time

import torch
from torch import nn

from oqcore.config import QuantizationConfig
from oqcore.loading.install import make_wrapper, set_submodule
from oqcore.loading.memory import PeakRSS
from oqcore.loading.state import LoadStats, OqState, tensor_bytes
from oqcore.planning import plan
from oqcore.tensor import check_finite


def quantize_(
    model: nn.Module, config: QuantizationConfig | dict | str, *, device: str | torch.device | None = None
) -> nn.Module:
    """Quantize the planned layers of a materialized ``model`` in place and return it.

    ``device`` decides the backends (default: where the model's parameters are). Every planned
    layer's weights are checked for NaN/Inf first, then each layer is quantized into its wrapper;
    the wrappers replace the original modules only once all of them succeeded, so a failure leaves
    the model exactly as it was (at the cost of holding the quantized copies beside the originals
    until the swap).

    Raises :class:`oqcore.UnsupportedLayerError` (naming the layer) for NaN/Inf weights or shapes a
    method cannot take, :class:`oqcore.ConfigError`, :class:`oqcore.NoBackendError`.
    """
    t0 = time.perf_counter()
    cfg = QuantizationConfig.from_any(config)
    qplan = plan(model, cfg, device=device)
    stats = LoadStats()
    with PeakRSS() as mem:
        for lp in qplan.quantized:
            for pname, p in model.get_submodule(lp.name).named_parameters(recurse=False):
                check_finite(p.detach(), f"{lp.name}.{pname}")
        wrappers: dict[str, nn.Module] = {}
        hp_dtype = torch.bfloat16
        for lp in qplan.quantized:
            module = model.get_submodule(lp.name)
            hp_dtype = next(module.parameters()).dtype
            w = make_wrapper(lp, module)
            for pname, p in module.named_parameters(recurse=False):
                w._parameters[pname] = nn.Parameter(p.detach(), requires_grad=False)
            stats.hp_bytes += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
            stats.largest_layer_bytes = max(
                stats.largest_layer_bytes, sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
            )
            t = time.perf_counter()
            w.method.process_weights_after_loading(w)
            stats.seconds_quantize += time.perf_counter() - t
            wrappers[lp.name] = w
        for name, w in wrappers.items():
            set_submodule(model, name, w)
    stats.baseline_rss, stats.peak_rss = mem.baseline, mem.peak
    stats.quantized_bytes = sum(tensor_bytes(w) for w in wrappers.values())
    stats.model_bytes = tensor_bytes(model)
    stats.seconds_total = time.perf_counter() - t0
    model.oq_state = OqState(cfg, qplan, wrappers, qplan.device, hp_dtype, stats=stats)
    return model
