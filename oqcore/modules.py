"""The modules that replace quantized layers in a model.

:class:`QuantizedLinear` stands in for an ``nn.Linear`` and :class:`QuantizedMoE` for a fused-experts
module. Both keep the original parameter names while high precision (``weight``/``bias``;
``gate_up_proj``/``down_proj`` and their biases), so checkpoint names map one to one, and hand
everything else to their method: ``create_weights`` registers those parameters on the meta device,
``process_weights_after_loading`` turns them into quantized tensors (``weight`` + ``weight_scale``;
``w13_weight``/``w13_weight_scale`` ``[E, 2I, H]`` and ``w2_weight``/``w2_weight_scale`` ``[E, H, I]``,
vLLM's names, whatever the checkpoint's layout), and ``forward`` calls the method's ``apply``.

Under ``torch.compile``, a wrapper whose backend is not :attr:`oqcore.Backend.traceable` calls its
forward through one opaque custom op instead (:mod:`oqcore.compiled_ops`; each wrapper instance,
copies included, is registered there under a key of its own, ``compile_key``): no graph break
inside a quantized layer, the eager forward's numbers. Eager calls never go through the op.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from oqcore import compiled_ops
from oqcore.layers import MoELayout, moe_layout
from oqcore.torch_compat import bare_copy, experts_gate

if TYPE_CHECKING:
    from oqcore.methods import OnlineMethodBase


class QuantizedLinear(nn.Module):
    """An ``nn.Linear`` whose weight is quantized by ``method``.

    ``layer_name`` is the qualified name in the model (used in errors); ``params_dtype`` the dtype
    of the high-precision weights it is loaded from. ``forward(x [..., K]) -> [..., N]`` in ``x``'s dtype.
    """

    def __init__(
        self,
        layer_name: str,
        in_features: int,
        out_features: int,
        bias: bool,
        method: OnlineMethodBase,
        params_dtype: torch.dtype,
    ):
        super().__init__()
        self.layer_name = layer_name
        self.in_features = in_features
        self.out_features = out_features
        self.has_bias = bias
        self.params_dtype = params_dtype
        self.method = method
        self.quantized = False
        method.create_weights(self)
        compiled_ops.register(self)

    @classmethod
    def from_linear(cls, layer_name: str, linear: nn.Linear, method: OnlineMethodBase) -> QuantizedLinear:
        """A wrapper with ``linear``'s shapes and dtype (its weights are not copied)."""
        return cls(layer_name, linear.in_features, linear.out_features, linear.bias is not None, method, linear.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K] -> [..., N]`` through the method's backend.

        Raises ``RuntimeError`` (the kind ``nn.Linear`` raises, naming the layer) for an input that
        is not a floating-point tensor of at least one dimension with last dimension K; without this
        check integer token ids would be silently cast and multiplied, and a backend would fail
        with its own error kind (``IndexError``, ``ValueError``) for a 0-d or wrong-K input."""
        _check_input(self.layer_name, x, self.in_features)
        if torch.compiler.is_compiling() and not self.method.backend.traceable:
            return torch.ops.oqcore.linear_forward(x, self.compile_key)
        return self.method.apply(self, x)

    def __setstate__(self, state: dict) -> None:
        """Unpickling and ``copy.deepcopy``/``copy.copy``: the copy gets a compile key of its own."""
        super().__setstate__(state)
        compiled_ops.register(self)

    def extra_repr(self) -> str:
        """Shapes, method and backend, for ``print(model)``."""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, "
            f"method={type(self.method).__name__}, backend={self.method.backend.name}"
        )


class QuantizedMoE(nn.Module):
    """A fused-experts module whose expert weights are quantized by ``method``.

    Keeps the original module's non-weight attributes (``act_fn``, GPT-OSS's ``alpha``/``limit``,
    ``is_concatenated``...) and its gate function, so :meth:`apply_gate` computes exactly what the
    original did. ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``
    matches the transformers experts call (GPT-OSS passes the same three positionally).
    """

    def __init__(self, layer_name: str, experts: nn.Module, method: OnlineMethodBase):
        super().__init__()
        layout = moe_layout(experts)
        if layout is None:
            from oqcore.errors import UnsupportedLayerError

            raise UnsupportedLayerError(
                layer_name, f"{type(experts).__name__} is not a fused-experts module (gate_up_proj and down_proj [E, ...])"
            )
        self.layer_name = layer_name
        self.layout: MoELayout = layout
        self.params_dtype = experts.gate_up_proj.dtype
        self.original_type = type(experts).__name__
        for k, v in vars(experts).items():
            if not k.startswith("_") and k != "training" and not isinstance(v, (torch.Tensor, nn.Module)):
                setattr(self, k, v)
        for k, child in experts.named_children():
            if not any(True for _ in child.parameters()):
                self.add_module(k, child)
        self._gate_fn = experts_gate(experts)  # transformers' own gate function (torch_compat)
        self.method = method
        self.quantized = False
        method.create_weights(self)
        compiled_ops.register(self)

    def apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The original module's gated activation: ``[T, 2I] -> [T, I]``."""
        return self._gate_fn(self, gate_up)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Route ``hidden_states`` through the experts and combine with ``top_k_weights``."""
        _check_input(self.layer_name, hidden_states, self.layout.hidden_size)
        top_k_index, top_k_weights = _route(self.layer_name, top_k_index, top_k_weights, self.layout.num_experts)
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        if torch.compiler.is_compiling() and not self.method.backend.traceable:
            out = torch.ops.oqcore.moe_forward(x, top_k_index, top_k_weights, self.compile_key)
        else:
            out = self.method.apply(self, x, top_k_index, top_k_weights)
        return out.reshape(shape)

    def __setstate__(self, state: dict) -> None:
        """Unpickling and ``copy.deepcopy``/``copy.copy``: the copy gets a compile key of its own."""
        super().__setstate__(state)
        compiled_ops.register(self)

    def extra_repr(self) -> str:
        """Layout, method and backend, for ``print(model)``."""
        return f"{self.layout}, method={type(self.method).__name__}, backend={self.method.backend.name}"


def _check_input(layer: str, x: object, k: int | None) -> None:
    """``RuntimeError`` (what ``nn.Linear`` raises for these) unless ``x`` is a floating-point
    tensor of at least one dimension whose last dimension is ``k`` (any when ``None``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"layer {layer!r}: input must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise RuntimeError(f"layer {layer!r}: expected a floating-point input, got {x.dtype} (embed token ids first)")
    if x.dim() == 0:
        raise RuntimeError(f"layer {layer!r}: the input is 0-dimensional; expected [..., {k if k is not None else 'H'}]")
    if k is not None and x.shape[-1] != k:
        raise RuntimeError(
            f"layer {layer!r}: input of shape {list(x.shape)} cannot be multiplied with the weight: last dimension "
            f"must be in_features={k}"
        )


def _route(layer: str, index: object, weights: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, weights)`` with every expert id outside ``[0, E)`` sent to expert 0 at weight 0.

    transformers' experts skip such ids (expert parallelism marks experts of other ranks with
    them), so the token gets no contribution from that slot; a fused kernel would instead read
    past the expert stacks (garbage, NaN). Elementwise, so no host sync and compile-clean.
    Raises ``IndexError`` (what indexing with them raises) for ids that are not integers."""
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"layer {layer!r}: top_k_index must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise IndexError(f"layer {layer!r}: top_k_index must hold integer expert ids, got {index.dtype}")
    valid = (index >= 0) & (index < num_experts)
    index = torch.where(valid, index, torch.zeros_like(index))
    if isinstance(weights, torch.Tensor) and weights.shape == valid.shape:
        weights = torch.where(valid, weights, torch.zeros_like(weights))
    return index, weights


def empty_like(wrapper: nn.Module) -> nn.Module:
    """A new wrapper of the same type, shapes, attributes and method, with fresh meta-device
    high-precision parameters (what :func:`oqcore.reload_weights` quantizes into before copying
    the results into the live wrapper's storages)."""
    new = bare_copy(wrapper)
    new.quantized = False
    compiled_ops.register(new)  # its own key: the copied one names ``wrapper``
    wrapper.method.create_weights(new)
    return new
