"""The contract every online quantization method implements (linear and fused-MoE experts).

A method class serves one ``(kind, weight_key)`` pair. Its class attributes declare what it
quantizes and which activation keys it can pair with (for a scheme registered with
:class:`oqcore.Scheme`, the core derives them from the record); one instance is made per layer
by the core with the activation key, options, forward backend, the keys' formats
(:class:`MethodFormats`) and the quantizer implementation the planner resolved.

Lifecycle of a layer (vLLM's online quantization, without the engine):

1. ``create_weights(layer)``: register the high-precision parameters the checkpoint will fill, on
   the meta device, with the names and shapes of the original module (so checkpoint names map
   one to one).
2. The loader (or :func:`oqcore.quantize_`) fills them; once every element has arrived,
   ``process_weights_after_loading(layer)`` quantizes them in place and frees the high-precision
   copies. It must be idempotent: calling it on an already-quantized layer changes nothing.
3. ``apply(layer, x, ...)`` runs the forward through the chosen backend.

The base classes store whatever tensors the weight key's :class:`oqcore.formats.KeyFormat` names
(``qdata`` as ``weight``, the others as ``weight_<name>``): a format with a second-level scale or
packed 4-bit ``qdata`` needs no change here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from oqcore.errors import ConfigError, OqError, PluginError
from oqcore.formats import (
    KeyFormat,
    QuantizedTensor,
    QuantizerImpl,
    check_finite,
    check_quantizable,
    dequantize,
    input_param,
    run_quantizer,
)
from oqcore.groups import amax_grid, outer_level
from oqcore.keys import QuantKey
from oqcore.kinds import KINDS
from oqcore.oracle import select_quantizer
from oqcore.torch_compat import delete_parameter, set_parameter

if TYPE_CHECKING:
    from oqcore.oracle import Backend


class NoOptions(BaseModel):
    """Options model of a method that takes no options: any key given is a config error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class MethodFormats:
    """The formats one method instance quantizes with: the weight key's (``weight``), the
    activation key's (``activation``, ``None`` for weight-only) and their names for messages."""

    weight: KeyFormat
    activation: KeyFormat | None = None
    weight_name: str = ""
    activation_name: str = ""


def expert_loop(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    num_experts: int,
    expert_fn: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The routed-experts sum ``sum_k topk_weights[t, k] * expert_fn(topk_ids[t, k], x[t])`` in float32.

    ``x [T, H]``, ``topk_ids [T, k]`` (ids outside ``[0, num_experts)`` are skipped, as vLLM's
    expert-parallel masks do), ``topk_weights [T, k]``; ``expert_fn(e, x_e [T_e, H]) -> [T_e, H]``
    runs one expert on the tokens routed to it. Returns ``[T, H]`` float32 (cast it to ``x.dtype``).
    One loop over the experts that received tokens, as transformers' eager experts. The loop is
    data dependent (Dynamo would break the graph at ``tolist``): a backend using it is not
    :attr:`oqcore.Backend.traceable`, so under ``torch.compile`` the whole layer forward runs eagerly
    inside the op ``oqcore::moe_forward`` (:mod:`oqcore.compiled_ops`).
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(topk_ids).tolist():
        if not 0 <= e < num_experts:
            continue
        tok, pos = torch.where(topk_ids == e)
        y = expert_fn(e, x[tok])
        out.index_add_(0, tok, y.float() * topk_weights[tok, pos, None].float())
    return out


Matmul = Callable[..., torch.Tensor]
"""``matmul(method, x2 [M, K], weight: dict[str, Tensor], bias [N] | None, out_dtype) -> [M, N]``:
one quantized weight (its format's tensors by name: ``qdata``, ``scale``, ...; ``[N, K]``) applied to
``x2``, the bias added to the float32 sum and the result rounded once to ``out_dtype`` (float32 or
bf16). W8A8 matmuls quantize ``x2`` per the method's activation key themselves."""


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    # bf16 and float32 outputs are written directly by a matmul; fp16 goes through float32
    return x.dtype if x.dtype in (torch.bfloat16, torch.float32) else torch.float32


def linear_forward_from(matmul: Matmul) -> Callable[..., torch.Tensor]:
    """A :class:`oqcore.Backend` ``forward`` for linear layers from a per-weight :data:`Matmul`:
    ``x [..., K] -> [..., N]`` in ``x.dtype`` (bias added to the float32 sum, one rounding)."""

    def forward(method: OnlineMethodBase, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K] -> [..., N]`` through the backend's matmul."""
        shape = x.shape
        y = matmul(method, x.reshape(-1, shape[-1]), method.weight_tensors(layer, "weight"), layer.bias, _out_dtype(x))
        return y.to(x.dtype).reshape(*shape[:-1], layer.out_features)

    return forward


def moe_forward_from(matmul: Matmul) -> Callable[..., torch.Tensor]:
    """A :class:`oqcore.Backend` ``forward`` for routed experts from a per-weight :data:`Matmul`:
    :func:`expert_loop` over the experts that received tokens, gate-up (+ bias) in float32, the
    layer's ``apply_gate``, down (+ bias), routing-weighted float32 sum; ``x [T, H] -> [T, H]`` in
    ``x.dtype``. The gate runs on the float32 gate-up sums, as the reference does; weight-only
    methods hand its output to the down projection in the model dtype (bf16 kernels take bf16
    activations), W8A8 methods quantize it."""

    def forward(
        method: OnlineMethodBase, layer: torch.nn.Module, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """Tokens ``x [T, H]`` routed by ``topk_ids`` / ``topk_weights [T, k]`` -> ``[T, H]``."""
        has_bias = layer.layout.has_bias

        def expert(e: int, xe: torch.Tensor) -> torch.Tensor:
            """Expert ``e`` on its tokens ``xe [T_e, H]`` -> float32 ``[T_e, H]``."""
            b13 = layer.gate_up_proj_bias[e] if has_bias else None
            g = layer.apply_gate(matmul(method, xe, method.weight_tensors(layer, "w13_weight", e), b13, torch.float32))
            if method.activation_key is None:
                g = g.to(xe.dtype)
            b2 = layer.down_proj_bias[e] if has_bias else None
            return matmul(method, g, method.weight_tensors(layer, "w2_weight", e), b2, torch.float32)

        return expert_loop(x, topk_ids, topk_weights, layer.layout.num_experts, expert).to(x.dtype)

    return forward


class OnlineMethodBase(ABC):
    """Base of all online methods.

    Class attributes (declared by a v1 method class, derived from the :class:`oqcore.Scheme` record
    for a v2 scheme):

    - ``kind``: ``"linear"`` or ``"moe"`` (set by the two subclasses below).
    - ``weight_key``: the :class:`QuantKey` the weights are quantized to.
    - ``supported_activation_keys``: activation keys the method can run with; ``None`` in the tuple
      means weight-only (activations stay in the model dtype).
    - ``default_activation_key``: used when the user's spec omits ``activation``.
    - ``options_model``: a pydantic model validating ``QuantSpec.options`` (e.g. an mxfp8
      ``scale_mode``); :class:`NoOptions` by default.

    Instance attributes: ``activation_key`` (resolved), ``options`` (validated model instance),
    ``backend`` (the forward :class:`oqcore.Backend` the oracle chose), ``formats``
    (:class:`MethodFormats`) and ``quantizer`` (the planned :class:`oqcore.formats.QuantizerImpl`,
    or ``None`` to let the oracle choose per tensor).

    The base classes implement the whole lifecycle with the formats' quantizers and dequantizers
    and a float32 dequantize-and-matmul reference forward (the ``torch`` backend). A scheme
    overrides only what it does differently; a backend with a ``forward`` replaces the reference.
    """

    kind: ClassVar[str]
    weight_key: ClassVar[QuantKey]
    WEIGHT_PREFIXES: ClassVar[tuple[str, ...]] = ()
    """The prefixes of the quantized weights a layer of this kind holds (``weight``; ``w13_weight``,
    ``w2_weight``): each input of one has its own static activation state (:meth:`activation_state`)."""
    supported_activation_keys: ClassVar[tuple[QuantKey | None, ...]] = (None,)
    default_activation_key: ClassVar[QuantKey | None] = None
    options_model: ClassVar[type[BaseModel]] = NoOptions

    def __init__(
        self,
        *,
        activation_key: QuantKey | None,
        options: BaseModel | None,
        backend: Backend,
        formats: MethodFormats | None,
        quantizer: QuantizerImpl | None = None,
    ):
        self.activation_key = activation_key
        self.options = options if options is not None else self.options_model()
        self.backend = backend
        self.formats = formats
        self.quantizer = quantizer

    @classmethod
    def check_layer(cls, name: str, layer: torch.nn.Module) -> None:
        """Check the layer's shapes against the method's limits, at plan time.

        Raises :class:`oqcore.UnsupportedLayerError` naming ``name`` and the shape at fault. The
        default accepts every layer of the method's kind.
        """

    @classmethod
    @abstractmethod
    def weight_shapes(cls, layer: torch.nn.Module) -> list[tuple[int, ...]]:
        """The shapes the layer's weights are quantized at (``[N, K]``, or the canonical expert
        stacks ``[E, 2I, H]`` and ``[E, H, I]``): what the oracle judges quantizers on. Each
        kind's base class implements it."""

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

    def quantizer_for(self, w: torch.Tensor, name: str, takes_amax: bool = False) -> QuantizerImpl:
        """The implementation quantizing ``w``: the planned one when it supports ``w`` 's device,
        shape and dtype (judged on a whole expert stack: one compiled shape serves every expert),
        else the oracle's choice for ``w``; with ``takes_amax`` only implementations that accept
        a reduced amax (:attr:`oqcore.QuantizerImpl.takes_amax`) are considered."""
        impls = self.formats.weight.implementations
        if takes_amax:
            impls = tuple(i for i in impls if i.takes_amax)
        planned = self.quantizer
        if planned is not None and not w.is_meta and planned in impls:
            ok, _ = planned.is_supported(w.device, tuple(w.shape), w.dtype)
            if ok:
                return planned
        return select_quantizer(impls, w.device, [tuple(w.shape)], w.dtype, what=name).impl

    def quantize_weight(
        self, w: torch.Tensor, layer_name: str, shard: Any = None, prefix: str = "weight", outer_amax: torch.Tensor | None = None
    ) -> QuantizedTensor:
        """Quantize a ``[N, K]`` or ``[E, N, K]`` weight to the weight key; returns the
        :class:`oqcore.QuantizedTensor` (it unpacks to ``qdata, scale, ...``). Raises
        :class:`oqcore.UnsupportedLayerError` naming the layer (and expert) on NaN/Inf.

        ``shard`` (a layer's :class:`oqcore.parallel.shard.LayerShard`, ``None`` unsharded): ``w``
        is this rank's piece of weight ``prefix``; its collective runs first (the NaN/Inf check
        too, so every rank learns of a bad piece at the same point), and when the cut crosses the
        key's outermost scale groups the reduced amax goes to the quantizer (``amax=``), which
        then gives the piece its bytes in the unsharded result."""
        check_quantizable(w, layer_name)
        if self.formats is None:
            raise PluginError(f"{type(self).__name__}: no quantizer is registered for its weight key {self.weight_key}")
        amax = outer_amax if shard is None else self._shared_amax(w, layer_name, shard, prefix, outer_amax)
        fmt, impl = self.formats.weight, self.quantizer_for(w, layer_name, takes_amax=amax is not None)
        key_name = self.formats.weight_name or str(fmt.key)
        if w.dim() == 2 or (w.is_contiguous() and impl.whole_stack):
            # A fused kernel writes the stack's final tensors directly: no per-expert outputs to
            # copy, one fresh allocation (first-touch page faults cost ~0.3 s/GB here).
            whole = impl if amax is None else _with_amax(impl, amax)
            return run_quantizer(fmt, whole, w, self.options, layer_name, key_name)
        # One expert at a time: the quantizer's float32 temporaries then scale with one expert, not
        # the whole stack (scales are per expert by contract, so the bytes are the same). A
        # transposed (GPT-OSS) stack also goes this way: each expert is made contiguous on its own.
        per = (lambda e: impl) if amax is None else (lambda e: _with_amax(impl, amax[e]))
        first = run_quantizer(fmt, per(0), w[0].contiguous(), self.options, f"{layer_name}[expert 0]", key_name)
        tensors = {n: t.new_empty((w.shape[0], *t.shape)) for n, t in first.tensors.items()}
        for n, t in first.tensors.items():
            tensors[n][0] = t
        for e in range(1, w.shape[0]):
            qt = run_quantizer(fmt, per(e), w[e].contiguous(), self.options, f"{layer_name}[expert {e}]", key_name)
            for n, t in qt.tensors.items():
                tensors[n][e] = t
        return QuantizedTensor(tensors, fmt.key, w.shape, self.options, fmt)

    def _quantize_layer_weight(self, layer: torch.nn.Module, w: torch.Tensor, name: str, prefix: str) -> QuantizedTensor:
        """:meth:`quantize_weight` of ``layer``'s weight ``prefix``; a sharded layer's cut goes
        along (an unsharded call keeps the two-argument form methods may override)."""
        shard, outer = getattr(layer, "oq_shard", None), getattr(layer, "oq_outer_amax", None)
        if shard is None and outer is None:
            return self.quantize_weight(w, name)
        return self.quantize_weight(w, name, shard, prefix, outer)

    def _shared_amax(
        self, w: torch.Tensor, layer_name: str, shard: Any, prefix: str, outer: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The collective of a sharded weight (see :meth:`quantize_weight`): the reduced amax
        grid of the key's outermost scale level, or ``None`` when the cut crosses none."""
        what = f"quantizing {layer_name} ({prefix})"
        local = None
        try:
            if shard.amax_numel.get(prefix):
                # NaN/Inf propagate into the amax: the one pass over the weight also checks it
                local = amax_grid(w, outer_level(self.weight_key).group_shape)
                if not bool(torch.isfinite(local).all()):
                    check_finite(w, layer_name)  # raises, naming the expert and the count
                if outer is not None:
                    local = torch.maximum(local, outer)
            else:
                check_finite(w, layer_name)
        except OqError:
            shard.sync_amax(prefix, None, True, what)
            raise
        reduced = shard.sync_amax(prefix, local, False, what)
        return outer if reduced is None else reduced

    def dequantize_weight(self, *tensors_then_dtype: Any) -> torch.Tensor:
        """``dequantize_weight(qdata, scale[, ...], dtype)``: the weight format's tensors in its
        order, then the dtype; the reference dequantizer's result in ``dtype``."""
        *tensors, dtype = tensors_then_dtype
        fmt = self.formats.weight
        return dequantize(fmt, dict(zip(fmt.tensors, tensors)), dtype, self.options)

    def weight_tensors(self, layer: torch.nn.Module, prefix: str, expert: int | None = None) -> dict[str, torch.Tensor]:
        """The quantized tensors of the weight called ``prefix`` (``"weight"``, ``"w13_weight"``),
        by format name; ``expert`` selects one expert's slice of a stack."""
        fmt = self.formats.weight
        out = {n: getattr(layer, fmt.param_name(prefix, n)) for n in fmt.tensors}
        return out if expert is None else {n: t[expert] for n, t in out.items()}

    def dequantize_layer_weight(
        self, layer: torch.nn.Module, prefix: str, dtype: torch.dtype, expert: int | None = None
    ) -> torch.Tensor:
        """The dequantized weight called ``prefix`` of ``layer`` (one expert's with ``expert``) in ``dtype``."""
        return dequantize(self.formats.weight, self.weight_tensors(layer, prefix, expert), dtype, self.options)

    @property
    def static_activation(self) -> bool:
        """Whether the activation key quantizes inputs with stored (calibrated) scales."""
        fmt = self.formats.activation if self.formats is not None else None
        return self.activation_key is not None and fmt is not None and fmt.is_static_activation

    def activation_state(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """``{parameter name: (shape, dtype)}`` of the static activation state a layer of this
        method holds beside its quantized weights: for a static activation key, the key format's
        state (:meth:`oqcore.KeyFormat.activation_state`, a float32 ``[1]`` scale) per weight input
        (``input_scale``; ``w13_input_scale`` and ``w2_input_scale`` for experts: one per layer,
        as vLLM keeps after taking the max over experts). Empty for dynamic or no activation
        quantization. The state is calibrated, so it comes only from a stored checkpoint; it is
        saved with the layer and kept by :func:`oqcore.reload_weights`."""
        if not self.static_activation:
            return {}
        state = self.formats.activation.activation_state()
        return {input_param(p, n): spec for p in self.WEIGHT_PREFIXES for n, spec in state.items()}

    def check_activation_state(self, layer: torch.nn.Module) -> None:
        """Raise :class:`oqcore.ConfigError` (field ``<kind>.activation``) if the method runs a static
        activation key and ``layer`` lacks its stored state: online quantization from a
        high-precision checkpoint has no calibration to produce a static input scale (vLLM's
        online quantization is dynamic too)."""
        missing = [n for n in self.activation_state() if getattr(layer, n, None) is None]
        if missing:
            name = self.formats.activation_name or str(self.activation_key)
            raise ConfigError(
                f"layer {getattr(layer, 'layer_name', '?')!r}: activation {name} ({', '.join(missing)}) {STATIC_ONLINE}",
                f"{self.kind}.activation",
            )

    def input_state(self, layer: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        """The static activation state of the input of weight ``prefix``, by format tensor name."""
        fmt = self.formats.activation
        return {n: getattr(layer, input_param(prefix, n)) for n in fmt.activation_state()}

    def fake_quantize_activation(self, x: torch.Tensor, layer: torch.nn.Module | None = None, prefix: str = "weight") -> torch.Tensor:
        """Round ``x [M, K]`` through the activation key (quantize then dequantize) in float32 with
        its reference quantizer; ``x`` unchanged for weight-only methods. A static activation key
        quantizes with the stored state of the input of weight ``prefix`` of ``layer``
        (``x / input_scale``, saturated, rounded; :attr:`oqcore.KeyFormat.static_quantize`)."""
        fmt = self.formats.activation
        if self.activation_key is None or fmt is None:
            return x
        if fmt.is_static_activation:
            if layer is None:
                raise PluginError(f"{type(self).__name__}: a static activation key needs the layer holding its input scale")
            return fmt.fake_quantize_static(x, self.input_state(layer, prefix), self.options)
        out = fmt.reference.quantize(x, self.options)
        named = dict(out) if isinstance(out, dict) else dict(zip(fmt.tensors, out))
        return dequantize(fmt, named, torch.float32, self.options)

    def store_weight(self, layer: torch.nn.Module, prefix: str, qt: QuantizedTensor) -> None:
        """Register ``qt`` 's tensors as ``layer`` parameters named after ``prefix`` (``qdata`` as
        ``prefix`` itself, the others as ``prefix_<name>``), replacing any of the same name."""
        for n, t in qt.tensors.items():
            _replace_param(layer, self.formats.weight.param_name(prefix, n), t)

    def _finish(self, layer: torch.nn.Module) -> None:
        layer.quantized = True
        if self.backend.prepare is not None:
            self.backend.prepare(self, layer)


def _with_amax(impl: QuantizerImpl, amax: torch.Tensor) -> QuantizerImpl:
    """``impl`` with ``amax=amax`` bound: the core's contract call stays ``quantize(w, options)``."""
    quantize = impl.quantize
    return replace(impl, quantize=lambda w, options=None: quantize(w, options, amax=amax))


def _replace_param(layer: torch.nn.Module, name: str, value: torch.Tensor | None) -> None:
    # removed then added last: the parameter order state_dicts and saved exports have always had
    delete_parameter(layer, name)
    if value is not None:
        set_parameter(layer, name, value)


def _meta_param(shape: tuple[int, ...], dtype: torch.dtype) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)


class OnlineLinearMethodBase(OnlineMethodBase):
    """Online method for dense linears: ``y = x @ W.T (+ b)`` with ``W`` of shape ``[N, K]``.

    Layer: a :class:`oqcore.modules.QuantizedLinear`. After processing it holds ``weight``
    (qdata ``[N, K]``), ``weight_scale`` and ``bias`` (high precision). ``apply(layer, x)`` takes
    ``x [..., K]`` in the model dtype and returns ``[..., N]`` in the same dtype.
    """

    kind: ClassVar[str] = "linear"
    WEIGHT_PREFIXES: ClassVar[tuple[str, ...]] = ("weight",)

    @classmethod
    def weight_shapes(cls, layer: torch.nn.Module) -> list[tuple[int, ...]]:
        """``[(N, K)]``."""
        return [(layer.out_features, layer.in_features)]

    def create_weights(self, layer: torch.nn.Module) -> None:
        """``weight [N, K]`` and ``bias [N]`` (if any) on the meta device, in ``layer.params_dtype``."""
        layer.register_parameter("weight", _meta_param((layer.out_features, layer.in_features), layer.params_dtype))
        layer.register_parameter("bias", _meta_param((layer.out_features,), layer.params_dtype) if layer.has_bias else None)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Quantize ``weight`` into the format's tensors (``weight`` = qdata, ``weight_scale``, ...); idempotent."""
        if layer.quantized:
            return
        self.check_activation_state(layer)
        qt = self._quantize_layer_weight(layer, layer.weight.data, layer.layer_name, "weight")
        self.store_weight(layer, "weight", qt)
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
        x2 = self.fake_quantize_activation(x.reshape(-1, shape[-1]), layer, "weight").float()
        w = self.dequantize_layer_weight(layer, "weight", torch.float32)
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
    WEIGHT_PREFIXES: ClassVar[tuple[str, ...]] = ("w13_weight", "w2_weight")
    QUANTIZED_NAMES: ClassVar[dict[str, str]] = {"gate_up_proj": "w13_weight", "down_proj": "w2_weight"}
    """The fused experts' high-precision parameters (transformers' names, the checkpoint's layout)
    -> the prefix of the quantized tensors stored for them (canonical layout)."""

    @classmethod
    def weight_shapes(cls, layer: torch.nn.Module) -> list[tuple[int, ...]]:
        """``[(E, 2I, H), (E, H, I)]``: the canonical expert stacks."""
        from oqcore.layers import moe_layout

        lay = getattr(layer, "layout", None) or moe_layout(layer)
        e, i, h = lay.num_experts, lay.intermediate_size, lay.hidden_size
        return [(e, 2 * i, h), (e, h, i)]

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
        self.check_activation_state(layer)
        w13, w2 = self.canonical_weights(layer)
        # Transposed (GPT-OSS) stacks stay views: each expert is made contiguous on its own.
        q13 = self._quantize_layer_weight(layer, w13, f"{layer.layer_name}.gate_up_proj", "w13_weight")
        q2 = self._quantize_layer_weight(layer, w2, f"{layer.layer_name}.down_proj", "w2_weight")
        for hp in self.QUANTIZED_NAMES:
            _replace_param(layer, hp, None)
        for prefix, qt in zip(self.QUANTIZED_NAMES.values(), (q13, q2)):
            self.store_weight(layer, prefix, qt)
        self._finish(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, *args: Any) -> torch.Tensor:
        """The backend's forward, or the reference loop over the experts that got tokens."""
        if self.backend.forward is not None:
            return self.backend.forward(self, layer, x, *args)
        return self.reference_forward(layer, x, *args)

    def expert_linear(self, layer: torch.nn.Module, proj: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        """``x [T, K] @ W[expert].T`` in float32 for ``proj`` in ``{"w13", "w2"}``, activation
        fake-quantized per the activation key, plus the expert's bias if the layer has one."""
        w = self.dequantize_layer_weight(layer, f"{proj}_weight", torch.float32, expert)
        y = torch.nn.functional.linear(self.fake_quantize_activation(x, layer, f"{proj}_weight").float(), w)
        if layer.layout.has_bias:
            bias = layer.gate_up_proj_bias if proj == "w13" else layer.down_proj_bias
            y = y + bias[expert].float()
        return y

    def reference_forward(
        self, layer: torch.nn.Module, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """Per-expert loop (as transformers' eager experts): gate-up, the layer's gate function,
        down, weighted sum over the top-k. float32 inside, ``x.dtype`` out.

        The loop over the experts that received tokens is data dependent, so the core's ``torch``
        backend for experts is not traceable: under ``torch.compile`` this forward runs eagerly
        inside the op ``oqcore::moe_forward`` (no graph break, ``fullgraph=True`` works, the eager
        numbers)."""

        def expert(e: int, xe: torch.Tensor) -> torch.Tensor:
            """Expert ``e`` on its tokens ``xe [T_e, H]`` -> ``[T_e, H]`` float32."""
            return self.expert_linear(layer, "w2", e, layer.apply_gate(self.expert_linear(layer, "w13", e, xe)))

        out = expert_loop(x, topk_ids, topk_weights, layer.layout.num_experts, expert)
        return out.to(x.dtype)


STATIC_ONLINE = (
    "uses static input scales, which come from a calibrated checkpoint (llm-compressor's FP8 preset, "
    "ModelOpt FP8); quantizing high-precision weights online cannot produce them (vLLM's online "
    "quantization is dynamic too): use a dynamic activation key, or omit activation for the scheme's default"
)
"""Why a static activation key cannot be planned on a layer quantized online (message tail)."""


def refuse_static_online(layers: Any) -> None:
    """Raise :class:`oqcore.ConfigError` (field ``<kind>.activation``, or the layer's target) for
    the first of ``layers`` (planned :class:`oqcore.planning.LayerPlan` s that will be quantized
    online from high-precision weights) whose activation key has static scales: no calibration
    runs online, so there is no input scale to store. Called by every online entry point right
    after planning, before a weight is touched."""
    for lp in layers:
        bound = getattr(lp, "bound", None)
        fmt = None if bound is None or bound.formats is None else bound.formats.activation
        if fmt is None or bound.activation_key is None or not fmt.is_static_activation:
            continue
        name = bound.formats.activation_name or str(bound.activation_key)
        field = f"targets[{lp.target!r}].activation" if getattr(lp, "target", None) else f"{lp.kind}.activation"
        raise ConfigError(f"layer {lp.name!r}: activation {name} {STATIC_ONLINE}", field)


METHOD_BASES: dict[str, type[OnlineMethodBase]] = dict(zip(KINDS, (OnlineLinearMethodBase, OnlineMoEMethodBase)))
"""The base method class of each layer kind (:data:`oqcore.kinds.KINDS` order)."""
