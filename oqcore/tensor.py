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

from oqcore.errors import ConfigError, NonFiniteError, OqError, PluginError, UnsupportedLayerError, from_validation_error
from oqcore.keys import QuantKey, Role
from oqcore.plugins import Quantizer, Registry, get_registry

REFERENCE_BACKEND = "torch"

HP_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
"""The high-precision dtypes a quantizer takes (and :func:`oqcore.reload_weights` accepts)."""


def dtype_names(dtypes: tuple[torch.dtype, ...] = HP_DTYPES) -> str:
    """``"float32, bfloat16, float16 or float64"``: dtypes for an error message."""
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


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
    A meta tensor has no values: it passes (so a meta-device dry run of a quantizer gives the
    output shapes and dtypes).
    """
    if w.is_meta or w.numel() == 0:
        return
    lo, hi = torch.aminmax(w.detach())
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise NonFiniteError(f"tensor of shape {list(w.shape)} holds NaN/Inf")


def check_finite(w: torch.Tensor, name: str) -> None:
    """Raise :class:`oqcore.UnsupportedLayerError` naming ``name`` if ``w`` holds NaN or Inf.

    For an ``[E, N, K]`` stack the error names the first expert holding one (``name[expert e]``),
    with that expert's count, and lists the other experts affected. A meta tensor has no values:
    it passes (so a meta-device dry run of a quantizer gives the output shapes and dtypes).
    """
    # One min/max reduction (NaN propagates through it) is ~5x cheaper than isfinite(w).all() on bf16;
    # the full count is only computed for the error message.
    if w.is_meta or w.numel() == 0:
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

    ``w``: float32, bfloat16, float16 or float64, at least one element. ``key`` is a
    :class:`QuantKey` or a name resolved in ``role`` (``"weight"`` or ``"activation"``).
    ``backend`` names a quantizer implementation; the default is the fastest one that gives the
    reference bytes on ``w``'s device, the same choice a load makes
    (:func:`quantizer_backend_for` ``(key, w.device, w.numel())``: the native ``cpu`` quantizer on
    the CPU, ``triton`` on CUDA); ``backend="torch"`` asks for the reference itself. Every backend
    produces the same bytes. ``options`` is a dict validated by the options model of the method
    that owns the key (e.g. ``{"scale_mode": "floor"}``). ``name`` labels errors.

    A meta tensor gives a dry run: meta ``qdata``/``scale`` of the right shapes and dtypes, from
    the ``torch`` reference (no values are checked).

    Raises

    - :class:`oqcore.UnsupportedLayerError` naming ``name``: ``w`` is not a tensor, not 2-D/3-D,
      empty, of another dtype, holds NaN/Inf (found by the quantizer's own pass when it was
      registered with ``checks_finite``, else by a min/max pass first), or the plugin's quantizer
      refused it with a ``ValueError`` (e.g. mxfp8 with K not a multiple of 32: the message
      carries the plugin's rule);
    - :class:`oqcore.ConfigError` (field ``key``, ``backend``, ``options`` or ``role``): an
      unknown key (:class:`oqcore.UnknownKeyError`, with a did-you-mean), a backend no plugin
      registered for the key (the message lists those that exist), bad options;
    - :class:`oqcore.PluginError` naming the plugin, the key, the backend and ``name``: any other
      exception inside the plugin's quantizer, or a result that breaks the contract (chained).
    """
    if not isinstance(name, str):
        name = str(name)
    if role not in ("weight", "activation"):
        raise ConfigError(f"must be 'weight' or 'activation', got {role!r}", "role")
    if not isinstance(key, (str, QuantKey)):
        raise ConfigError(f"expected a quantization key name or a QuantKey, got {type(key).__name__}", "key")
    if backend is not None and not isinstance(backend, str):
        raise ConfigError(f"expected a backend name (str), got {type(backend).__name__}", "backend")
    reg = get_registry()
    k = reg.resolve_key(key, role, "key")
    check_quantizable(w, name)
    if backend is None:
        backend = quantizer_backend_for(k, w.device, w.numel(), reg)
    elif w.is_meta and backend != REFERENCE_BACKEND:
        raise ConfigError(
            f"{backend!r} cannot run on a meta tensor ({name!r}); a meta dry run uses the {REFERENCE_BACKEND!r} "
            "reference (leave backend unset)",
            "backend",
        )
    q = find_quantizer(k, backend, reg)
    opts = _validate_options(k, options, reg)
    if not q.checks_finite:
        check_finite(w, name)
        return _run_quantizer(q, w, opts, name, reg)
    try:
        return _run_quantizer(q, w, opts, name, reg)
    except NonFiniteError:
        check_finite(w, name)  # names the layer (and expert) with the count
        raise


def check_quantizable(w: Any, name: str) -> None:
    """Raise :class:`oqcore.UnsupportedLayerError` naming ``name`` unless ``w`` is a 2-D or 3-D
    tensor with at least one element in a high-precision dtype (:data:`HP_DTYPES`)."""
    if not isinstance(w, torch.Tensor):
        raise UnsupportedLayerError(name, f"expected a torch.Tensor, got {type(w).__name__}")
    if w.layout != torch.strided:
        # sparse/compressed layouts reach no quantizer (torch ops fail deep inside): say so here
        raise UnsupportedLayerError(name, f"layout {w.layout} cannot be quantized; give a dense tensor (w.to_dense())")
    if w.dim() not in (2, 3):
        raise UnsupportedLayerError(name, f"expected a 2D [N, K] or 3D [E, N, K] tensor, got shape {list(w.shape)}")
    if w.numel() == 0:
        raise UnsupportedLayerError(name, f"the tensor is empty (shape {list(w.shape)}): nothing to quantize")
    if w.dtype not in HP_DTYPES:
        raise UnsupportedLayerError(name, f"dtype {w.dtype} cannot be quantized; expected {dtype_names()}")


def _validate_options(k: QuantKey, options: Any, reg: Registry) -> BaseModel | None:
    model = options_model_for(k, reg)
    if isinstance(options, BaseModel):
        if model is not None and not isinstance(options, model):
            raise ConfigError(f"expected {model.__name__} (or a dict), got {type(options).__name__}", "options")
        return options
    if options is not None and not isinstance(options, Mapping):
        raise ConfigError(f"expected a mapping of option names to values, got {type(options).__name__}", "options")
    if model is None:
        return None
    from pydantic import ValidationError

    try:
        return model.model_validate(dict(options or {}))
    except ValidationError as e:
        raise from_validation_error(e, "options") from None


def _run_quantizer(q: Quantizer, w: torch.Tensor, opts: BaseModel | None, name: str, reg: Registry) -> QuantizedTensor:
    """Call a plugin's quantizer and hold it to its contract.

    The contract (``oq_register_quantizers``): a ``ValueError`` means "input this quantizer cannot
    take" and becomes an :class:`oqcore.UnsupportedLayerError` naming the tensor and the plugin; an
    :class:`oqcore.OqError` passes through; anything else is a :class:`oqcore.PluginError`.
    """
    key_name = reg.key_name(q.key)
    where = f"quantizer {key_name!r} (backend {q.backend!r}) of plugin {q.plugin!r}"
    try:
        with torch.no_grad():  # not differentiable: a Parameter given in gets plain tensors out
            out = q.quantize(w, opts)
    except OqError:
        raise
    except ValueError as e:
        raise UnsupportedLayerError(name, f"the {where} cannot take shape {list(w.shape)} {w.dtype}: {e}") from e
    except Exception as e:
        raise PluginError(
            f"plugin {q.plugin!r}: {where} failed on tensor {name!r} (shape {list(w.shape)}, {w.dtype}): "
            f"{type(e).__name__}: {e}"
        ) from e
    if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        raise PluginError(
            f"plugin {q.plugin!r}: {where} returned {type(out).__name__} for tensor {name!r}; expected a (qdata, scale) tuple of tensors"
        )
    qdata, scale = out
    if qdata.shape != w.shape:
        raise PluginError(
            f"plugin {q.plugin!r}: {where} returned qdata of shape {list(qdata.shape)} for tensor {name!r} of shape "
            f"{list(w.shape)}; qdata must keep the input's shape"
        )
    return QuantizedTensor(qdata, scale, q.key, opts)


COMPILED_BACKEND = "compiled"
NATIVE_CPU_BACKEND = "cpu"
# Compiling costs 5-8 s for the first shape in a process (1-3 s per later shape) and tens of MB of
# compiler state, while eager quantizes ~0.1 GB/s and compiled ~2-4 GB/s on this project's machines:
# it pays off from tensors (or expert stacks) of ~128 MB of bf16, i.e. multi-GB models. Below, eager.
COMPILE_MIN_NUMEL = 1 << 26


def quantizer_backend_for(key: QuantKey, device: torch.device | str, numel: int = 0, reg: Registry | None = None) -> str:
    """The quantizer backend for ``key`` on ``device`` for a tensor of ``numel`` elements.

    CUDA: ``triton`` when a plugin registered one and Triton can run there (a usable driver:
    :func:`oqcore.triton_support.triton_support`), else the reference. CPU: a plugin's native ``cpu`` quantizer when
    registered (no compile cost); else ``compiled`` (torch.compile) for tensors or whole expert
    stacks of at least :data:`COMPILE_MIN_NUMEL` elements, unless ``OQ_COMPILE=0``. Otherwise the
    ``torch`` reference. All of them produce the same bytes (each plugin's tests check it).
    """
    from oqcore.compiled import compile_enabled

    reg = reg or get_registry()
    dev = torch.device(device)
    if dev.type == "cuda" and (key, "triton") in reg.quantizers:
        from oqcore.triton_support import triton_support

        if triton_support(dev)[0]:
            return "triton"
    if dev.type == "cpu":
        if (key, NATIVE_CPU_BACKEND) in reg.quantizers:
            return NATIVE_CPU_BACKEND
        if numel >= COMPILE_MIN_NUMEL and compile_enabled() and (key, COMPILED_BACKEND) in reg.quantizers:
            return COMPILED_BACKEND
    return REFERENCE_BACKEND
