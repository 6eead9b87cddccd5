"""The tensors a quantized layer holds once its method has processed it, derived from the method.

Nothing here is a table of schemes: a fresh copy of the wrapper (meta-device high-precision
parameters, :func:`oqcore.modules.empty_like`) is put through its method's own
``process_weights_after_loading`` on the meta device, with the ``torch`` reference quantizers and
without the backend's ``prepare`` (backend repacks are rebuilt at load, never saved). The names,
shapes and dtypes that come out are what a saved folder must hold for that layer, whatever plugin
the method comes from. Layers of the same method and shapes are derived once.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from oqcore.errors import InternalError, OqError
from oqcore.torch_compat import clear_parameters, own_parameters, set_parameter


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a quantized layer: ``shape``, ``dtype``, and ``high_precision``: it is a
    parameter the method keeps as loaded (a bias, in the model dtype), so any floating dtype in a
    file is acceptable and is converted; every other tensor (qdata, scales) must match exactly.
    ``state``: a static activation state tensor (a calibrated ``input_scale``,
    :meth:`oqcore.OnlineMethodBase.activation_state`): read from a stored checkpoint, never
    computed from the weights, kept by :func:`oqcore.reload_weights`."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    high_precision: bool
    state: bool = False

    def describe(self) -> str:
        """``"float8_e4m3fn [64, 160]"``."""
        return f"{str(self.dtype).removeprefix('torch.')} {list(self.shape)}"


def _signature(probe: nn.Module) -> tuple:
    """What the derived tensors can depend on: the wrapper and method types, the method's state
    (activation key, options...; not the backend) and the high-precision parameters' shapes."""
    method = probe.method
    state = tuple(sorted((k, repr(v)) for k, v in vars(method).items() if k != "backend"))
    params = tuple((k, tuple(p.shape), p.dtype) for k, p in own_parameters(probe).items())
    extra = (repr(getattr(probe, "layout", None)), getattr(probe, "params_dtype", None))
    return (type(probe), type(method), state, params, extra)


def _derive(wrapper: nn.Module, materialize, experts: int | None = None) -> dict[str, TensorSpec]:
    """Run the method on a fresh probe of ``wrapper`` (with ``experts`` experts instead of the
    layer's own count, if given) and describe the parameters it leaves."""
    from oqcore.modules import empty_like

    probe = empty_like(wrapper)
    if experts is not None:
        probe.layout = dataclasses.replace(probe.layout, num_experts=experts)
        clear_parameters(probe)
        probe.method.create_weights(probe)
    before = {k: (tuple(p.shape), p.dtype) for k, p in own_parameters(probe).items()}
    for k, p in own_parameters(probe).items():
        set_parameter(probe, k, nn.Parameter(materialize(p), requires_grad=False))
    # the static activation state comes from the checkpoint, as the weights do: stand-ins here
    state = probe.method.activation_state()
    for k, (shape, dtype) in state.items():
        set_parameter(probe, k, nn.Parameter(materialize(torch.empty(shape, dtype=dtype, device="meta")), requires_grad=False))
    method = copy.copy(wrapper.method)
    method.backend = dataclasses.replace(method.backend, prepare=None)
    probe.method = method
    method.process_weights_after_loading(probe)
    out = {}
    for k, p in own_parameters(probe).items():
        spec = (tuple(p.shape), p.dtype)
        out[k] = TensorSpec(spec[0], spec[1], before.get(k) == spec, k in state)
    return out


def _extrapolate(a: dict[str, TensorSpec], b: dict[str, TensorSpec], experts: int) -> dict[str, TensorSpec] | None:
    """The specs for ``experts`` experts from those for 1 (``a``) and 2 (``b``): a dim that is 1 in
    ``a`` and 2 in ``b`` is the expert dim, every other dim must be equal. ``None`` if the two do
    not fit that pattern (the caller then derives with the real count)."""
    if a.keys() != b.keys():
        return None
    out = {}
    for k, sa in a.items():
        sb = b[k]
        if sa.dtype != sb.dtype or sa.high_precision != sb.high_precision or sa.state != sb.state or len(sa.shape) != len(sb.shape):
            return None
        shape = []
        for da, db in zip(sa.shape, sb.shape):
            if da == db:
                shape.append(da)
            elif (da, db) == (1, 2):
                shape.append(experts)
            else:
                return None
        out[k] = TensorSpec(tuple(shape), sa.dtype, sa.high_precision, sa.state)
    return out


def _derive_any(wrapper: nn.Module, materialize) -> dict[str, TensorSpec]:
    """:func:`_derive`, for a fused-experts layer of many experts from probes of 1 and 2 experts
    (its method quantizes expert by expert on the meta device: cost grows with the count)."""
    layout = getattr(wrapper, "layout", None)
    experts = getattr(layout, "num_experts", None)
    if dataclasses.is_dataclass(layout) and isinstance(experts, int) and experts > 3:
        try:
            specs = _extrapolate(_derive(wrapper, materialize, 1), _derive(wrapper, materialize, 2), experts)
        except Exception:
            specs = None
        if specs is not None:
            return specs
    return _derive(wrapper, materialize)


def _on_meta(p: torch.Tensor) -> torch.Tensor:
    # quantize_tensor dry-runs meta tensors through the torch reference (no values checked)
    return torch.empty(p.shape, dtype=p.dtype, device="meta")


def _on_cpu(p: torch.Tensor) -> torch.Tensor:
    return torch.ones(p.shape, dtype=p.dtype)


_CACHE: OrderedDict[tuple, dict[str, TensorSpec]] = OrderedDict()
_CACHE_SIZE = 256
_CACHE_LOCK = threading.Lock()


def quantized_tensors(wrappers: dict[str, nn.Module]) -> dict[str, dict[str, TensorSpec]]:
    """``{layer name: {parameter name: TensorSpec}}`` for every quantized wrapper (a
    :class:`oqcore.modules.QuantizedLinear` / :class:`~oqcore.modules.QuantizedMoE` whose method
    is set; its current parameters are not read or changed).

    Derived on the meta device; a method whose quantizer cannot run on meta tensors (it reads
    values, e.g. ``.item()``) is derived once on a CPU tensor of ones of the layer's shape instead.
    Results are kept per signature (wrapper and method types, method state, shapes), so layers of
    one shape, and later saves and loads of the same model, cost nothing more.
    Raises :class:`oqcore.InternalError` naming the layer and method if neither works.
    """
    from oqcore.modules import empty_like

    out = {}
    for name, w in wrappers.items():
        key = _signature(empty_like(w))
        with _CACHE_LOCK:
            specs = _CACHE.get(key)
            if specs is not None:
                _CACHE.move_to_end(key)
        if specs is None:
            specs = _derive_checked(name, w)
            with _CACHE_LOCK:
                _CACHE[key] = specs
                while len(_CACHE) > _CACHE_SIZE:
                    _CACHE.popitem(last=False)
        out[name] = specs
    return out


def _derive_checked(name: str, w: nn.Module) -> dict[str, TensorSpec]:
    try:
        return _derive_any(w, _on_meta)
    except Exception:
        pass
    try:
        return _derive(w, _on_cpu)
    except OqError:
        raise
    except Exception as e:
        raise InternalError(
            f"layer {name!r}: cannot tell which tensors {type(w.method).__name__} leaves after "
            f"quantizing ({type(e).__name__}: {e})"
        ) from e
