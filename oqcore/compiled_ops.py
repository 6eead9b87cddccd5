"""Quantized layer forwards as ``torch.library`` custom ops, for ``torch.compile``.

Under ``torch.compile`` a quantized layer whose forward backend is not
:attr:`oqcore.Backend.traceable` (C kernels called through ctypes, Triton launchers, data-dependent
loops over experts) runs as ONE opaque op, so Dynamo traces the model without a graph break inside
the layer and the op runs the layer's eager forward, giving the eager bytes:

- ``oqcore::linear_forward(x [..., K], layer_key) -> [..., N]`` (``x.dtype``)
- ``oqcore::moe_forward(x [T, H], topk_ids [T, k], topk_weights [T, k], layer_key) -> [T, H]`` (``x.dtype``)

This is vLLM's pattern (``torch.ops.vllm.moe_forward(hidden_states, router_logits, layer_name)``):
the graph holds a string naming the layer, and the op looks the layer up at run time, so it reads
the layer's live tensors (:func:`oqcore.reload_weights` in place changes what a compiled model
computes, with no recompile). Keys are unique per wrapper instance (``"<layer_name>#<n>"``, ``n``
from a process-wide counter, never reused) and held in a :class:`weakref.WeakValueDictionary`:
entries vanish with their layers, so nothing here keeps a model alive. A copy of a wrapper
(``copy.deepcopy``, pickling, :func:`oqcore.modules.empty_like`) gets a key of its own
(:func:`register`), so a graph compiled for one wrapper never runs another's weights: Dynamo
guards on the key string, a different wrapper has a different key and recompiles.

The ops' fake (meta) implementations state only the output shape and dtype.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

from oqcore.errors import InternalError

KEY_ATTR = "compile_key"
"""The wrapper attribute holding its key (a plain ``str`` attribute: Dynamo guards on its value)."""

_LAYERS: weakref.WeakValueDictionary[str, nn.Module] = weakref.WeakValueDictionary()
_COUNTER = itertools.count()


def register(layer: nn.Module) -> str:
    """Give ``layer`` (a :class:`oqcore.modules.QuantizedLinear` / ``QuantizedMoE``, with a
    ``layer_name``) a fresh key, store it as ``layer.compile_key`` and make it resolvable by
    :func:`lookup` for as long as ``layer`` lives. Returns the key. Calling it again (on a copy
    whose ``__dict__`` came from another wrapper) replaces the copied key."""
    key = f"{getattr(layer, 'layer_name', type(layer).__name__)}#{next(_COUNTER)}"
    layer.__dict__[KEY_ATTR] = key
    _LAYERS[key] = layer
    return key


def lookup(key: str) -> nn.Module:
    """The live wrapper registered under ``key``. Raises :class:`oqcore.InternalError` naming the
    key when no live wrapper holds it (the layer was garbage-collected while a compiled graph that
    names it still runs)."""
    layer = _LAYERS.get(key)
    if layer is None:
        raise InternalError(
            f"oqcore compiled op: no live quantized layer has key {key!r} (it was deleted or garbage-collected "
            "while a compiled graph still names it); compile the model again"
        )
    return layer


@torch.library.custom_op("oqcore::linear_forward", mutates_args=())
def linear_forward(x: torch.Tensor, layer_key: str) -> torch.Tensor:
    """The eager forward of the quantized linear ``layer_key``: ``method.apply(layer, x)``,
    ``x [..., K] -> [..., N]`` in ``x.dtype``. Errors are the method's (an
    :class:`oqcore.OqError` leaves as itself)."""
    layer = lookup(layer_key)
    return _fresh(layer.method.apply(layer, x), x)


@linear_forward.register_fake
def _linear_forward_fake(x: torch.Tensor, layer_key: str) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], lookup(layer_key).out_features))


@torch.library.custom_op("oqcore::moe_forward", mutates_args=())
def moe_forward(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer_key: str) -> torch.Tensor:
    """The eager forward of the quantized experts ``layer_key``: ``method.apply(layer, x,
    topk_ids, topk_weights)``, ``x [T, H]`` -> ``[T, H]`` in ``x.dtype`` (ids already routed:
    :func:`oqcore.modules._route`)."""
    layer = lookup(layer_key)
    return _fresh(layer.method.apply(layer, x, topk_ids, topk_weights), x)


@moe_forward.register_fake
def _moe_forward_fake(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer_key: str) -> torch.Tensor:
    return x.new_empty(x.shape)


def _fresh(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` as a tensor a custom op may return: a custom op's output must not alias its inputs
    (a backend may return ``x`` or a view of it for an empty input)."""
    if y.numel() and y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        return y.clone()
    return y
