"""The contract every online quantization method implements (linear and fused-MoE experts).

A method class is registered by a plugin for one ``(kind, weight_key)`` pair. Its class attributes
declare what it quantizes and which activation keys it can pair with; one instance is made per
layer by the core with the activation key, options and backend the planner resolved.

Lifecycle of a layer (vLLM's online quantization, without the engine):

1. ``create_weights(layer)``: register the high-precision parameters the checkpoint will fill, on
   the meta device, with the names and shapes of the original module (so checkpoint names map
   one to one).
2. The loader (or :func:`oqcore.quantize_`) fills them; once every element has arrived,
   ``process_weights_after_loading(layer)`` quantizes them in place and frees the high-precision
   copies. It must be idempotent: calling it on an already-quantized layer changes nothing.
3. ``apply(layer, x, ...)`` runs the forward through the chosen backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from oqcore.keys import QuantKey

if TYPE_CHECKING:
    from oqcore.oracle import Backend


class NoOptions(BaseModel):
    """Options model of a method that takes no options: any key given is a config error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class OnlineMethodBase(ABC):
    """Base of all online methods.

    Class attributes (declared by each concrete method):

    - ``kind``: ``"linear"`` or ``"moe"`` (set by the two subclasses below).
    - ``weight_key``: the :class:`QuantKey` the weights are quantized to.
    - ``supported_activation_keys``: activation keys the method can run with; ``None`` in the tuple
      means weight-only (activations stay in the model dtype).
    - ``default_activation_key``: used when the user's spec omits ``activation``.
    - ``options_model``: a pydantic model validating ``QuantSpec.options`` (e.g. an mxfp8
      ``scale_mode``); :class:`NoOptions` by default.

    Instance attributes: ``activation_key`` (resolved), ``options`` (validated model instance),
    ``backend`` (the :class:`oqcore.Backend` the oracle chose).

    The base classes below implement the whole lifecycle in terms of the quantizers the plugin
    registered for its keys (``oq_register_quantizers``) and a float32 dequantize-and-matmul
    reference forward (the ``torch`` backend). A scheme overrides only what it does differently;
    a backend with a ``forward`` replaces the reference forward.
    """

    kind: ClassVar[str]
    weight_key: ClassVar[QuantKey]
    supported_activation_keys: ClassVar[tuple[QuantKey | None, ...]] = (None,)
    default_activation_key: ClassVar[QuantKey | None] = None
    options_model: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, *, activation_key: QuantKey | None, options: BaseModel | None, backend: Backend):
        self.activation_key = activation_key
        self.options = options if options is not None else self.options_model()
        self.backend = backend

    @classmethod
    def check_layer(cls, name: str, layer: torch.nn.Module) -> None:
        """Check the layer's shapes against the method's limits, at plan time.

        Raises :class:`oqcore.UnsupportedLayerError` naming ``name`` and the shape at fault. The
        default accepts every layer of the method's kind.
        """

    @abstractmethod
    def create_weights(self, layer: torch.nn.Module) -> None:
        """Register the layer's high-precision parameters on the meta device."""

    @abstractmethod
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Quantize the loaded high-precision parameters in place and free them (idempotent).

        Raises :class:`oqcore.UnsupportedLayerError` naming the layer if a weight holds NaN or Inf.
        """

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, *args: Any) -> torch.Tensor:
        """Run the layer's forward on ``x`` through ``self.backend``."""

    # ---- helpers shared by the default implementations -----------------------------------------

    def quantize_weight(self, w: torch.Tensor, layer_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize a ``[N, K]`` or ``[E, N, K]`` weight with the plugin's quantizer for the layer's
        device; returns ``(qdata, scale)``. Raises :class:`oqcore.UnsupportedLayerError` on NaN/Inf."""
        from oqcore.tensor import find_quantizer, quantize_tensor, quantizer_backend_for

        # Judged on the whole stack: one compiled shape serves every expert of every layer.
        backend = quantizer_backend_for(self.weight_key, w.device, w.numel())
        if w.dim() == 2 or (w.is_contiguous() and find_quantizer(self.weight_key, backend).whole_stack):
            # A fused kernel writes the stack's final qdata/scale tensors directly: no per-expert
            # outputs to copy, one fresh allocation (first-touch page faults cost ~0.3 s/GB here).
            qt = quantize_tensor(w, self.weight_key, backend, self.options, name=layer_name)
            return qt.qdata, qt.scale
        # One expert at a time: the quantizer's float32 temporaries then scale with one expert, not
        # the whole stack (scales are per expert by contract, so the bytes are the same). A
        # transposed (GPT-OSS) stack also goes this way: each expert is made contiguous on its own.
        first = quantize_tensor(w[0].contiguous(), self.weight_key, backend, self.options, name=f"{layer_name}[expert 0]")
        qdata = first.qdata.new_empty((w.shape[0], *first.qdata.shape))
        scale = first.scale.new_empty((w.shape[0], *first.scale.shape))
        qdata[0], scale[0] = first.qdata, first.scale
        for e in range(1, w.shape[0]):
            qt = quantize_tensor(w[e].contiguous(), self.weight_key, backend, self.options, name=f"{layer_name}[expert {e}]")
            qdata[e], scale[e] = qt.qdata, qt.scale
        return qdata, scale

    def dequantize_weight(self, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Inverse of :meth:`quantize_weight` (reference dequantizer) in ``dtype``."""
        from oqcore.tensor import find_quantizer

        return find_quantizer(self.weight_key).dequantize(qdata, scale, dtype, self.options)

    def fake_quantize_activation(self, x: torch.Tensor) -> torch.Tensor:
        """Round ``x [M, K]`` through the activation key (quantize then dequantize) in float32;
        ``x`` unchanged for weight-only methods."""
        if self.activation_key is None:
            return x
        from oqcore.tensor import find_quantizer

        q = find_quantizer(self.activation_key)
        qdata, scale = q.quantize(x, self.options)
        return q.dequantize(qdata, scale, torch.float32, self.options)

    def _finish(self, layer: torch.nn.Module) -> None:
        layer.quantized = True
        if self.backend.prepare is not None:
            self.backend.prepare(self, layer)


def _replace_param(layer: torch.nn.Module, name: str, value: torch.Tensor | None) -> None:
    if name in layer._parameters:
        del layer._parameters[name]
    if value is not None:
        layer.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))


def _meta_param(shape: tuple[int, ...], dtype: torch.dtype) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)


class OnlineLinearMethodBase(OnlineMethodBase):
    """Online method for dense linears: ``y = x @ W.T (+ b)`` with ``W`` of shape ``[N, K]``.

    Layer: a :class:`oqcore.modules.QuantizedLinear`. After processing it holds ``weight``
    (qdata ``[N, K]``), ``weight_scale`` and ``bias`` (high precision). ``apply(layer, x)`` takes
    ``x [..., K]`` in the model dtype and returns ``[..., N]`` in the same dtype.
    """

    kind: ClassVar[str] = "linear"

    def create_weights(self, layer: torch.nn.Module) -> None:
        """``weight [N, K]`` and ``bias [N]`` (if any) on the meta device, in ``layer.params_dtype``."""
        layer.register_parameter("weight", _meta_param((layer.out_features, layer.in_features), layer.params_dtype))
        layer.register_parameter("bias", _meta_param((layer.out_features,), layer.params_dtype) if layer.has_bias else None)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Quantize ``weight`` into ``weight`` (qdata) + ``weight_scale``; idempotent."""
        if layer.quantized:
            return
        qdata, scale = self.quantize_weight(layer.weight.data, layer.layer_name)
        _replace_param(layer, "weight", qdata)
        _replace_param(layer, "weight_scale", scale)
        self._finish(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, *args: Any) -> torch.Tensor:
        """The backend's forward, or the reference: dequantize in float32, fake-quantize the
        activations per the activation key, ``F.linear`` in float32, cast back to ``x.dtype``."""
        if self.backend.forward is not None:
            return self.backend.forward(self, layer, x)
        return self.reference_forward(layer, x)

    def reference_forward(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Emulation on any device: exactly the numbers a W8A8/W8A16 kernel with float32
        accumulation computes, up to summation order. Traces under ``torch.compile`` as one graph
        (no graph break) whose results equal eager's (a plugin's quantizers run there as
        opaque ``torch.library`` custom ops where inductor would miscompile them)."""
        shape = x.shape
        x2 = self.fake_quantize_activation(x.reshape(-1, shape[-1])).float()
        w = self.dequantize_weight(layer.weight, layer.weight_scale, torch.float32)
        bias = layer.bias.float() if layer.bias is not None else None
        y = torch.nn.functional.linear(x2, w, bias)
        return y.to(x.dtype).reshape(*shape[:-1], layer.out_features)


class OnlineMoEMethodBase(OnlineMethodBase):
    """Online method for fused routed experts: ``w13 [E, 2I, H]`` (gate and up stacked) and
    ``w2 [E, H, I]``, or the transposed GPT-OSS layout (``[E, H, 2I]`` / ``[E, I, H]``) with biases.

    Layer: a :class:`oqcore.modules.QuantizedMoE`. After processing it holds ``w13_weight
    [E, 2I, H]``, ``w13_weight_scale``, ``w2_weight [E, H, I]``, ``w2_weight_scale`` (canonical
    layout whatever the checkpoint's), and the biases under their original names. Every expert
    gets its own scales (quantizers see the leading E dim and never share scales across it).
    ``apply(layer, x, topk_ids, topk_weights)`` takes tokens ``x [T, H]``, expert ids
    ``topk_ids [T, k]`` and routing weights ``topk_weights [T, k]`` and returns ``[T, H]``.
    """

    kind: ClassVar[str] = "moe"

    def create_weights(self, layer: torch.nn.Module) -> None:
        """``gate_up_proj``/``down_proj`` (+ biases) on the meta device, in the checkpoint's layout."""
        lay = layer.layout
        layer.register_parameter("gate_up_proj", _meta_param(lay.w13_shape, layer.params_dtype))
        layer.register_parameter("down_proj", _meta_param(lay.w2_shape, layer.params_dtype))
        if lay.has_bias:
            layer.register_parameter("gate_up_proj_bias", _meta_param((lay.num_experts, 2 * lay.intermediate_size), layer.params_dtype))
            layer.register_parameter("down_proj_bias", _meta_param((lay.num_experts, lay.hidden_size), layer.params_dtype))

    def canonical_weights(self, layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w13 [E, 2I, H], w2 [E, H, I])`` views of the loaded high-precision weights."""
        w13, w2 = layer.gate_up_proj.data, layer.down_proj.data
        if layer.layout.transposed:
            w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
        return w13, w2

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Quantize both expert stacks per expert into ``w13_*`` / ``w2_*``; idempotent."""
        if layer.quantized:
            return
        w13, w2 = self.canonical_weights(layer)
        # Transposed (GPT-OSS) stacks stay views: each expert is made contiguous on its own.
        q13, s13 = self.quantize_weight(w13, f"{layer.layer_name}.gate_up_proj")
        q2, s2 = self.quantize_weight(w2, f"{layer.layer_name}.down_proj")
        _replace_param(layer, "gate_up_proj", None)
        _replace_param(layer, "down_proj", None)
        _replace_param(layer, "w13_weight", q13)
        _replace_param(layer, "w13_weight_scale", s13)
        _replace_param(layer, "w2_weight", q2)
        _replace_param(layer, "w2_weight_scale", s2)
        self._finish(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, *args: Any) -> torch.Tensor:
        """The backend's forward, or the reference loop over the experts that got tokens."""
        if self.backend.forward is not None:
            return self.backend.forward(self, layer, x, *args)
        return self.reference_forward(layer, x, *args)

    def expert_linear(self, layer: torch.nn.Module, proj: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        """``x [T, K] @ W[expert].T`` in float32 for ``proj`` in ``{"w13", "w2"}``, activation
        fake-quantized per the activation key, plus the expert's bias if the layer has one."""
        w = self.dequantize_weight(
            getattr(layer, f"{proj}_weight")[expert], getattr(layer, f"{proj}_weight_scale")[expert], torch.float32
        )
        y = torch.nn.functional.linear(self.fake_quantize_activation(x).float(), w)
        if layer.layout.has_bias:
            bias = layer.gate_up_proj_bias if proj == "w13" else layer.down_proj_bias
            y = y + bias[expert].float()
        return y

    def reference_forward(
        self, layer: torch.nn.Module, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """Per-expert loop (as transformers' eager experts): gate-up, the layer's gate function,
        down, weighted sum over the top-k. float32 inside, ``x.dtype`` out.

        Under ``torch.compile`` the loop over the experts that received tokens is data dependent:
        Dynamo breaks the graph there (``tolist``, ``where``) and compiles the per-expert body, which
        gives the eager numbers; ``fullgraph=True`` is not possible for MoE layers."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in torch.unique(topk_ids).tolist():
            if not 0 <= e < layer.layout.num_experts:
                continue
            tok, pos = torch.where(topk_ids == e)
            h = layer.apply_gate(self.expert_linear(layer, "w13", e, x[tok]))
            y = self.expert_linear(layer, "w2", e, h)
            out.index_add_(0, tok, y * topk_weights[tok, pos, None].float())
        return out.to(x.dtype)


METHOD_BASES: dict[str, type[OnlineMethodBase]] = {
    "linear": OnlineLinearMethodBase,
    "moe": OnlineMoEMethodBase,
}
