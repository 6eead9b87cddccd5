"""torch.compile (inductor) for CPU quantizers and kernels, with an eager fallback.

Inductor fuses a chain of eager elementwise/reduction ops into one generated C++ loop (measured
17-38x over eager for the quantizers on this project's 2-core machines). Compilation needs a C++
compiler and costs seconds on first call per shape; compiled graphs are cached per input shape
and dtype, so a model whose layers share shapes compiles a handful of times. Where compiling is
impossible (no compiler, an unsupported op), the eager function runs instead, once a warning says so.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

COMPILE_ENV = "OQ_COMPILE"  # "0" disables compiled paths (eager everywhere)
RECOMPILE_LIMIT = 64  # distinct (shape, dtype, static arg) signatures compiled per function


def compile_enabled() -> bool:
    """False when ``OQ_COMPILE=0`` is set."""
    return os.environ.get(COMPILE_ENV, "1") != "0"


class CompiledFn:
    """``fn`` compiled with ``torch.compile(dynamic=False)`` on first call, eager on failure.

    ``first_call_seconds`` records each (shape, dtype) signature's first-call time (compile +
    run), so benchmarks can report compilation apart from steady-state throughput.
    """

    def __init__(self, fn: Callable[..., Any], **compile_kwargs: Any):
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.compile_kwargs = {"dynamic": False, **compile_kwargs}
        self._compiled: Callable[..., Any] | None = None
        self.failed: str | None = None
        self.first_call_seconds: dict[tuple, float] = {}

    def _signature(self, args: tuple) -> tuple:
        return tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args)

    def __call__(self, *args: Any) -> Any:
        if not compile_enabled() or self.failed is not None:
            return self.fn(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, **self.compile_kwargs)
        sig = self._signature(args)
        t = time.perf_counter() if sig not in self.first_call_seconds else None
        try:
            if t is None:
                out = self._compiled(*args)
            else:
                # a new signature is a dynamo recompile of the same code object; past dynamo's
                # default limit (8) it would silently run eager, and a model has more shapes
                import torch._dynamo as dynamo

                with dynamo.config.patch(recompile_limit=max(RECOMPILE_LIMIT, dynamo.config.recompile_limit)):
                    out = self._compiled(*args)
        except Exception as e:  # no C++ compiler, an op inductor cannot lower: stay correct, go eager
            self.failed = f"{type(e).__name__}: {e}"
            warnings.warn(f"torch.compile of {self.fn.__qualname__} failed, running eager: {self.failed}", stacklevel=2)
            return self.fn(*args)
        if t is not None:
            self.first_call_seconds[sig] = time.perf_counter() - t
        return out


def compiled(fn: Callable[..., Any] | None = None, **compile_kwargs: Any):
    """Decorator: ``@compiled`` or ``@compiled(mode=...)`` -> :class:`CompiledFn`."""
    if fn is None:
        return lambda f: CompiledFn(f, **compile_kwargs)
    return CompiledFn(fn, **compile_kwargs)
