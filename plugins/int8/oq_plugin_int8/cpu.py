"""C int8 row-wise quantizer: the ``"cpu"`` quantizer backend of oq-plugin-int8.

One kernel serves both keys (per-channel weights ``[N, K]`` / ``[E, N, K]`` and per-token
activations ``[M, K]``): each row independently gets ``scale = amax / 127`` and
``q = clamp(round_half_even(x / scale), -127, 127)``, the bytes of
:func:`oq_plugin_int8.quant.quantize_int8_rowwise`.

Why bit-exact and not just close: the reference defines the numbers (checkpoints, tests, the
Triton/compiled backends all agree with it byte for byte). So every float operation here is the
reference's single IEEE float32 operation: bf16/fp16 -> float32 is exact, amax is an integer max
of absolute-value bits (also flags Inf/NaN, for which the reference runs instead), ``amax / 127``
and ``x / scale`` are true divisions (no reciprocal multiply), rounding is round-to-nearest-even
(``vrndscaleps`` / ``rintf`` in the default rounding mode). Built without ``-ffast-math`` by
:mod:`oq_toolkit.native`; the source is ``csrc/int8_cpu.c`` (package data), its load helpers
(``load1``, ``load16``, ``tailmask``) oq-toolkit's ``oq_kernels.h``, shared with the fp8 kernels.

Rows are spread over OpenMP threads (``torch.get_num_threads()``; one below 64 Ki elements:
:func:`oq_toolkit.native.threads_for`); the ctypes call releases the GIL.
"""

from __future__ import annotations

import ctypes
from importlib.resources import files

import torch

from oq_toolkit.native import NativeLibrary, threads_for


_DT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _bind(lib) -> None:
    """Declare the ctypes signatures of ``oq_int8_quantize_rows`` and ``oq_int8_quantize_rows_scaled``."""
    P, I, C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.oq_int8_quantize_rows.argtypes = [P, C, I, I, P, P, C]
    lib.oq_int8_quantize_rows.restype = I
    lib.oq_int8_quantize_rows_scaled.argtypes = [P, C, I, I, P, P, C]
    lib.oq_int8_quantize_rows_scaled.restype = I


CSRC_DIR = files("oq_plugin_int8") / "csrc"
"""This plugin's C sources (package data): ``int8_cpu.c``."""

# -lm: the portable (-DOQ_GENERIC) loop calls rintf
LIBRARY = NativeLibrary("oq_int8_cpu", CSRC_DIR / "int8_cpu.c", extra_flags=("-lm",), bind=_bind)
"""The compiled quantizer, ``csrc/int8_cpu.c`` (built on first use, cached per machine by
:mod:`oq_toolkit.native`)."""


def kernel_status() -> tuple[bool, str]:
    """``(compiled quantizer available, reason)``; compiles on first call."""
    return LIBRARY.status()


def quantize_int8_rowwise_cpu(
    x: torch.Tensor, options=None, lib=None, *, check_finite: bool = False, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """C int8 row-wise quantizer: the bytes and scales of
    :func:`oq_plugin_int8.quant.quantize_int8_rowwise` (``q int8`` like ``x``, ``scale float32 [..., 1]``).

    ``x``: ``[N, K]`` weights, ``[M, K]`` activations or ``[E, N, K]`` expert stacks (rows are
    independent, so each expert gets its own per-row scales exactly as in the reference);
    float32/bf16/fp16 on the CPU. The torch reference runs instead for other dtypes, devices or
    ranks, empty tensors, inputs holding Inf/NaN, or when the library is unavailable (no
    compiler, ``OQ_COMPILE=0``). ``lib`` overrides the library (tests of variant builds).
    ``check_finite``: raise :class:`oqcore.NonFiniteError` for NaN/Inf input on every path instead
    (the registered ``cpu`` quantizer, :func:`quantize_int8_rowwise_checked`).

    ``amax``: an externally reduced row amax (float32 ``[..., 1]``, see :mod:`oq_plugin_int8.quant`):
    the scales are made from it by the reference's
    :func:`~oq_plugin_int8.quant.scale_from_amax` and the kernel runs its quantize pass alone
    (``oq_int8_quantize_rows_scaled``, which flags Inf/NaN in ``x`` itself). A non-finite ``amax``
    (the whole tensor holds NaN/Inf) raises :class:`oqcore.NonFiniteError` with ``check_finite``,
    else the reference runs. ``ValueError`` for an ``amax`` of another shape.
    """
    from oq_plugin_int8.quant import quantize_int8_rowwise

    lib = lib if lib is not None else LIBRARY.load()
    if amax is not None:
        return _quantize_scaled(x, options, amax, lib, check_finite)
    if lib is None or x.dim() not in (2, 3) or x.numel() == 0 or x.dtype not in _DT_CODES or x.device.type != "cpu":
        if check_finite:
            from oqcore.tensor import require_finite

            require_finite(x)
        return quantize_int8_rowwise(x, options)
    x = x.contiguous()
    k = x.shape[-1]
    rows = x.numel() // k
    q = torch.empty(x.shape, dtype=torch.int8)
    scale = torch.empty(*x.shape[:-1], 1, dtype=torch.float32)
    bad = lib.oq_int8_quantize_rows(x.data_ptr(), _DT_CODES[x.dtype], rows, k, q.data_ptr(), scale.data_ptr(), threads_for(x.numel()))
    if bad != 0:  # Inf/NaN: the reference defines those bytes
        if check_finite:
            from oqcore.errors import NonFiniteError

            raise NonFiniteError(f"tensor of shape {list(x.shape)} holds NaN/Inf")
        return quantize_int8_rowwise(x, options)
    return q, scale


def _non_finite(what: str):
    from oqcore.errors import NonFiniteError

    return NonFiniteError(what)


def _quantize_scaled(x: torch.Tensor, options, amax: torch.Tensor, lib, check_finite: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_int8_rowwise_cpu` with a given row ``amax`` (checked against ``x``)."""
    from oq_plugin_int8.quant import check_amax, quantize_int8_rowwise, scale_from_amax

    a = check_amax(amax, x)
    if not bool(torch.isfinite(a).all()):
        if check_finite:
            raise _non_finite(f"the amax given for the tensor of shape {list(x.shape)} holds NaN/Inf (so does the whole tensor)")
        return quantize_int8_rowwise(x, options, amax=a)  # the reference defines those bytes
    if lib is None or x.dim() not in (2, 3) or x.numel() == 0 or x.dtype not in _DT_CODES or x.device.type != "cpu":
        if check_finite:
            from oqcore.tensor import require_finite

            require_finite(x)
        return quantize_int8_rowwise(x, options, amax=a)
    x = x.contiguous()
    k = x.shape[-1]
    scale = scale_from_amax(a).contiguous()  # the reference's float32 ops: its scales exactly
    q = torch.empty(x.shape, dtype=torch.int8)
    bad = lib.oq_int8_quantize_rows_scaled(
        x.data_ptr(), _DT_CODES[x.dtype], x.numel() // k, k, scale.data_ptr(), q.data_ptr(), threads_for(x.numel())
    )
    if bad != 0:  # Inf/NaN in x
        if check_finite:
            raise _non_finite(f"tensor of shape {list(x.shape)} holds NaN/Inf")
        return quantize_int8_rowwise(x, options, amax=a)
    return q, scale


def quantize_int8_rowwise_checked(x: torch.Tensor, options=None, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_int8_rowwise_cpu` with ``check_finite=True``: the registered ``cpu`` quantizer
    (``amax``: an externally reduced row amax, float32 ``[..., 1]``)."""
    return quantize_int8_rowwise_cpu(x, options, check_finite=True, amax=amax)
