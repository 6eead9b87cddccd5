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
:mod:`oqcore.native`.

Rows are spread over OpenMP threads (``torch.get_num_threads()``); the ctypes call releases the GIL.
"""

from __future__ import annotations

import ctypes

import torch

from oqcore.native import C_HELPERS, NativeLibrary

C_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(OQ_GENERIC)
#include <immintrin.h>
#define OQ_AVX512 1
#endif

#define INT8_MAX_F 127.0f
#define ZERO_ROW_SCALE 1.1920928955078125e-07f /* torch.finfo(torch.float32).eps = 2^-23 */


/* element i as float32, exact. dt: 0 = float32, 1 = bf16, 2 = fp16 */
OQ_INLINE float load1(const void* w, int dt, int64_t i) {
    if (dt == 0) return ((const float*)w)[i];
    uint32_t b = ((const uint16_t*)w)[i];
    if (dt == 2) return half_to_f32(b);
    b <<= 16;
    float f; memcpy(&f, &b, 4); return f;
}

OQ_INLINE uint32_t abs_bits(float f) { uint32_t b; memcpy(&b, &f, 4); return b & 0x7FFFFFFFu; }

#ifdef OQ_AVX512
OQ_INLINE __mmask16 tailmask(int64_t r) { return r >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << r) - 1u); }
/* 16 elements from i as float32 (masked lanes 0), exact conversions */
OQ_INLINE __m512 load16(const void* w, int dt, int64_t i, __mmask16 m) {
    if (dt == 0) return _mm512_maskz_loadu_ps(m, (const float*)w + i);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t*)w + i);
    if (dt == 1) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}
#endif

/* One row: returns 1 when it holds Inf/NaN (outputs then undefined), else writes q[K] and *scale. */
OQ_INLINE int quant_row(const void* w, int dt, int64_t off, int64_t K, int8_t* q, float* scale) {
    uint32_t mx = 0;
#ifdef OQ_AVX512
    /* integer max of |x| bits: for non-negative IEEE values integer order is numeric order, and
       NaN > Inf > every finite value, so one compare also detects non-finite rows */
    __m512i vmx = _mm512_setzero_si512(), absmask = _mm512_set1_epi32(0x7FFFFFFF);
    for (int64_t k = 0; k < K; k += 16) {
        /* software prefetch, 2 KB of bf16 ahead: without it the first pass over each row stalls
           on memory (measured 5.6 -> 12.7 GB/s on one thread, 4096x4096 bf16); never faults */
        __builtin_prefetch((const char*)w + (off + k + 1024) * (dt == 0 ? 4 : 2), 0, 3);
        __m512i b = _mm512_castps_si512(load16(w, dt, off + k, tailmask(K - k)));
        vmx = _mm512_max_epu32(vmx, _mm512_and_si512(b, absmask));
    }
    mx = (uint32_t)_mm512_reduce_max_epu32(vmx);
#else
    for (int64_t k = 0; k < K; k++) { uint32_t a = abs_bits(load1(w, dt, off + k)); mx = a > mx ? a : mx; }
#endif
    if (mx >= 0x7F800000u) return 1;
    float amax; memcpy(&amax, &mx, 4);
    float s = amax / INT8_MAX_F;             /* the reference's float32 division */
    if (s == 0.0f) s = ZERO_ROW_SCALE;        /* zero (or underflowed) row: exact zeros, not 0/0 */
    *scale = s;
#ifdef OQ_AVX512
    __m512 vs = _mm512_set1_ps(s), hi = _mm512_set1_ps(INT8_MAX_F), lo = _mm512_set1_ps(-INT8_MAX_F);
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 m = tailmask(K - k);
        __m512 y = _mm512_div_ps(load16(w, dt, off + k, m), vs);
        y = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        y = _mm512_min_ps(_mm512_max_ps(y, lo), hi);
        _mm_mask_storeu_epi8(q + k, m, _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(y)));  /* vpmovdb to memory is slow on AMD */
    }
#else
    for (int64_t k = 0; k < K; k++) {
        float y = rintf(load1(w, dt, off + k) / s);   /* default rounding mode: nearest even */
        y = y > INT8_MAX_F ? INT8_MAX_F : (y < -INT8_MAX_F ? -INT8_MAX_F : y);
        q[k] = (int8_t)y;
    }
#endif
    return 0;
}

/* w [R, K] contiguous (dt) -> q [R, K] int8, scale [R] float32. Returns the number of rows holding
   Inf/NaN (the caller then uses the torch reference for the whole tensor). */
int64_t oq_int8_quantize_rows(const void* w, int dt, int64_t R, int64_t K, int8_t* q, float* scale, int nthreads) {
    int64_t bad = 0;
    #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+:bad)
    for (int64_t r = 0; r < R; r++) {
        /* literal dt per case: the always-inline row body is specialized per input format */
        switch (dt) {
        case 0: bad += quant_row(w, 0, r * K, K, q + r * K, scale + r); break;
        case 1: bad += quant_row(w, 1, r * K, K, q + r * K, scale + r); break;
        default: bad += quant_row(w, 2, r * K, K, q + r * K, scale + r); break;
        }
    }
    return bad;
}
"""

_DT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _bind(lib) -> None:
    """Declare the ctypes signature of ``oq_int8_quantize_rows``."""
    P, I, C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.oq_int8_quantize_rows.argtypes = [P, C, I, I, P, P, C]
    lib.oq_int8_quantize_rows.restype = I


# -lm: the portable (-DOQ_GENERIC) loop calls rintf
LIBRARY = NativeLibrary("oq_int8_cpu", C_HELPERS + C_SOURCE, extra_flags=("-lm",), bind=_bind)
"""The compiled quantizer (built on first use, cached per machine by :mod:`oqcore.native`)."""


def kernel_status() -> tuple[bool, str]:
    """``(compiled quantizer available, reason)``; compiles on first call."""
    return LIBRARY.status()


def quantize_int8_rowwise_cpu(x: torch.Tensor, options=None, lib=None, *, check_finite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """C int8 row-wise quantizer: the bytes and scales of
    :func:`oq_plugin_int8.quant.quantize_int8_rowwise` (``q int8`` like ``x``, ``scale float32 [..., 1]``).

    ``x``: ``[N, K]`` weights, ``[M, K]`` activations or ``[E, N, K]`` expert stacks (rows are
    independent, so each expert gets its own per-row scales exactly as in the reference);
    float32/bf16/fp16 on the CPU. The torch reference runs instead for other dtypes, devices or
    ranks, empty tensors, inputs holding Inf/NaN, or when the library is unavailable (no
    compiler, ``OQ_COMPILE=0``). ``lib`` overrides the library (tests of variant builds).
    ``check_finite``: raise :class:`oqcore.NonFiniteError` for NaN/Inf input on every path instead
    (the registered ``cpu`` quantizer, :func:`quantize_int8_rowwise_checked`).
    """
    from oq_plugin_int8.quant import quantize_int8_rowwise

    lib = lib if lib is not None else LIBRARY.load()
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
    bad = lib.oq_int8_quantize_rows(x.data_ptr(), _DT_CODES[x.dtype], rows, k, q.data_ptr(), scale.data_ptr(), torch.get_num_threads())
    if bad != 0:  # Inf/NaN: the reference defines those bytes
        if check_finite:
            from oqcore.errors import NonFiniteError

            raise NonFiniteError(f"tensor of shape {list(x.shape)} holds NaN/Inf")
        return quantize_int8_rowwise(x, options)
    return q, scale


def quantize_int8_rowwise_checked(x: torch.Tensor, options=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_int8_rowwise_cpu` with ``check_finite=True``: the registered ``cpu`` quantizer."""
    return quantize_int8_rowwise_cpu(x, options, check_finite=True)
