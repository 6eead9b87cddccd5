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

Autograd: each op's backward is a second opaque op (``oqcore::linear_backward`` /
``oqcore::moe_backward``) that re-runs the eager forward under autograd and returns its
vector-Jacobian product, so a compiled model gives the gradients the eager model gives (w.r.t. the
input and the routing weights; quantized weights are not trainable). A backend whose eager forward
is not differentiable (a C kernel: its output has no ``grad_fn``) contributes a zero gradient,
which is what eager autograd does with a path through a detached output. Compiling a model called
without ``torch.no_grad()`` (embeddings require grad by default) therefore works.
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


def _vjp(layer: nn.Module, args: tuple, wrt: tuple[int, ...], grad_out: torch.Tensor) -> list[torch.Tensor]:
    """The gradients of ``<grad_out, method.apply(layer, *args)>`` w.r.t. ``args[i]`` for ``i`` in
    ``wrt`` (zeros where the eager forward does not depend on them differentiably)."""
    leaves = [a.detach().requires_grad_(i in wrt) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
    with _autograd_dispatch(), torch.enable_grad():
        y = layer.method.apply(layer, *leaves)
    grads: tuple = (None,) * len(wrt)
    if y.requires_grad:
        grads = torch.autograd.grad(y, [leaves[i] for i in wrt], grad_out, allow_unused=True)
    return [torch.zeros_like(args[i]) if g is None else g for i, g in zip(wrt, grads)]


def _autograd_dispatch():
    """A context in which autograd records again. A custom op's implementation runs below the
    autograd dispatch keys (they are in the thread's exclude set: ``torch.enable_grad()`` alone
    records nothing), so the backward ops re-include them for the eager re-run; torch 2.13 has no
    public API for this (``torch._C._ForceDispatchKeyGuard`` with the exclude set minus autograd's
    keys, restored on exit). Raises :class:`oqcore.InternalError` if a torch lacks it."""
    guard = getattr(torch._C, "_ForceDispatchKeyGuard", None)
    if guard is None:
        raise InternalError(
            f"oqcore compiled op: gradients through a quantized layer under torch.compile need "
            f"torch._C._ForceDispatchKeyGuard, missing in torch {torch.__version__}; run the backward eagerly"
        )
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for name in ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "AutogradCPU", "AutogradCUDA", "ADInplaceOrView"):
        key = getattr(torch._C.DispatchKey, name, None)
        if key is not None:
            exclude = exclude.remove(key)
    return guard(torch._C._dispatch_tls_local_include_set(), exclude)


@torch.library.custom_op("oqcore::linear_backward", mutates_args=())
def linear_backward(x: torch.Tensor, grad_out: torch.Tensor, layer_key: str) -> torch.Tensor:
    """``d<grad_out, linear_forward(x)>/dx`` ``[..., K]`` by eager autograd of the layer's forward."""
    return _vjp(lookup(layer_key), (x,), (0,), grad_out)[0]


@linear_backward.register_fake
def _linear_backward_fake(x: torch.Tensor, grad_out: torch.Tensor, layer_key: str) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("oqcore::moe_backward", mutates_args=())
def moe_backward(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, grad_out: torch.Tensor, layer_key: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of ``<grad_out, moe_forward(...)>`` w.r.t. ``x [T, H]`` and ``topk_weights
    [T, k]``, by eager autograd of the layer's forward."""
    gx, gw = _vjp(lookup(layer_key), (x, topk_ids, topk_weights), (0, 2), grad_out)
    return gx, gw


@moe_backward.register_fake
def _moe_backward_fake(x, topk_ids, topk_weights, grad_out, layer_key):
    return torch.empty_like(x), torch.empty_like(topk_weights)


def _linear_setup(ctx, inputs, output) -> None:
    x, key = inputs
    ctx.save_for_backward(x)
    ctx.key = key


def _linear_grad(ctx, grad_out):
    (x,) = ctx.saved_tensors
    return torch.ops.oqcore.linear_backward(x, grad_out, ctx.key), None


def _moe_setup(ctx, inputs, output) -> None:
    x, topk_ids, topk_weights, key = inputs
    ctx.save_for_backward(x, topk_ids, topk_weights)
    ctx.key = key


def _moe_grad(ctx, grad_out):
    x, topk_ids, topk_weights = ctx.saved_tensors
    gx, gw = torch.ops.oqcore.moe_backward(x, topk_ids, topk_weights, grad_out, ctx.key)
    return gx, None, gw, None


linear_forward.register_autograd(_linear_grad, setup_context=_linear_setup)
moe_forward.register_autograd(_moe_grad, setup_context=_moe_setup)


def _fresh(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` as a tensor a custom op may return: a custom op's output must not alias its inputs
    (a backend may return ``x`` or a view of it for an empty input)."""
    if y.numel() and y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        return y.clone()
    return y
