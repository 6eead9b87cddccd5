"""Every private torch / transformers API oqcore relies on, each wrapped once, with a fallback.

oqcore places tensors into modules it did not build (a meta-device transformers model, a user's
model in :func:`oqcore.quantize_`) and reuses memory across layers; a few of these things have no
public API. Each function below names the private API it uses, why, and what it does when that API
is gone (a torch or transformers release may drop any of them): the fallback keeps results correct,
at worst slower or using more memory. Nothing else under ``oqcore/`` touches these private names.

A leaf module: it imports only torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# ---- a module's own parameters and buffers (torch.nn.Module internals) ----------------------------
#
# nn.Module keeps a module's own parameters in the dict ``module._parameters`` (a ``None`` value is
# a declared but absent parameter, e.g. ``bias=None``) and its buffers in ``module._buffers``.
# oqcore edits these dicts directly instead of calling ``register_parameter`` / ``register_buffer``
# because
#   - the public calls run the global registration hooks and can be patched by init contexts
#     (accelerate's ``init_empty_weights`` patches ``register_parameter`` to move every new
#     parameter to the meta device), which would move or re-wrap the tensors we place;
#   - ``register_buffer`` needs the persistence flag again, while an edit keeps the module's own
#     ``_non_persistent_buffers_set`` as it was;
#   - a ``None`` slot must stay a ``None`` slot (``bias=None`` is saved and loaded as absent).
# The fallback, for a torch whose Module no longer keeps these dicts, goes through the public API.


def _dict_of(module: nn.Module, kind: str) -> dict | None:
    d = module.__dict__.get(kind)
    return d if isinstance(d, dict) else None


def has_parameter(module: nn.Module, name: str) -> bool:
    """Whether ``module`` declares an own parameter ``name``, even a ``None`` one (``bias=None``)."""
    params = _dict_of(module, "_parameters")
    if params is not None:
        return name in params
    return name in dict(module.named_parameters(recurse=False, remove_duplicate=False))


def get_parameter(module: nn.Module, name: str) -> nn.Parameter | None:
    """``module``'s own parameter ``name``, or ``None`` (absent, or declared as ``None``)."""
    params = _dict_of(module, "_parameters")
    if params is not None:
        return params.get(name)
    return dict(module.named_parameters(recurse=False, remove_duplicate=False)).get(name)


def own_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of ``module``'s own parameters in registration order, ``None`` slots
    left out and a tensor registered under two names listed under both (unlike
    ``named_parameters``, which drops the second)."""
    params = _dict_of(module, "_parameters")
    if params is not None:
        return {k: p for k, p in params.items() if p is not None}
    return dict(module.named_parameters(recurse=False, remove_duplicate=False))


def set_parameter(module: nn.Module, name: str, value: torch.Tensor | None) -> nn.Parameter | None:
    """Make ``value`` ``module``'s own parameter ``name`` (replacing one of that name in its place,
    else added last) and return what was stored: an ``nn.Parameter`` is stored as is, any other
    tensor is wrapped in a frozen one (``requires_grad=False``), ``None`` declares the slot empty."""
    if value is not None and not isinstance(value, nn.Parameter):
        value = nn.Parameter(value, requires_grad=False)
    params = _dict_of(module, "_parameters")
    if params is not None:
        params[name] = value
    else:
        module.register_parameter(name, value)
    return value


def delete_parameter(module: nn.Module, name: str) -> None:
    """Remove ``module``'s own parameter slot ``name`` (a ``None`` slot too); nothing if absent."""
    params = _dict_of(module, "_parameters")
    if params is not None:
        params.pop(name, None)
    elif has_parameter(module, name):
        delattr(module, name)


def clear_parameters(module: nn.Module) -> None:
    """Give ``module`` a new, empty set of own parameters (``None`` slots included). The old dict
    is replaced, not emptied, so a module sharing it (a shallow copy) keeps its parameters."""
    if _dict_of(module, "_parameters") is not None:
        module.__dict__["_parameters"] = {}
    else:
        for name in list(own_parameters(module)):
            delattr(module, name)


def get_buffer(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module``'s own buffer ``name``, or ``None``."""
    bufs = _dict_of(module, "_buffers")
    if bufs is not None:
        return bufs.get(name)
    return dict(module.named_buffers(recurse=False, remove_duplicate=False)).get(name)


def own_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: buffer}`` of ``module``'s own buffers in registration order (``None`` left out)."""
    bufs = _dict_of(module, "_buffers")
    if bufs is not None:
        return {k: b for k, b in bufs.items() if b is not None}
    return dict(module.named_buffers(recurse=False, remove_duplicate=False))


def is_persistent_buffer(module: nn.Module, name: str) -> bool:
    """Whether ``module``'s own buffer ``name`` is saved in ``state_dict`` (not registered with
    ``persistent=False``). Reads nn.Module's ``_non_persistent_buffers_set``; fallback: whether
    the module's ``state_dict`` lists it."""
    names = module.__dict__.get("_non_persistent_buffers_set")
    if isinstance(names, set):
        return name not in names
    return name in module.state_dict(keep_vars=True)


def set_buffer(module: nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
    """Replace ``module``'s existing buffer ``name`` with ``value``, keeping whether it is
    persistent (saved in ``state_dict``); returns ``value``."""
    bufs = _dict_of(module, "_buffers")
    if bufs is not None:
        bufs[name] = value
    else:
        setattr(module, name, value)  # nn.Module keeps an existing buffer's persistence on assignment
    return value


def bare_copy(module: nn.Module) -> nn.Module:
    """A new module of ``module``'s type sharing its attributes and child modules (the same
    objects), with no parameters or buffers of its own; ``__init__`` is not run and ``module`` is
    not changed.

    Relies on nn.Module keeping parameters, buffers and children in the dicts ``_parameters``,
    ``_buffers`` (with ``_non_persistent_buffers_set``) and ``_modules`` of the instance
    ``__dict__``: a copy of that ``__dict__`` with fresh such dicts is a fresh module. Fallback (a
    Module kept otherwise): ``copy.deepcopy`` that shares every child module and every attribute
    that is not a container, and copies the containers with the module's own tensors left out
    (so nothing of the original is shared that the copy could change)."""
    if any(_dict_of(module, k) is None for k in ("_parameters", "_buffers", "_modules")):
        import copy

        own = [*own_parameters(module).values(), *own_buffers(module).values()]
        memo: dict[int, object] = {id(t): None for t in own}
        memo.update({id(c): c for c in module.children()})
        memo.update({id(v): v for v in vars(module).values() if not isinstance(v, (dict, list, set))})
        new = copy.deepcopy(module, memo)
        for name in [*own_parameters(module), *own_buffers(module)]:
            if hasattr(new, name):
                delattr(new, name)
        return new
    new = type(module).__new__(type(module))
    new.__dict__ = dict(module.__dict__)
    new.__dict__["_parameters"] = {}
    new.__dict__["_buffers"] = {}
    new.__dict__["_non_persistent_buffers_set"] = set()
    new.__dict__["_modules"] = dict(module.__dict__["_modules"])
    return new


# ---- storage reference counts (torch._C) ---------------------------------------------------------


def storage_use_count(t: torch.Tensor) -> int | None:
    """How many references (tensors and views) hold ``t``'s storage, or ``None`` where torch does
    not tell.

    Uses ``torch._C._storage_Use_Count`` (torch's own tests use it; there is no public API), so the
    loader's staging pool can tell that nothing but the pool holds a buffer before lending it to
    the next layer. Fallback ``None``: the pool then never reuses a buffer (correct, a page fault
    more per page)."""
    fn = getattr(torch._C, "_storage_Use_Count", None)
    if fn is None:
        return None
    try:
        return int(fn(t.untyped_storage()._cdata))
    except (AttributeError, RuntimeError, TypeError):
        return None


# ---- transformers internals ----------------------------------------------------------------------


GateFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _default_gate(module: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """The gated activation of transformers' fused experts without a custom gate:
    ``act_fn(gate) * up`` on the two halves of ``gate_up [T, 2I]`` -> ``[T, I]``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def experts_gate(experts: nn.Module) -> GateFn:
    """The function computing ``experts``' gated activation, ``gate(module, gate_up [T, 2I]) -> [T, I]``,
    to be called with a module holding the same non-tensor attributes (``act_fn``, GPT-OSS's
    ``alpha``/``limit``, ``is_concatenated``...).

    transformers v5's fused-experts classes that gate otherwise than ``act_fn(gate) * up`` (GPT-OSS:
    interleaved halves, clamping, ``alpha``) define the private method ``_apply_gate(self, gate_up)``,
    reading only such attributes; :class:`oqcore.modules.QuantizedMoE` copies them and calls it
    unbound, so the quantized layer computes exactly what the original did. Fallback (no
    ``_apply_gate``): the standard ``act_fn(gate) * up``, what those classes do without one."""
    fn = getattr(type(experts), "_apply_gate", None)
    return fn if callable(fn) else _default_gate


def mark_initialized(obj: nn.Module | torch.Tensor) -> None:
    """Tell transformers not to (re)initialize ``obj`` (a loaded parameter, or a module whose
    tensors are all loaded or quantized) in ``initialize_weights``.

    transformers' private flag ``_is_hf_initialized`` on parameters and modules is what
    ``from_pretrained`` sets on everything it loaded; without it, ``initialize_weights`` would
    overwrite loaded weights with random ones. Fallback: none needed (a transformers that no longer
    reads the flag does not initialize loaded tensors by it); setting it is harmless either way."""
    obj._is_hf_initialized = True
