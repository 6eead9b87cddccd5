/* mxfp8_quant.c: the CPU quantizer of oq-plugin-mxfp8 (built and loaded by oq_plugin_mxfp8.cpu),
   bit-exact with oq_plugin_mxfp8.quant.quantize_mxfp8. No -ffast-math: every float op is one IEEE
   float32 operation, rounding to e4m3 is done with integers (fp8_e4m3.h of oq-plugin-fp8, whose
   csrc directory is on the include path). dt: 0 = float32, 1 = bf16, 2 = fp16. */
#include "oq_kernels.h"
#include "fp8_e4m3.h"
#include "mx_scale.h"

/* ---------------------------------------------------------------------------------------------
   MXFP8 (oq_plugin_mxfp8.quant): blocks of 32 along K, e8m0 exponent bytes, elements saturate to
   +-448, -0.0 stays 0x80 (no zero point). mode 0 = rceil (torchao RCEIL, its float32 log2 rounding
   reproduced with integers as rceil_exponent), 1 = floor (OCP: floor(log2 amax) - 8).
   --------------------------------------------------------------------------------------------- */

/* biased e8m0 byte of the floor rule from amax's float32 bits (finite) */
OQ_INLINE uint32_t mx_floor_exponent(uint32_t amax_bits) {
    int32_t e = (int32_t)((amax_bits >> 23) & 0xFFu) - 127 - 8;
    e = e < -127 ? -127 : (e > 128 ? 128 : e);
    return (uint32_t)(e + 127);
}

/* quantize nb consecutive blocks of 32 from element off; returns the number of blocks holding Inf/NaN */
OQ_INLINE int64_t mx_row(const void* w, int dt, int64_t off, int64_t nb, int mode, uint8_t* q, uint8_t* ex) {
    int64_t bad = 0;
    for (int64_t b = 0; b < nb; b++) {
        int64_t o = off + b * 32;
#ifdef OQ_AVX512
        __m512 x0 = load16(w, dt, o, (__mmask16)0xFFFF), x1 = load16(w, dt, o + 16, (__mmask16)0xFFFF);
        __m512i am = _mm512_set1_epi32(0x7FFFFFFF);
        uint32_t mx = _mm512_reduce_max_epu32(_mm512_max_epu32(_mm512_and_si512(_mm512_castps_si512(x0), am),
                                                               _mm512_and_si512(_mm512_castps_si512(x1), am)));
#else
        uint32_t mx = 0;
        for (int64_t i = 0; i < 32; i++) {
            float v = load1(w, dt, o + i); uint32_t vb; memcpy(&vb, &v, 4); vb &= 0x7FFFFFFFu;
            mx = vb > mx ? vb : mx;
        }
#endif
        if (mx >= 0x7F800000u) { bad++; continue; }
        uint32_t e;
        float f;  /* multiplier (rceil) or divisor (floor) */
        if (mode == 0) {
            e = mx_rceil_exponent(f32_from_bits(mx) / 448.0f);
            f = e == 0 ? 1.0f : f32_from_bits((254u - e < 1u ? 1u : 254u - e) << 23);
        } else {
            e = mx_floor_exponent(mx);
            f = f32_from_bits((e < 1u ? 1u : e) << 23);
        }
        ex[o / 32] = (uint8_t)e;
#ifdef OQ_AVX512
        __m512 s = _mm512_set1_ps(f), hi = _mm512_set1_ps(448.0f), lo = _mm512_set1_ps(-448.0f);
        __m512 y0 = mode == 0 ? _mm512_mul_ps(x0, s) : _mm512_div_ps(x0, s);
        __m512 y1 = mode == 0 ? _mm512_mul_ps(x1, s) : _mm512_div_ps(x1, s);
        y0 = _mm512_min_ps(_mm512_max_ps(y0, lo), hi);
        y1 = _mm512_min_ps(_mm512_max_ps(y1, lo), hi);
        _mm_storeu_si128((__m128i*)(q + o), e4m3_16(y0, 0));
        _mm_storeu_si128((__m128i*)(q + o + 16), e4m3_16(y1, 0));
#else
        for (int64_t i = 0; i < 32; i++) {
            float v = load1(w, dt, o + i), y = mode == 0 ? v * f : v / f;
            y = y > 448.0f ? 448.0f : (y < -448.0f ? -448.0f : y);
            q[o + i] = f32_to_e4m3(y, 0);
        }
#endif
    }
    return bad;
}

#ifdef OQ_AVX512
/* 16 consecutive blocks of 32 (512 elements) from element o, all lanes at once: amax, exponents and
   multipliers as 16-lane vectors (mx_row does the same per block with scalar code). Returns 1 if a
   block holds Inf/NaN (outputs then undefined). */
OQ_INLINE int64_t mx_group16(const void* w, int dt, int64_t o, int mode, uint8_t* q, uint8_t* ex) {
    const __m512i am = _mm512_set1_epi32(0x7FFFFFFF), one = _mm512_set1_epi32(1);
    __m512i v[16];
    for (int b = 0; b < 16; b++) {
        OQ_PREFETCH(w, dt, o + 512 + 32 * b);
        OQ_PREFETCH(w, dt, o + 512 + 32 * b + 16);
        __m512i x0 = _mm512_castps_si512(load16(w, dt, o + 32 * b, (__mmask16)0xFFFF));
        __m512i x1 = _mm512_castps_si512(load16(w, dt, o + 32 * b + 16, (__mmask16)0xFFFF));
        v[b] = _mm512_max_epu32(_mm512_and_si512(x0, am), _mm512_and_si512(x1, am));
    }
    __m512i mx = hmax_epu32_16x16(v);
    if (_mm512_cmpge_epu32_mask(mx, _mm512_set1_epi32(0x7F800000))) return 1;
    __m512i e;
    __m512 f;  /* multiplier (rceil) or divisor (floor) per block */
    if (mode == 0) {
        e = mx_rceil_exponent16(_mm512_div_ps(_mm512_castsi512_ps(mx), _mm512_set1_ps(448.0f)));
        __m512i fe = _mm512_max_epi32(_mm512_sub_epi32(_mm512_set1_epi32(254), e), one);
        fe = _mm512_mask_mov_epi32(fe, _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512()), _mm512_set1_epi32(127));
        f = _mm512_castsi512_ps(_mm512_slli_epi32(fe, 23));
    } else {
        e = _mm512_sub_epi32(_mm512_srli_epi32(mx, 23), _mm512_set1_epi32(127 + 8));
        e = _mm512_min_epi32(_mm512_max_epi32(e, _mm512_set1_epi32(-127)), _mm512_set1_epi32(128));
        e = _mm512_add_epi32(e, _mm512_set1_epi32(127));
        f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_max_epi32(e, one), 23));
    }
    _mm_storeu_si128((__m128i*)(ex + o / 32), _mm512_cvtepi32_epi8(e));
    const __m512 hi = _mm512_set1_ps(448.0f), lo = _mm512_set1_ps(-448.0f);
    for (int b = 0; b < 16; b++) {
        __m512 s = _mm512_permutexvar_ps(_mm512_set1_epi32(b), f);
        __m512 x0 = load16(w, dt, o + 32 * b, (__mmask16)0xFFFF), x1 = load16(w, dt, o + 32 * b + 16, (__mmask16)0xFFFF);
        __m512 y0 = mode == 0 ? _mm512_mul_ps(x0, s) : _mm512_div_ps(x0, s);
        __m512 y1 = mode == 0 ? _mm512_mul_ps(x1, s) : _mm512_div_ps(x1, s);
        y0 = _mm512_min_ps(_mm512_max_ps(y0, lo), hi);
        y1 = _mm512_min_ps(_mm512_max_ps(y1, lo), hi);
        _mm_storeu_si128((__m128i*)(q + o + 32 * b), e4m3_16(y0, 0));
        _mm_storeu_si128((__m128i*)(q + o + 32 * b + 16), e4m3_16(y1, 0));
    }
    return 0;
}
#endif

OQ_INLINE int64_t mx_blocks(const void* w, int dt, int64_t nblocks, int mode, uint8_t* q, uint8_t* ex, int nthreads) {
    int64_t bad = 0, done = 0;
#ifdef OQ_AVX512
    int64_t ngroups = nblocks / 16;
    #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+:bad)
    for (int64_t g = 0; g < ngroups; g++) bad += mx_group16(w, dt, g * 512, mode, q, ex);
    done = ngroups * 16;
#endif
    int64_t rest = nblocks - done, per = (rest + nthreads - 1) / nthreads;
    if (per < 64) per = 64;
    #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+:bad)
    for (int64_t b0 = done; b0 < nblocks; b0 += per)
        bad += mx_row(w, dt, b0 * 32, (b0 + per < nblocks ? b0 + per : nblocks) - b0, mode, q, ex);
    return bad;
}

/* mxfp8 quantizer: w [N, K] contiguous (dt), K % 32 == 0, q [N, K] bytes, ex [N, K/32] e8m0 bytes.
   Blocks never straddle rows, so the tensor is processed as one flat run of N*K/32 blocks. Returns
   nonzero when a block holds Inf/NaN (the caller then uses the torch reference, or raises). */
int64_t oq_mxfp8_quantize(const void* w, int dt, int64_t N, int64_t K, int mode, uint8_t* q, uint8_t* ex, int nthreads) {
    int64_t nb = N * (K / 32);
    switch (dt) {  /* literal dt per call: the inlined block code is specialized per input format */
    case 0: return mx_blocks(w, 0, nb, mode, q, ex, nthreads);
    case 1: return mx_blocks(w, 1, nb, mode, q, ex, nthreads);
    default: return mx_blocks(w, 2, nb, mode, q, ex, nthreads);
    }
}

