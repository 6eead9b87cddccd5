"""Section 1: quantizer throughput, in GB/s of bf16 weight read (``numel * 2 / seconds / 1e9``).

For every weight key a plugin registered a quantizer for, on a 4096x4096 bf16 matrix and a
``[8, 1024, 2048]`` expert stack: each oqcore quantizer backend usable on this machine (through
``oqcore.quantize_tensor(w, key, quantizer=...)``; the first call, which compiles for the ``compiled``
backend, is reported apart from the steady state), the peers' eager formulas (:mod:`bench.eager`),
and a bf16 ``copy_`` of the same tensor as the memory-bandwidth ceiling.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bench.common import Budget, gbps, log, measure, not_available
from bench.eager import baselines

SHAPES: dict[str, tuple[int, ...]] = {"4096x4096": (4096, 4096), "experts 8x1024x2048": (8, 1024, 2048)}
COPY = "bf16 copy_"


def weight_key_names() -> list[str]:
    """Names of registered keys that are weight keys and have a ``torch`` reference quantizer."""
    import oqcore

    reg = oqcore.get_registry()
    names = []
    for name in reg.keys.names():
        info = reg.keys.infos[name]
        if info.weight is not None and (info.weight, "torch") in reg.quantizers and name not in names:
            names.append(name)
    return names


def quantizer_backends(key_name: str) -> list[str]:
    """Quantizer backends registered for a weight key, the ``torch`` reference first."""
    import oqcore

    reg = oqcore.get_registry()
    key = reg.resolve_key(key_name, "weight")
    found = sorted({b for (k, b) in reg.quantizers if k == key})
    return sorted(found, key=lambda b: (b != "torch", b))


def skip_reason(backend: str) -> str | None:
    """Why a quantizer backend is not timed here, or ``None``: Triton needs CUDA (its CPU
    interpreter is a correctness tool, orders of magnitude slower)."""
    if backend == "triton" and not torch.cuda.is_available():
        return "Triton kernels need CUDA; the CPU interpreter (TRITON_INTERPRET=1) is for correctness only"
    return None


def _same_bytes(a, b) -> bool:
    qa, qb = a.qdata, b.qdata
    sa, sb = a.scale, b.scale

    def view(t: torch.Tensor) -> torch.Tensor:
        """Byte view of 1-byte tensors (fp8 NaN != NaN otherwise)."""
        return t.view(torch.uint8) if t.element_size() == 1 else t

    return bool(torch.equal(view(qa), view(qb)) and torch.equal(view(sa), view(sb)))


def _row(shape: str, key: str, impl: str, nbytes: int, **kw: Any) -> dict[str, Any]:
    row = {"shape": shape, "key": key, "impl": impl, "bytes": nbytes, "status": "ok"}
    row.update(kw)
    if "median_s" in row:
        row["gbps"] = gbps(nbytes, row["median_s"])
    return row


def run(budget: Budget, shapes: dict[str, tuple[int, ...]] | None = None, quick: bool = False) -> list[dict[str, Any]]:
    """All rows of section 1 (see the module docstring); ``quick`` times only the vLLM eager peer
    on shapes after the first. Each row: ``shape``, ``key``, ``impl``
    (``oqcore <backend>``, a peer label or ``bf16 copy_``), ``bytes`` (bf16 bytes read),
    ``median_s``/``min_s``/``reps``, ``gbps``, ``first_call_s`` (oqcore only), ``same_bytes_as_torch``
    (oqcore non-reference backends) and ``status`` (``ok`` or ``not available: reason``)."""
    import oqcore

    rows: list[dict[str, Any]] = []
    torch.manual_seed(0)
    for i, (shape_name, shape) in enumerate((shapes or SHAPES).items()):
        w = torch.randn(shape, dtype=torch.bfloat16)
        nbytes = w.numel() * w.element_size()
        dst = torch.empty_like(w)
        m = measure(lambda: dst.copy_(w), Budget(max(budget.min_time_s, 0.5), 50))
        rows.append(_row(shape_name, "-", COPY, nbytes, **m))
        for key in weight_key_names():
            reference = None
            for backend in quantizer_backends(key):
                impl = f"oqcore {backend}"
                why = skip_reason(backend)
                if why:
                    rows.append(_row(shape_name, key, impl, nbytes, status=not_available(why)))
                    continue
                log(f"quantizer {shape_name} {key} {impl}")
                try:
                    t = time.perf_counter()
                    out = oqcore.quantize_tensor(w, key, quantizer=backend)
                    first = time.perf_counter() - t
                    m = measure(lambda: oqcore.quantize_tensor(w, key, quantizer=backend), budget)
                except Exception as e:  # a backend that breaks is a finding, not a crash
                    rows.append(_row(shape_name, key, impl, nbytes, status=not_available(e)))
                    continue
                extra: dict[str, Any] = {"first_call_s": first}
                if backend == "torch":
                    reference = out
                elif reference is not None:
                    extra["same_bytes_as_torch"] = _same_bytes(out, reference)
                rows.append(_row(shape_name, key, impl, nbytes, **m, **extra))
            del reference
            for impl, factory in baselines(key).items():
                if quick and i > 0 and impl != "vllm eager":
                    continue
                log(f"quantizer {shape_name} {key} {impl}")
                try:
                    fn = factory()
                    m = measure(lambda: fn(w), budget)
                except Exception as e:
                    rows.append(_row(shape_name, key, impl, nbytes, status=not_available(e)))
                    continue
                rows.append(_row(shape_name, key, impl, nbytes, **m))
    return rows
