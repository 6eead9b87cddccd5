"""Tensor-level API: quantize one tensor with the plugin that owns its key.

The core holds no quantization math: :func:`quantize_tensor` looks the key up in the quantizers
the plugins registered (``oq_register_quantizers``) and calls the one for the requested backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel

from oqcore.errors import ConfigError, NonFiniteError, UnsupportedLayerError
from oqcore.keys import QuantKey, Role
from oqcore.plugins import Quantizer, Registry, get_registry

REFERENCE_BACKEND = "torch"


@dataclass
class QuantizedTensor:
    """A quantized tensor: ``qdata`` (the key's element dtype, same shape as the source), ``scale``
    (dequantization multipliers laid out per the key's group shape: float32, or e8m0 exponents
    stored as ``torch.float8_e8m0fnu`` for MX formats) and the ``key``. ``options`` are the quantizer options it was made with."""

    qdata: torch.Tensor
    scale: torch.Tensor
    key: QuantKey
    options: BaseModel | None = None

    @property
    def shape(self) -> torch.Size:
        """Shape of the dequantized tensor."""
        return self.qdata.shape

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """``qdata * scale`` broadcast over groups, in ``dtype``, by the owning plugin's dequantizer."""
        return find_quantizer(self.key).dequantize(self.qdata, self.scale, dtype, self.options)


def find_quantizer(key: QuantKey, backend: str | None = None, reg: Registry | None = None) -> Quantizer:
    """The registered quantizer for ``key`` on ``backend`` (default: the ``torch`` reference).

    Raises :class:`oqcore.ConfigError` naming the key and the backends that do exist.
    """
    reg = reg or get_registry()
    backend = backend or REFERENCE_BACKEND
    q = reg.quantizers.get((key, backend))
    if q is None:
        have = sorted(b for (k, b) in reg.quantizers if k == key)
        raise ConfigError(
            f"no quantizer for {reg.key_name(key)!r} on backend {backend!r}; backends with one: {', '.join(have) or '(none)'}",
            "backend",
        )
    return q


def options_model_for(key: QuantKey, reg: Registry | None = None) -> type[BaseModel] | None:
    """The options model of a method whose weight key is ``key`` (any kind), or ``None``."""
    reg = reg or get_registry()
    for (_, k), entry in reg.methods.items():
        if k == key:
            return entry.cls.options_model
    return None


def require_finite(w: torch.Tensor) -> None:
    """Raise :class:`oqcore.NonFiniteError` if ``w`` holds NaN or Inf (one min/max pass).

    For quantizers registered with ``checks_finite=True``, on the paths where their own kernel does
    not run (no compiler, an unsupported dtype): they must raise whichever way they quantize.
    """
    if w.numel() == 0:
        return
    lo, hi = torch.aminmax(w.detach())
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise NonFiniteError(f"tensor of shape {list(w.shape)} holds NaN/Inf")


def check_finite(w: torch.Tensor, name: str) -> None:
    """Raise :class:`oqcore.UnsupportedLayerError` naming ``name`` if ``w`` holds NaN or Inf.

    For an ``[E, N, K]`` stack the error names the first expert holding one (``name[expert e]``),
    with that expert's count, and lists the other experts affected.
    """
    # One min/max reduction (NaN propagates through it) is ~5x cheaper than isfinite(w).all() on bf16;
    # the full count is only computed for the error message.
    if w.numel() == 0:
        return
    lo, hi = torch.aminmax(w.detach())
    if bool(torch.isfinite(lo) & torch.isfinite(hi)):
        return
    bad = ~torch.isfinite(w.detach())
    if w.dim() == 3:
        per_expert = bad.flatten(1).sum(1)
        experts = [int(e) for e in per_expert.nonzero().flatten()]
        others = f" (experts {', '.join(map(str, experts[1:]))} too)" if len(experts) > 1 else ""
        e = experts[0]
        raise UnsupportedLayerError(
            f"{name}[expert {e}]",
            f"weight holds {int(per_expert[e])} NaN/Inf value(s) of {w[e].numel()}{others}; refusing to quantize",
        )
    raise UnsupportedLayerError(name, f"weight holds {int(bad.sum())} NaN/Inf value(s) of {w.numel()}; refusing to quantize")


def quantize_tensor(
    w: torch.Tensor,
    key: QuantKey | str,
    backend: str | None = None,
    options: Mapping[str, Any] | BaseModel | None = None,
    *,
    role: Role = "weight",
    name: str = "<tensor>",
) -> QuantizedTensor:
    """Quantize ``w`` (``[N, K]``, ``[E, N, K]`` or, for activations, ``[M, K]``) to ``key``.

    ``key`` is a :class:`QuantKey` or a name resolved in ``role``; ``backend`` a quantizer backend
    (default the ``torch`` reference; every backend produces the same bytes); ``options`` a dict
    validated by the options model of the method that owns the key (e.g. ``{"scale_mode":
    "floor"}``). ``name`` labels errors. Raises :class:`oqcore.UnsupportedLayerError` for NaN/Inf
    in ``w`` (found by the quantizer's own pass when it was registered with ``checks_finite``, else
    by a min/max pass first), :class:`oqcore.ConfigError` for bad options or a missing backend.
    """
    reg = get_registry()
    k = reg.resolve_key(key, role)
    q = find_quantizer(k, backend, reg)
    model = options_model_for(k, reg)
    if isinstance(options, BaseModel) or model is None:
        opts = options
    else:
        from oqcore.config import _convert
        from pydantic import ValidationError

        try:
            opts = model.model_validate(dict(options or {}))
        except ValidationError as e:
            raise _convert(e, "options") from None
    if w.dim() not in (2, 3):
        raise UnsupportedLayerError(name, f"expected a 2D or 3D tensor, got shape {tuple(w.shape)}")
    if not q.checks_finite:
        check_finite(w, name)
        qdata, scale = q.quantize(w, opts)
        return QuantizedTensor(qdata, scale, k, opts)
    try:
        qdata, scale = q.quantize(w, opts)
    except NonFiniteError:
        check_finite(w, name)  # names the layer (and expert) with the count
        raise
    return QuantizedTensor(qdata, scale, k, opts)


COMPILED_BACKEND = "compiled"
NATIVE_CPU_BACKEND = "cpu"
# Compiling costs 5-8 s for the first shape in a process (1-3 s per later shape) and tens of MB of
# compiler state, while eager quantizes ~0.1 GB/s and compiled ~2-4 GB/s on this project's machines:
# it pays off from tensors (or expert stacks) of ~128 MB of bf16, i.e. multi-GB models. Below, eager.
COMPILE_MIN_NUMEL = 1 << 26


def quantizer_backend_for(key: QuantKey, device: torch.device | str, numel: int = 0, reg: Registry | None = None) -> str:
    """The quantizer backend for ``key`` on ``device`` for a tensor of ``numel`` elements.

    CUDA: ``triton`` when a plugin registered one. CPU: a plugin's native ``cpu`` quantizer when
    registered (no compile cost); else ``compiled`` (torch.compile) for tensors or whole expert
    stacks of at least :data:`COMPILE_MIN_NUMEL` elements, unless ``OQ_COMPILE=0``. Otherwise the
    ``torch`` reference. All of them produce the same bytes (each plugin's tests check it).
    """
    from oqcore.compiled import compile_enabled

    reg = reg or get_registry()
    dev = torch.device(device)
    if dev.type == "cuda" and (key, "triton") in reg.quantizers:
        return "triton"
    if dev.type == "cpu":
        if (key, NATIVE_CPU_BACKEND) in reg.quantizers:
            return NATIVE_CPU_BACKEND
        if numel >= COMPILE_MIN_NUMEL and compile_enabled() and (key, COMPILED_BACKEND) in reg.quantizers:
            return COMPILED_BACKEND
    return REFERENCE_BACKEND
