"""Putting loaded tensors into a model built on the meta device, and finishing it as transformers does.

Shared by the online loader (:mod:`oqcore.loading.online`, high-precision checkpoints) and the
reader of oqcore exports (:mod:`oqcore.loading.saved`).
"""

from __future__ import annotations

import torch
from torch import nn

from oqcore.errors import CheckpointError
from oqcore.loading.checks import placeholder
from oqcore.torch_compat import (
    get_buffer,
    get_parameter,
    has_parameter,
    mark_initialized,
    own_buffers,
    set_buffer,
    set_parameter,
)


def param_owner(name: str, wrappers: dict[str, nn.Module]) -> str | None:
    """The wrapper owning parameter ``name`` (its module path), or ``None``."""
    owner = name.rpartition(".")[0]
    return owner if owner in wrappers else None


def placeholder_dtype(model: nn.Module, name: str) -> torch.dtype | None:
    """The dtype of the (meta) parameter or buffer ``name`` if floating, else ``None``."""
    t = placeholder(model, name)
    return t.dtype if t is not None and t.is_floating_point() else None


def assign_tensor(model: nn.Module, name: str, value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Put ``value`` at parameter/buffer ``name`` (on ``device``, in the placeholder's dtype) in
    place of its meta placeholder. A floating value takes the placeholder's floating dtype, an
    integer value its integer dtype. Raises :class:`oqcore.CheckpointError` naming the tensor when
    the model has no such tensor, on a shape mismatch, a value of another kind (an integer tensor
    where the model has a floating weight, or the reverse) or a tensor loaded twice."""
    mod_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        raise CheckpointError(f"tensor {name!r} has no place in the model") from None
    is_param = has_parameter(module, attr)
    old = get_parameter(module, attr) if is_param else get_buffer(module, attr)
    if old is None:
        raise CheckpointError(f"tensor {name!r} has no place in the model")
    if not old.is_meta:
        raise CheckpointError(f"tensor {name!r} is loaded twice (the checkpoint maps two tensors onto it)")
    if tuple(value.shape) != tuple(old.shape):
        raise CheckpointError(
            f"tensor {name!r} has shape {list(value.shape)} in the checkpoint, the model expects {list(old.shape)}"
        )
    if _kind(value.dtype) != _kind(old.dtype):
        raise CheckpointError(
            f"tensor {name!r} is {str(value.dtype).removeprefix('torch.')} in the checkpoint, the model expects "
            f"{str(old.dtype).removeprefix('torch.')} ({_kind(old.dtype)})"
        )
    new = value.to(device=device, dtype=old.dtype)
    if is_param:
        param = nn.Parameter(new, requires_grad=False)
        mark_initialized(param)  # transformers' initialize_weights must not touch it
        return set_parameter(module, attr, param)
    return set_buffer(module, attr, new)


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating" if dtype.is_floating_point else "integer"


def finalize(model: nn.Module, device: torch.device, wrappers: dict[str, nn.Module], source: str) -> None:
    """Materialize meta buffers, let transformers initialize what it computes itself (rotary
    frequencies, position ids), tie weights, then fail on any parameter still unloaded.
    Raises :class:`oqcore.CheckpointError` naming ``source`` and the weights never loaded."""
    from_pretrained_like = hasattr(model, "initialize_weights")
    for _, module in model.named_modules():
        for attr, buf in own_buffers(module).items():
            if buf.is_meta:
                set_buffer(module, attr, torch.empty_like(buf, device=device))
    for w in wrappers.values():
        mark_initialized(w)
    if from_pretrained_like:
        for p in model.parameters():
            if not p.is_meta:
                mark_initialized(p)
        tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
        missing = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta and n not in tied]
        if missing:
            raise CheckpointError(_missing_message(missing, source))
        # transformers computes non-persistent buffers (rotary inv_freq, position ids) in _init_weights
        model.initialize_weights()
        model.tie_weights()
    missing = [n for n, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    if missing:
        raise CheckpointError(_missing_message(missing, source))


def _missing_message(missing: list[str], source: str) -> str:
    shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
    return f"{source}: the checkpoint has no tensor for {len(missing)} model weight(s): {shown}"
