/* mxfp4_quant.c: the CPU quantizer of oq-plugin-mxfp4 (built and loaded by oq_plugin_mxfp4.cpu),
   bit-exact with oq_plugin_mxfp4.quant.quantize_mxfp4 on finite input. No -ffast-math: every float
   op is one IEEE float32 operation; rounding to e2m1 is fp4_e2m1.h (AVX-512: its _nonan encoder,
   blocks holding NaN never get there). dt: 0 = float32, 1 = bf16,
   2 = fp16 (every load to float32 is exact, oq_kernels.h).

   MXFP4: blocks of 32 along K, e8m0 exponent bytes, e2m1 codes packed two per byte (element 2j in
   the low nibble). mode 0 = rceil (ceil(fl32(log2(amax / 6))), torchao's float32 log2 rounding
   reproduced with integers), 1 = floor (OCP: floor(log2 amax) - 2). Both rules scale by a power of
   two, so the reference's division (floor) equals a multiplication by the exact reciprocal, and the
   encoder saturates (everything above 5 is code 7), so the reference's clamp to +-6 is implicit.
   Blocks holding Inf/NaN are reported (the caller runs the reference or raises). */
#include "oq_kernels.h"
#include "fp4_e2m1.h"
#include "mx_scale.h"  /* oq-plugin-mxfp8's: the e8m0 rules */

/* The e8m0 exponent rules are oq-plugin-mxfp8's (mx_scale.h; rceil_exponent / floor_exponent of
   oq_plugin_mxfp8.quant), with the element maximum 6 (rceil divides amax by 6) and emax 2 (floor). */

/* (exponent byte, multiplier) of one block from its amax bits (finite) */
OQ_INLINE uint32_t mx4_scale(uint32_t mx, int mode, float* mul) {
    uint32_t e;
    if (mode == 0) {
        e = mx_rceil_exponent(f32_from_bits(mx) / 6.0f);
        *mul = e == 0 ? 1.0f : f32_from_bits((254u - e) << 23);        /* e <= 253 for finite amax */
    } else {
        int32_t u = (int32_t)(mx >> 23) - 127 - 2;
        u = u < -127 ? -127 : u;                                   /* <= 125 for finite amax */
        e = (uint32_t)(u + 127);
        *mul = f32_from_bits((254u - (e < 1u ? 1u : e)) << 23);        /* 1 / max(2**(e-127), 2**-126) */
    }
    return e;
}

/* nb consecutive blocks of 32 from element off, scalar; returns the number of blocks holding Inf/NaN */
OQ_INLINE int64_t mx4_row(const void* w, int dt, int64_t off, int64_t nb, int mode, uint8_t* q, uint8_t* ex) {
    int64_t bad = 0;
    for (int64_t b = 0; b < nb; b++) {
        int64_t o = off + b * 32;
        float v[32];
        uint32_t mx = 0;
        for (int i = 0; i < 32; i++) {
            v[i] = load1(w, dt, o + i);
            uint32_t vb; memcpy(&vb, &v[i], 4); vb &= 0x7FFFFFFFu;
            mx = vb > mx ? vb : mx;
        }
        if (mx >= 0x7F800000u) { bad++; continue; }
        float f;
        ex[o / 32] = (uint8_t)mx4_scale(mx, mode, &f);
        for (int i = 0; i < 32; i += 2)
            q[(o + i) / 2] = oq_e2m1_pack2(oq_f32_to_e2m1(v[i] * f), oq_f32_to_e2m1(v[i + 1] * f));
    }
    return bad;
}

#ifdef OQ_AVX512
/* 16 consecutive blocks of 32 (512 elements) from element o: amax, exponents and multipliers as
   16-lane vectors, then the codes. Returns 1 if a block holds Inf/NaN (outputs then undefined). */
OQ_INLINE int64_t mx4_group16(const void* w, int dt, int64_t o, int mode, uint8_t* q, uint8_t* ex) {
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
    __m512i e, fe;  /* exponent bytes; the multipliers' float32 exponent fields */
    if (mode == 0) {
        e = mx_rceil_exponent16(_mm512_div_ps(_mm512_castsi512_ps(mx), _mm512_set1_ps(6.0f)));
        fe = _mm512_sub_epi32(_mm512_set1_epi32(254), e);
        fe = _mm512_mask_mov_epi32(fe, _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512()), _mm512_set1_epi32(127));
    } else {
        e = _mm512_sub_epi32(_mm512_srli_epi32(mx, 23), _mm512_set1_epi32(127 + 2));
        e = _mm512_add_epi32(_mm512_max_epi32(e, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
        fe = _mm512_sub_epi32(_mm512_set1_epi32(254), _mm512_max_epi32(e, one));
    }
    __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(fe, 23));
    _mm_storeu_si128((__m128i*)(ex + o / 32), _mm512_cvtepi32_epi8(e));
    for (int b = 0; b < 16; b++) {
        __m512 s = _mm512_permutexvar_ps(_mm512_set1_epi32(b), f);
        __m512 x0 = load16(w, dt, o + 32 * b, (__mmask16)0xFFFF), x1 = load16(w, dt, o + 32 * b + 16, (__mmask16)0xFFFF);
        __m512i c0 = oq_f32x16_to_e2m1_nonan(_mm512_mul_ps(x0, s)), c1 = oq_f32x16_to_e2m1_nonan(_mm512_mul_ps(x1, s));
        _mm_storeu_si128((__m128i*)(q + (o + 32 * b) / 2), oq_e2m1_pack32(c0, c1));
    }
    return 0;
}
#endif

OQ_INLINE int64_t mx4_blocks(const void* w, int dt, int64_t nblocks, int mode, uint8_t* q, uint8_t* ex, int nthreads) {
    int64_t bad = 0, done = 0;
#ifdef OQ_AVX512
    int64_t ngroups = nblocks / 16;
    #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+:bad)
    for (int64_t g = 0; g < ngroups; g++) bad += mx4_group16(w, dt, g * 512, mode, q, ex);
    done = ngroups * 16;
#endif
    int64_t rest = nblocks - done, per = (rest + nthreads - 1) / nthreads;
    if (per < 64) per = 64;
    #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+:bad)
    for (int64_t b0 = done; b0 < nblocks; b0 += per)
        bad += mx4_row(w, dt, b0 * 32, (b0 + per < nblocks ? b0 + per : nblocks) - b0, mode, q, ex);
    return bad;
}

/* mxfp4 quantizer: w [N, K] contiguous (dt), K % 32 == 0, q [N, K/2] packed codes, ex [N, K/32]
   e8m0 bytes. Blocks never straddle rows, so the tensor is one flat run of N*K/32 blocks. Returns
   nonzero when a block holds Inf/NaN (the caller then uses the torch reference, or raises). */
int64_t oq_mxfp4_quantize(const void* w, int dt, int64_t N, int64_t K, int mode, uint8_t* q, uint8_t* ex, int nthreads) {
    int64_t nb = N * (K / 32);
    switch (dt) {  /* literal dt per call: the inlined block code is specialized per input format */
    case 0: return mx4_blocks(w, 0, nb, mode, q, ex, nthreads);
    case 1: return mx4_blocks(w, 1, nb, mode, q, ex, nthreads);
    default: return mx4_blocks(w, 2, nb, mode, q, ex, nthreads);
    }
}

/* Test entry for fp4_e2m1.h: out[i] = oq_f32_to_e2m1(x[i]) (vec = 0) or an AVX-512 encoder for
   whole groups of 16 (vec = 1: oq_f32x16_to_e2m1, vec = 2: oq_f32x16_to_e2m1_nonan; the scalar
   one for the tail, and everywhere without AVX-512).
   packed != NULL (n % 32 == 0): also the packed bytes, through oq_e2m1_pack32 (AVX-512) or
   oq_e2m1_pack2. Returns 1 if the AVX-512 paths were compiled in. */
int oq_e2m1_encode(const float* x, int64_t n, uint8_t* out, uint8_t* packed, int vec) {
    int64_t i = 0;
#ifdef OQ_AVX512
    if (vec) {
        for (; i + 16 <= n; i += 16)
            _mm_storeu_si128((__m128i*)(out + i), _mm512_cvtepi32_epi8(vec == 2 ? oq_f32x16_to_e2m1_nonan(_mm512_loadu_ps(x + i))
                                                                                : oq_f32x16_to_e2m1(_mm512_loadu_ps(x + i))));
        if (packed)
            for (int64_t j = 0; j + 32 <= n; j += 32)
                _mm_storeu_si128((__m128i*)(packed + j / 2), oq_e2m1_pack32(oq_f32x16_to_e2m1(_mm512_loadu_ps(x + j)),
                                                                          oq_f32x16_to_e2m1(_mm512_loadu_ps(x + j + 16))));
    }
#endif
    for (; i < n; i++) out[i] = oq_f32_to_e2m1(x[i]);
    if (packed && !vec)
        for (int64_t j = 0; j + 1 < n; j += 2) packed[j / 2] = oq_e2m1_pack2(out[j], out[j + 1]);
#ifdef OQ_AVX512
    return 1;
#else
    if (packed && vec)
        for (int64_t j = 0; j + 1 < n; j += 2) packed[j / 2] = oq_e2m1_pack2(out[j], out[j + 1]);
    return 0;
#endif
}
