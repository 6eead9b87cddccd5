"""oqcore: online quantization of PyTorch models, with schemes as plugins.

Public API (stable names):

- keys: :class:`GroupShape`, :class:`ScaleDesc`, :class:`QuantKey`, :func:`quant_key`, :func:`list_quant_keys`
- config: :class:`QuantSpec`, :class:`QuantizationConfig`
- contract: :class:`Scheme`, :class:`KeyFormat`, :class:`QuantizerImpl`, :class:`OnlineMethodBase`,
  :class:`OnlineLinearMethodBase`, :class:`OnlineMoEMethodBase`, :class:`MethodFormats`,
  :class:`Backend`, :data:`hookimpl`
- plugins: :func:`get_plugin_manager`
- planning: :func:`plan`, :class:`QuantPlan`
- tensors: :func:`quantize_tensor`, :class:`QuantizedTensor`
- models: :func:`load` (online), :func:`quantize_` (in place), :func:`reload_weights`, :func:`report`,
  :func:`save_quantized`
- errors: :class:`OqError` and its subclasses
"""

from __future__ import annotations

from oqcore.config import BoundSpec, QuantizationConfig, QuantSpec, ResolvedConfig, resolve
from oqcore.errors import (
    CheckpointError,
    InternalError,
    SaveError,
    ConfigError,
    DistributedError,
    NoBackendError,
    NonFiniteError,
    OqError,
    PluginConflictError,
    PluginError,
    UnknownKeyError,
    UnsupportedLayerError,
)
from oqcore.hookspecs import hookimpl
from oqcore.keys import GroupShape, KeyInfo, QuantKey, Role, ScaleDesc
from oqcore.formats import KeyFormat, QuantizerImpl, any_input
from oqcore.methods import (
    MethodFormats,
    NoOptions,
    OnlineLinearMethodBase,
    OnlineMethodBase,
    OnlineMoEMethodBase,
    expert_loop,
    linear_forward_from,
    moe_forward_from,
)
from oqcore.oracle import (
    Backend,
    BackendChoice,
    Candidate,
    QuantizerCandidate,
    QuantizerChoice,
    always_supported,
    select_backend,
    select_quantizer,
)
from oqcore.scheme import Scheme
from oqcore.planning import LayerPlan, QuantPlan, plan
from oqcore.plugins import PluginWarning, get_plugin_manager, get_registry
from oqcore.tensor import QuantizedTensor, quantize_tensor
from oqcore.loading.online import load
from oqcore.loading.inplace import quantize_
from oqcore.loading.reload import reload_weights
from oqcore.report import Report, report
from oqcore.export import save_quantized

__version__ = "0.1.0"

# Only OqError subclasses leave the public API: anything else is wrapped as an InternalError.
from oqcore.errors import public_api as _public_api  # noqa: E402

load = _public_api(load)
quantize_ = _public_api(quantize_)
reload_weights = _public_api(reload_weights)
report = _public_api(report)
save_quantized = _public_api(save_quantized)
plan = _public_api(plan)
quantize_tensor = _public_api(quantize_tensor)
select_backend = _public_api(select_backend)
select_quantizer = _public_api(select_quantizer)
resolve = _public_api(resolve)
any_input = _public_api(any_input)
expert_loop = _public_api(expert_loop)
linear_forward_from = _public_api(linear_forward_from)
moe_forward_from = _public_api(moe_forward_from)
get_registry = _public_api(get_registry)
get_plugin_manager = _public_api(get_plugin_manager)
always_supported = _public_api(always_supported)


@_public_api
def quant_key(name: str, role: Role = "weight") -> QuantKey:
    """The :class:`QuantKey` a registered name means in ``role`` (``"weight"`` or ``"activation"``).

    Role-aware: ``quant_key("mxfp8")`` is the static 1x32-block weight key,
    ``quant_key("mxfp8", "activation")`` the dynamic one. Raises :class:`UnknownKeyError` (with a
    did-you-mean) for an unknown name and :class:`ConfigError` when the name has no meaning in ``role``.
    """
    if role not in ("weight", "activation"):
        raise ConfigError(f"role must be 'weight' or 'activation', got {role!r}", "role")
    return get_registry().keys.resolve(name, role)


@_public_api
def list_quant_keys() -> list[KeyInfo]:
    """Every registered key name, sorted: its aliases, its key per role and the providing plugin."""
    keys = get_registry().keys
    return [keys.infos[n] for n in keys.names()]


__all__ = [
    "Backend",
    "BackendChoice",
    "BoundSpec",
    "Candidate",
    "CheckpointError",
    "ConfigError",
    "DistributedError",
    "GroupShape",
    "InternalError",
    "KeyFormat",
    "KeyInfo",
    "LayerPlan",
    "MethodFormats",
    "NoBackendError",
    "NoOptions",
    "NonFiniteError",
    "OnlineLinearMethodBase",
    "OnlineMethodBase",
    "OnlineMoEMethodBase",
    "OqError",
    "PluginConflictError",
    "PluginError",
    "PluginWarning",
    "QuantKey",
    "QuantPlan",
    "QuantSpec",
    "ResolvedConfig",
    "QuantizationConfig",
    "QuantizedTensor",
    "QuantizerCandidate",
    "QuantizerChoice",
    "QuantizerImpl",
    "Report",
    "SaveError",
    "ScaleDesc",
    "Scheme",
    "UnknownKeyError",
    "UnsupportedLayerError",
    "always_supported",
    "any_input",
    "expert_loop",
    "linear_forward_from",
    "moe_forward_from",
    "get_plugin_manager",
    "get_registry",
    "hookimpl",
    "list_quant_keys",
    "load",
    "plan",
    "quant_key",
    "quantize_",
    "quantize_tensor",
    "reload_weights",
    "report",
    "resolve",
    "save_quantized",
    "select_backend",
    "select_quantizer",
]
