"""Checking a user-given device before anything is built or moved to it."""

from __future__ import annotations

import torch

from oqcore.errors import ConfigError


def resolve_device(device: str | torch.device | None, field: str = "device") -> torch.device | None:
    """``device`` as a :class:`torch.device` that exists on this machine (``None`` passes through).

    Raises :class:`oqcore.ConfigError` (``field`` names the argument) for a string torch cannot
    parse, a device type this torch build has no backend for or that has no device here (``cuda``
    on a CPU-only machine), or an index past the device count, listing the devices that exist.
    """
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise ConfigError(f"expected a device such as 'cpu' or 'cuda:0', got {type(device).__name__}", field)
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ConfigError(f"{str(device)!r} is not a device ({e}); valid: {', '.join(available_devices())}", field) from None
    if dev.type in ("cpu", "meta"):
        return dev
    module = getattr(torch, dev.type, None)
    count = 0
    if module is not None and hasattr(module, "is_available"):
        try:
            count = module.device_count() if module.is_available() else 0
        except Exception:  # a backend that fails to initialize has no usable device either
            count = 0
    if count == 0:
        raise ConfigError(f"device {str(device)!r}: no {dev.type} device on this machine; valid: {', '.join(available_devices())}", field)
    if dev.index is not None and dev.index >= count:
        raise ConfigError(
            f"device {str(device)!r}: only {count} {dev.type} device(s) here; valid: {', '.join(available_devices())}", field
        )
    return dev


def available_devices() -> list[str]:
    """The device names that exist here: ``cpu`` and ``cuda:0``... when CUDA is available."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return out
