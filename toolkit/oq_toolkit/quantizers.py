"""Quantizer implementation records for the three kinds of fast quantizers the schemes ship.

Every scheme's fast quantizers fall in the same three kinds, with the same rules for where they
run and how they rank, so the rules live here once (the core only compares priorities):

=========  ========  ==========================================================================
name       priority  chosen when
=========  ========  ==========================================================================
triton     100       the tensor is on CUDA and Triton can run there (driver, ``OQ_DISABLE_TRITON``)
cpu        50        the tensor is on the CPU (a C kernel built once per machine; without a
                     compiler, or with ``OQ_COMPILE=0``, it runs the eager reference itself)
compiled   20        the tensor (a whole expert stack) is on the CPU, has at least
                     :data:`COMPILE_MIN_NUMEL` elements and ``OQ_COMPILE`` is not ``0``
torch      0         always (the reference, declared by each scheme)
=========  ========  ==========================================================================

Every one of them produces the reference's bytes (each plugin's tests check it), so the choice is
about speed only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from oqcore import QuantizerImpl

TRITON, NATIVE_CPU, COMPILED = "triton", "cpu", "compiled"

COMPILE_MIN_NUMEL = 1 << 26
"""Compiling costs 5-8 s for the first shape in a process (1-3 s per later shape) and tens of MB of
compiler state, while eager quantizes ~0.1 GB/s and compiled ~2-4 GB/s on this project's machines:
it pays off from tensors (or expert stacks) of ~128 MB of bf16, i.e. multi-GB models."""


def triton_quantizer(quantize: Callable, kernel_package: str, description: str) -> QuantizerImpl:
    """The ``triton`` implementation: chosen for CUDA tensors when Triton can run there (on the
    CPU the interpreter serves the tests, never a load)."""

    def is_supported(device: torch.device, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[bool, str]:
        if device.type != "cuda":
            return False, f"Triton quantizers run on CUDA, the tensor is on {device.type}"
        from oq_toolkit.triton_support import triton_support

        return triton_support(device, kernel_package=kernel_package)

    return QuantizerImpl(TRITON, quantize, priority=100, is_supported=is_supported, description=description)


def _cpu_only(device: torch.device, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, f"a CPU kernel, the tensor is on {device.type}"
    return True, "C kernel on the CPU (the eager reference without a compiler)"


def native_cpu_quantizer(quantize: Callable, description: str, takes_amax: bool = False) -> QuantizerImpl:
    """The ``cpu`` implementation: a C kernel (:mod:`oq_toolkit.native`) that finds NaN/Inf itself
    and quantizes a whole expert stack in one call. ``takes_amax``: ``quantize`` accepts
    ``amax=`` (an externally reduced amax, :attr:`oqcore.QuantizerImpl.takes_amax`)."""
    return QuantizerImpl(
        NATIVE_CPU,
        quantize,
        priority=50,
        is_supported=_cpu_only,
        checks_finite=True,
        whole_stack=True,
        takes_amax=takes_amax,
        description=description,
    )


def _compiled_supported(device: torch.device, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[bool, str]:
    from oq_toolkit.compiled import COMPILE_ENV, compile_enabled

    if device.type != "cpu":
        return False, f"compiled for the CPU, the tensor is on {device.type}"
    if not compile_enabled():
        return False, f"disabled by {COMPILE_ENV}=0"
    numel = math.prod(shape)
    if numel < COMPILE_MIN_NUMEL:
        return False, f"{numel} elements: compiling pays off from {COMPILE_MIN_NUMEL}"
    return True, "torch.compile (inductor C++) of the reference graph"


def compiled_quantizer(quantize: Callable, description: str) -> QuantizerImpl:
    """The ``compiled`` implementation: the reference graph through ``torch.compile`` on the CPU,
    for tensors large enough to pay for compiling."""
    return QuantizerImpl(COMPILED, quantize, priority=20, is_supported=_compiled_supported, description=description)
