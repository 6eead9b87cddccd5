/* int8_cpu.c: the row-wise int8 quantizer of oq-plugin-int8 (built and loaded by oq_plugin_int8.cpu),
   bit-exact with oq_plugin_int8.quant.quantize_int8_rowwise. Shared helpers (OQ_INLINE, OQ_AVX512,
   load1/load16/tailmask, half_to_f32) come from oq_kernels.h (oq-toolkit). */
#include <math.h>

#include "oq_kernels.h"

#define INT8_MAX_F 127.0f
#define ZERO_ROW_SCALE 1.1920928955078125e-07f /* torch.finfo(torch.float32).eps = 2^-23 */

OQ_INLINE uint32_t abs_bits(float f) { uint32_t b; memcpy(&b, &f, 4); return b & 0x7FFFFFFFu; }

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

/* One row with its scale given: the second pass of quant_row alone, which also flags Inf/NaN
   (returns 1 then; q is undefined). */
OQ_INLINE int quant_row_scaled(const void* w, int dt, int64_t off, int64_t K, float s, int8_t* q) {
    int bad = 0;
#ifdef OQ_AVX512
    __m512 vs = _mm512_set1_ps(s), hi = _mm512_set1_ps(INT8_MAX_F), lo = _mm512_set1_ps(-INT8_MAX_F);
    __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF), inf = _mm512_set1_epi32(0x7F800000);
    __mmask16 nf = 0;
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 m = tailmask(K - k);
        __builtin_prefetch((const char*)w + (off + k + 1024) * (dt == 0 ? 4 : 2), 0, 3);
        __m512 x = load16(w, dt, off + k, m);  /* exact: bf16/fp16 Inf/NaN stay Inf/NaN */
        nf |= _mm512_cmpge_epu32_mask(_mm512_and_si512(_mm512_castps_si512(x), absmask), inf);
        __m512 y = _mm512_div_ps(x, vs);
        y = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        y = _mm512_min_ps(_mm512_max_ps(y, lo), hi);
        _mm_mask_storeu_epi8(q + k, m, _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(y)));
    }
    bad = nf != 0;
#else
    for (int64_t k = 0; k < K; k++) {
        float x = load1(w, dt, off + k);
        if (abs_bits(x) >= 0x7F800000u) bad = 1;
        float y = rintf(x / s);
        y = y > INT8_MAX_F ? INT8_MAX_F : (y < -INT8_MAX_F ? -INT8_MAX_F : y);
        q[k] = (int8_t)y;
    }
#endif
    return bad;
}

/* w [R, K] contiguous (dt) and given scales scale [R] float32 (finite, > 0: from an externally
   reduced amax) -> q [R, K] int8. Returns the number of rows holding Inf/NaN (q is then garbage). */
int64_t oq_int8_quantize_rows_scaled(const void* w, int dt, int64_t R, int64_t K, const float* scale, int8_t* q, int nthreads) {
    int64_t bad = 0;
    #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+:bad)
    for (int64_t r = 0; r < R; r++) {
        switch (dt) {
        case 0: bad += quant_row_scaled(w, 0, r * K, K, scale[r], q + r * K); break;
        case 1: bad += quant_row_scaled(w, 1, r * K, K, scale[r], q + r * K); break;
        default: bad += quant_row_scaled(w, 2, r * K, K, scale[r], q + r * K); break;
        }
    }
    return bad;
}
