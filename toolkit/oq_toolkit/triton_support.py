"""Whether Triton kernels can run on a device: shared by every scheme plugin's ``triton`` backends.

On CUDA they need Triton installed, a minimum compute capability and one active Triton GPU driver
(Triton raises ``RuntimeError: 0 active drivers`` at the first launch otherwise, e.g. a Triton
build without the CUDA backend, or a driver library it cannot load). On the CPU they run only under
Triton's interpreter (``TRITON_INTERPRET=1``, how the kernels are tested without a GPU), so users
never get the slow interpreted path by accident; a kernel module imported *before*
``TRITON_INTERPRET=1`` was set holds kernels compiled for a GPU driver and is rejected as well
(Triton reads the variable when the ``@triton.jit`` decorators run). ``OQ_DISABLE_TRITON=1`` turns
every Triton backend off (e.g. to compare backends, or in tests that want the CPU backends while
the interpreter is on).

Backends call :func:`triton_support` from their ``is_supported``, so the oracle rejects a Triton
backend that cannot run with the reason (and :class:`oqcore.NoBackendError` lists it when the
backend is pinned); :func:`guard_driver` wraps their forwards so that a driver failure that still
happens at run time (the environment changed after planning) is a :class:`oqcore.NoBackendError`
naming the layer, never a raw ``RuntimeError``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Callable

import torch

from oqcore.errors import NoBackendError

DISABLE_ENV = "OQ_DISABLE_TRITON"


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def driver_status() -> tuple[bool, str]:
    """``(ok, reason)`` for Triton's GPU driver: ok when exactly one Triton backend driver is active.

    Imports Triton. ``reason`` quotes Triton's own error when there is none (``0 active drivers``)
    or it cannot initialize.
    """
    try:
        from triton.runtime import driver

        target = driver.active.get_current_target()
    except Exception as e:  # RuntimeError("0 active drivers ..."), a driver library that fails to load
        return False, f"Triton has no usable GPU driver ({type(e).__name__}: {' '.join(str(e).split())})"
    return True, f"Triton driver {getattr(target, 'backend', type(target).__name__)}"


def compiled_kernel_modules(kernel_package: str) -> list[str]:
    """Already-imported modules under ``kernel_package`` whose ``@triton.jit`` functions were built
    for a GPU driver (imported while ``TRITON_INTERPRET`` was unset), sorted."""
    prefix = kernel_package + "."
    names = [n for n in list(sys.modules) if n == kernel_package or n.startswith(prefix)]
    if not names or "triton" not in sys.modules:
        return []
    from triton.runtime.jit import JITFunction

    bad = []
    for n in names:
        mod = sys.modules.get(n)
        if mod is not None and any(isinstance(v, JITFunction) for v in vars(mod).values()):
            bad.append(n)
    return sorted(bad)


def triton_support(
    device: torch.device | str, min_capability: tuple[int, int] = (8, 0), kernel_package: str | None = None
) -> tuple[bool, str]:
    """``(ok, reason)`` for running Triton kernels on ``device``.

    ``min_capability`` is the CUDA compute capability the kernel needs, e.g. ``(8, 9)`` for
    float8_e4m3fn tensor-core dots (Ada, Hopper) or ``(8, 0)`` for kernels that only load fp8/int8
    and compute in bf16/fp32. ``kernel_package`` (e.g. ``"oq_plugin_fp8.kernels"``) names the
    modules holding the backend's kernels, checked on the CPU for kernels built without the
    interpreter. Never raises: a failing check is a ``(False, reason)``.
    """
    device = torch.device(device)
    if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
        return False, f"disabled by {DISABLE_ENV}=1"
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        cap = torch.cuda.get_device_capability(device)
        if cap < min_capability:
            need = ".".join(map(str, min_capability))
            return False, f"needs CUDA compute capability >= {need}, found {cap[0]}.{cap[1]}"
        ok, why = driver_status()
        if not ok:
            return False, why
        return True, f"CUDA compute capability {cap[0]}.{cap[1]}, {why}"
    if device.type == "cpu" and interpreter_enabled():
        stale = compiled_kernel_modules(kernel_package) if kernel_package else []
        if stale:
            ok, why = driver_status()
            return False, (
                f"TRITON_INTERPRET=1 is set, but {', '.join(stale)} was imported before it was: its kernels "
                f"are built for a GPU driver{'' if ok else f' ({why})'}; set TRITON_INTERPRET=1 before the "
                "first import (a fresh process)"
            )
        return True, "CPU under TRITON_INTERPRET=1 (testing only)"
    return False, f"Triton runs on CUDA (on {device.type} only under TRITON_INTERPRET=1)"


def is_driver_error(e: BaseException) -> bool:
    """True for Triton's "no usable driver" failures (``0 active drivers``, an inactive backend device)."""
    msg = str(e)
    return isinstance(e, RuntimeError) and (
        "active drivers" in msg or ("Backend device" in msg and "not active" in msg)
    )


def guard_driver(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap a Triton backend ``forward(method, layer, x, *args)``: a driver failure at run time
    becomes :class:`oqcore.NoBackendError` naming the layer and what to do; any other exception
    passes through unchanged."""

    @functools.wraps(forward)
    def run(method, layer, x, *args):
        try:
            return forward(method, layer, x, *args)
        except RuntimeError as e:
            if not is_driver_error(e):
                raise
            name = getattr(layer, "layer_name", type(layer).__name__)
            plugin = getattr(method.backend, "plugin", "") or "?"
            raise NoBackendError(
                name,
                f"the triton backend (plugin {plugin!r}) cannot run: Triton has no usable driver ({e}). "
                "Run on a CUDA GPU, set TRITON_INTERPRET=1 before the kernels are first imported (testing), "
                "or load with another backend (e.g. backend.linear=torch / backend.moe=torch)",
            ) from e

    return run
