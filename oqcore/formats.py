"""Quantized tensors and quantizer implementations: the tensor half of the plugin contract.

A plugin describes each quantization key it owns with one :class:`KeyFormat`: the names of the
tensors a quantized tensor is made of (``qdata``, ``scale``, an optional ``global_scale``, ...),
how many logical values one stored element of ``qdata`` holds (2 for 4-bit values packed two per
byte), the reference dequantizer, and its :class:`QuantizerImpl` s. Every implementation of one key
produces the same bytes; they differ in speed and in where they run, so they are oracle candidates
(:func:`oqcore.oracle.select_quantizer`), exactly as forward backends are.

The core holds no format knowledge: it calls quantizers and dequantizers, checks what they return
against the :class:`KeyFormat`, and stores the named tensors as the layer's parameters
(``weight`` for ``qdata``, ``weight_<name>`` for the others). Nothing here imports the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel

from oqcore.errors import NonFiniteError, OqError, PluginError, UnsupportedLayerError
from oqcore.keys import QuantKey

REFERENCE = "torch"
"""Name of every key's reference quantizer implementation: the float32 torch code that defines the
numbers, runs anywhere (the meta device included) and that every other implementation must match
byte for byte."""

DATA = "qdata"
"""Name of the tensor holding the quantized values; a layer stores it under the weight's own name."""

HP_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
"""The high-precision dtypes a quantizer takes (and :func:`oqcore.reload_weights` accepts)."""

QuantizerSupport = Callable[[torch.device, tuple[int, ...], torch.dtype], "tuple[bool, str]"]


def any_input(device: torch.device, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[bool, str]:
    """An ``is_supported`` accepting every input (for reference implementations)."""
    return True, "runs on any device"


def dtype_names(dtypes: tuple[torch.dtype, ...] = HP_DTYPES) -> str:
    """``"float32, bfloat16, float16 or float64"``: dtypes for an error message."""
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


@dataclass(frozen=True)
class QuantizerImpl:
    """One implementation of a key's quantizer: an oracle candidate, like a forward backend.

    - ``name``: short id (``"torch"`` for the reference; a plugin's own names for the others, e.g.
      ``"triton"``, ``"cpu"``); pinned with ``quantize_tensor(..., quantizer=name)`` or ``OQ_QUANTIZER``.
    - ``quantize(w, options)``: ``w`` ``[N, K]`` / ``[E, N, K]`` (activations ``[M, K]``) in a
      high-precision dtype -> a mapping of the :class:`KeyFormat` 's tensor names to tensors, or
      the tuple of them in that order (``(qdata, scale)``). Never modifies ``w``.
    - ``is_supported(device, shape, dtype) -> (ok, reason)``: whether it takes an input of this
      shape and dtype on this device (a compiler present, a GPU, a size above which compiling pays
      off); ``reason`` says why either way.
    - ``priority``: higher wins among the supported (ties by name, never by registration order).
    - ``checks_finite``: ``quantize`` raises :class:`oqcore.NonFiniteError` for NaN/Inf itself, so
      the core skips its own pass over the tensor.
    - ``whole_stack``: an ``[E, N, K]`` expert stack in one call needs no memory beyond the outputs;
      otherwise the core calls it once per expert.
    - ``takes_amax``: ``quantize(w, options, amax=a)`` accepts an externally reduced amax (tensor
      parallelism: :func:`shared_amax_grid`). ``a`` is float32, the max ``|x|`` of every group of the
      key's *outermost* scale level (``scale2`` when the key has one, else ``scale``) over the whole
      unsharded tensor, laid out as that level's grid for ``w`` (:func:`amax_grid` 's shape: per
      tensor ``[*lead, 1, 1]``, per channel ``[*lead, N, 1]``); ``w`` is this rank's slice, cut on
      that level's group boundaries. The implementation uses ``a`` where it would have computed
      those groups' amax from ``w``, so the slice gets exactly the bytes it has in the quantized
      whole tensor. The scheme math (scale from amax) stays in the plugin.
    - ``dequantize``, ``key``, ``plugin``: filled in by the core from the :class:`KeyFormat` and
      the registering plugin.
    """

    name: str
    quantize: Callable[..., Any]
    priority: int = 0
    is_supported: QuantizerSupport = any_input
    checks_finite: bool = False
    whole_stack: bool = False
    takes_amax: bool = False
    description: str = ""
    dequantize: Callable[..., torch.Tensor] | None = None
    key: QuantKey | None = None
    plugin: str = ""

    @property
    def backend(self) -> str:
        """The implementation's name (the v1 contract called it the quantizer's backend)."""
        return self.name


@dataclass(frozen=True)
class KeyFormat:
    """Everything about one key's quantized form.

    - ``key``: the :class:`oqcore.QuantKey`.
    - ``tensors``: the names of the tensors a quantized tensor is made of, ``qdata`` first
      (e.g. ``("qdata", "scale")``, NVFP4-like formats ``("qdata", "scale", "global_scale")``).
      A layer stores ``qdata`` as ``weight`` and each other one as ``weight_<name>``.
    - ``values_per_element``: logical values one element of ``qdata``'s last dim holds (2 for two
      4-bit values per ``uint8``); ``qdata`` then has ``ceil(K / values_per_element)`` columns.
    - ``dequantize(*tensors, dtype, options)``: the reference dequantizer, called with the tensors
      positionally in ``tensors`` order (``(qdata, scale, dtype, options)``, the v1 signature, for
      the default names); returns the logical ``[..., K]`` tensor in ``dtype``.
    - ``implementations``: the :class:`QuantizerImpl` s, one of them named :data:`REFERENCE`.
    - ``element``: the element format's standard name (``"e4m3fn"``, ``"int8"``, ``"e2m1"``), for
      documentation and serialization.
    - ``compressed_tensors``: the key as compressed-tensors' ``QuantizationArgs`` fields (as
      ``weights`` or ``input_activations`` of a config group), e.g. ``{"num_bits": 8, "type":
      "float", "symmetric": True, "strategy": "channel", "dynamic": False}``; ``None`` when the
      serving format has no equivalent.
    - ``static_quantize(x, state, options) -> qdata``: for a key with static scales used as an
      *activation* key (calibrated input scales, e.g. llm-compressor's FP8 preset): quantize
      ``x [M, K]`` with the stored ``state`` (``{name: tensor}`` for every tensor but ``qdata``,
      float32 ``[1]`` each: a static activation scale is per tensor, it cannot depend on the
      number of tokens). ``None``: the key cannot be a static activation. A layer running such a
      key holds the state as parameters (:func:`input_param`), read from the checkpoint, saved
      with the layer and kept by :func:`oqcore.reload_weights`.
    - ``fused_outer_scale``: the serving engine runs fused siblings (``q/k/v_proj`` as one
      ``qkv_proj``, ``gate/up_proj`` as one ``gate_up_proj``) with one outermost scale and does not
      re-quantize them (vLLM, NVFP4's global scale): the core then quantizes such siblings with
      their shared per-tensor amax (:mod:`oqcore.loading.siblings`, through ``takes_amax``).
    """

    key: QuantKey
    dequantize: Callable[..., torch.Tensor]
    implementations: tuple[QuantizerImpl, ...]
    tensors: tuple[str, ...] = (DATA, "scale")
    values_per_element: int = 1
    element: str = ""
    compressed_tensors: Mapping[str, Any] | None = None
    static_quantize: Callable[..., torch.Tensor] | None = None
    fused_outer_scale: bool = False

    @property
    def is_static_activation(self) -> bool:
        """Whether this key, used as an activation key, quantizes with stored (calibrated) scales."""
        return bool(self.key.scale.static)

    def activation_state(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """``{tensor name: (shape, dtype)}`` a layer keeps for this key as a static activation
        (every tensor but ``qdata``, ``[1]`` in the scale dtype); empty for a dynamic key."""
        if not self.is_static_activation:
            return {}
        return {n: ((1,), self.key.scale.dtype) for n in self.tensors if n != DATA}

    def fake_quantize_static(self, x: torch.Tensor, state: Mapping[str, torch.Tensor], options: BaseModel | None) -> torch.Tensor:
        """``x [M, K]`` quantized with the stored ``state`` and dequantized, in float32."""
        if self.static_quantize is None:
            raise PluginError(f"the format of key {self.key} has no static_quantize: it cannot be a static activation key")
        q = self.static_quantize(x, state, options)
        return self.dequantize(q, *(state[n] for n in self.tensors if n != DATA), torch.float32, options)

    @property
    def reference(self) -> QuantizerImpl:
        """The :data:`REFERENCE` implementation."""
        for impl in self.implementations:
            if impl.name == REFERENCE:
                return impl
        raise PluginError(f"the format of key {self.key} has no {REFERENCE!r} reference quantizer")

    def implementation(self, name: str) -> QuantizerImpl | None:
        """The implementation called ``name``, or ``None``."""
        return next((i for i in self.implementations if i.name == name), None)

    def stored_shape(self, shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
        """The shape of ``qdata`` for a logical ``shape`` (last dim divided by the packing, rounded up)."""
        shape = tuple(shape)
        return (*shape[:-1], -(-shape[-1] // self.values_per_element))

    def param_name(self, prefix: str, tensor: str) -> str:
        """The layer parameter holding ``tensor`` of a weight called ``prefix``: ``weight`` for
        ``qdata``, ``weight_scale`` for ``scale``."""
        return prefix if tensor == DATA else f"{prefix}_{tensor}"


def input_param(prefix: str, tensor: str) -> str:
    """The layer parameter holding static-activation ``tensor`` of the input of the weight called
    ``prefix``: ``weight`` -> ``input_scale``, ``w13_weight`` -> ``w13_input_scale`` (vLLM's and
    compressed-tensors' names)."""
    base = prefix[: -len("weight")] if prefix.endswith("weight") else f"{prefix}_"
    return f"{base}input_{tensor}"


@dataclass
class QuantizedTensor:
    """A quantized tensor: its named tensors (``qdata`` first, in the :class:`KeyFormat` 's order),
    the logical (dequantized) ``shape``, the ``key`` and the quantizer ``options`` it was made with.

    ``qdata`` may be packed (``shape[-1]`` logical values in fewer stored columns); scales are laid
    out per the key's group shape (float32, or e8m0 exponents stored as ``torch.float8_e8m0fnu``).
    It unpacks to its tensors in order: ``qdata, scale = quantize_tensor(w, "fp8_per_tensor_static")``.
    """

    tensors: dict[str, torch.Tensor]
    key: QuantKey
    shape: torch.Size
    options: BaseModel | None = None
    format: KeyFormat | None = field(default=None, repr=False, compare=False)

    @property
    def qdata(self) -> torch.Tensor:
        """The quantized values (possibly packed)."""
        return self.tensors[DATA]

    @property
    def scale(self) -> torch.Tensor | None:
        """The (first-level) scales, or ``None`` if the format has none."""
        return self.tensors.get("scale")

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.tensors.values())

    def __len__(self) -> int:
        return len(self.tensors)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The logical tensor in ``dtype``, by the owning plugin's reference dequantizer."""
        if self.format is None:
            raise PluginError(f"QuantizedTensor of key {self.key} carries no format to dequantize with")
        return dequantize(self.format, self.tensors, dtype, self.options)


def dequantize(fmt: KeyFormat, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, options: BaseModel | None) -> torch.Tensor:
    """``fmt.dequantize(*tensors in the format's order, dtype, options)``."""
    return fmt.dequantize(*(tensors[n] for n in fmt.tensors), dtype, options)


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


def require_finite(w: torch.Tensor) -> None:
    """Raise :class:`oqcore.NonFiniteError` if ``w`` holds NaN or Inf (one min/max pass).

    For quantizers declared ``checks_finite=True``, on the paths where their own kernel does not
    run (no compiler, an unsupported dtype): they must raise whichever way they quantize. A meta
    tensor has no values: it passes (a meta-device dry run gives the output shapes and dtypes).
    """
    if w.is_meta or w.numel() == 0:
        return
    lo, hi = torch.aminmax(w.detach())
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise NonFiniteError(f"tensor of shape {list(w.shape)} holds NaN/Inf")


def check_finite(w: torch.Tensor, name: str) -> None:
    """Raise :class:`oqcore.UnsupportedLayerError` naming ``name`` if ``w`` holds NaN or Inf.

    For an ``[E, N, K]`` stack the error names the first expert holding one (``name[expert e]``),
    with that expert's count, and lists the other experts affected. A meta tensor passes.
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


def run_quantizer(
    fmt: KeyFormat, impl: QuantizerImpl, w: torch.Tensor, options: BaseModel | None, name: str, key_name: str
) -> QuantizedTensor:
    """Quantize ``w`` with ``impl`` and hold the implementation to the contract.

    NaN/Inf is checked first (by the core, unless ``impl.checks_finite``). A ``ValueError`` means
    "input this implementation cannot take" and becomes an :class:`oqcore.UnsupportedLayerError`
    naming ``name`` and the plugin; an :class:`oqcore.OqError` passes through (a
    :class:`oqcore.NonFiniteError` re-raised naming the layer and expert); anything else, or a
    result that is not ``fmt`` 's tensors with ``qdata`` of the packed input shape, is a
    :class:`oqcore.PluginError` (chained). ``key_name`` names the key in messages.
    """
    if not impl.checks_finite:
        check_finite(w, name)
        return _call(fmt, impl, w, options, name, key_name)
    try:
        return _call(fmt, impl, w, options, name, key_name)
    except NonFiniteError:
        check_finite(w, name)  # names the layer (and expert) with the count
        raise


def _call(fmt: KeyFormat, impl: QuantizerImpl, w: torch.Tensor, options: BaseModel | None, name: str, key_name: str) -> QuantizedTensor:
    where = f"quantizer {key_name!r} (implementation {impl.name!r}) of plugin {impl.plugin!r}"
    try:
        with torch.no_grad():  # not differentiable: a Parameter given in gets plain tensors out
            out = impl.quantize(w, options)
    except OqError:
        raise
    except ValueError as e:
        raise UnsupportedLayerError(name, f"the {where} cannot take shape {list(w.shape)} {w.dtype}: {e}") from e
    except Exception as e:
        raise PluginError(
            f"plugin {impl.plugin!r}: {where} failed on tensor {name!r} (shape {list(w.shape)}, {w.dtype}): "
            f"{type(e).__name__}: {e}"
        ) from e
    tensors = _named(fmt, out)
    if tensors is None:
        expected = ", ".join(fmt.tensors)
        raise PluginError(
            f"plugin {impl.plugin!r}: {where} returned {type(out).__name__} for tensor {name!r}; expected the "
            f"tensors ({expected}) as a tuple in that order or a mapping by name"
        )
    stored = fmt.stored_shape(w.shape)
    if tuple(tensors[DATA].shape) != stored:
        rule = "must keep the input's shape" if fmt.values_per_element == 1 else (
            f"must be {stored} ({fmt.values_per_element} values per element along the last dim)"
        )
        raise PluginError(
            f"plugin {impl.plugin!r}: {where} returned qdata of shape {list(tensors[DATA].shape)} for tensor "
            f"{name!r} of shape {list(w.shape)}; qdata {rule}"
        )
    return QuantizedTensor(tensors, fmt.key, w.shape, options, fmt)


def _named(fmt: KeyFormat, out: Any) -> dict[str, torch.Tensor] | None:
    """``out`` as ``{name: tensor}`` in the format's order, or ``None`` if it is not the format's tensors."""
    if isinstance(out, Mapping):
        if set(out) != set(fmt.tensors):
            return None
        out = tuple(out[n] for n in fmt.tensors)
    if not (isinstance(out, tuple) and len(out) == len(fmt.tensors) and all(isinstance(t, torch.Tensor) for t in out)):
        return None
    return dict(zip(fmt.tensors, out))
