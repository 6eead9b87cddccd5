/* nvfp4_quant.c: the CPU quantizer of oq-plugin-nvfp4 (built and loaded by oq_plugin_nvfp4.cpu),
   bit-exact with oq_plugin_nvfp4.quant.quantize_nvfp4 (compressed-tensors' NVFP4 bytes). No
   -ffast-math, -ffp-contract=off: every float op below is the one IEEE float32 operation the
   reference performs, in its order (a reciprocal then a product for the global scale, true
   divisions for the block scale and the elements), except that bf16 elements under a positive
   finite divisor get their codes from exact per-block bounds instead of divisions (same codes:
   nv_codes_bf16_bounds). e4m3 rounding is oq-plugin-fp8's integer encoder
   (fp8_e4m3.h), e2m1 rounding and packing oq-plugin-mxfp4's (fp4_e2m1.h); both directories are on
   the include path. dt: 0 = float32, 1 = bf16, 2 = fp16. */
#include "oq_kernels.h"
#include <stdlib.h>
#include "fp8_e4m3.h"
#include "fp4_e2m1.h"

#define NV_F8_MAX 448.0f
#define NV_F4_MAX 6.0f
#define NV_GLOBAL_NUM 2688.0f       /* 448 * 6 */
#define NV_ZERO_SCALE_BYTE 0x20u    /* e4m3 0.125: compressed-tensors' scale for a zero block scale */

OQ_INLINE float nv_from_bits(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }

/* compressed-tensors generate_gparam from max|w| (bits, finite): fl(fl(1 / max(a, 2^-126)) * 2688),
   1.0 if that overflows. */
OQ_INLINE float nv_global_scale(uint32_t amax_bits) {
    float a = nv_from_bits(amax_bits < 0x00800000u ? 0x00800000u : amax_bits);
    float g = (1.0f / a) * NV_GLOBAL_NUM;  /* two roundings: CT's `2688.0 / t` is t.reciprocal() * 2688 */
    uint32_t gb; memcpy(&gb, &g, 4);
    return (gb & 0x7FFFFFFFu) >= 0x7F800000u ? 1.0f : g;
}

/* value of an e4m3 byte (finite: block scales never hold the NaN byte) */
OQ_INLINE float nv_e4m3_value(uint32_t b) {
    uint32_t e = (b >> 3) & 15u, m = b & 7u;
    float v = e ? nv_from_bits(((e + 120u) << 23) | (m << 20)) : (float)m * 0.001953125f; /* m * 2^-9, exact */
    return (b & 0x80u) ? -v : v;
}

/* block scale byte of a block whose max |w| has bits amax_bits, under global scale g */
OQ_INLINE uint8_t nv_scale_byte(uint32_t amax_bits, float g) {
    float s = nv_from_bits(amax_bits) / NV_F4_MAX;
    s = g * s;
    s = s > NV_F8_MAX ? NV_F8_MAX : (s < -NV_F8_MAX ? -NV_F8_MAX : s);
    uint8_t b = f32_to_e4m3(s, 1);
    return (b & 0x7Fu) ? b : (uint8_t)NV_ZERO_SCALE_BYTE;  /* +-0 (the reference tests == 0) */
}

/* ------------------------------------------------------------------------------------------------
   pass 1: max |w| (as float32 bits) of elements [o, o + n), n % 16 == 0; >= 0x7F800000 flags Inf/NaN
   ------------------------------------------------------------------------------------------------ */
OQ_INLINE uint32_t nv_amax_bits(const void* w, int dt, int64_t o, int64_t n, int nthreads) {
    uint32_t mx = 0;
#ifdef OQ_AVX512
    #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(max:mx)
    for (int64_t c = 0; c < n; c += 4096) {
        int64_t end = c + 4096 < n ? c + 4096 : n, i = c;
        const __m512i am = _mm512_set1_epi32(0x7FFFFFFF);
        __m512i m0 = _mm512_setzero_si512(), m1 = m0, m2 = m0, m3 = m0;
        for (; i + 64 <= end; i += 64) {
            m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_castps_si512(load16(w, dt, o + i, (__mmask16)0xFFFF)), am));
            m1 = _mm512_max_epu32(m1, _mm512_and_si512(_mm512_castps_si512(load16(w, dt, o + i + 16, (__mmask16)0xFFFF)), am));
            m2 = _mm512_max_epu32(m2, _mm512_and_si512(_mm512_castps_si512(load16(w, dt, o + i + 32, (__mmask16)0xFFFF)), am));
            m3 = _mm512_max_epu32(m3, _mm512_and_si512(_mm512_castps_si512(load16(w, dt, o + i + 48, (__mmask16)0xFFFF)), am));
        }
        for (; i < end; i += 16)
            m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_castps_si512(load16(w, dt, o + i, (__mmask16)0xFFFF)), am));
        uint32_t r = _mm512_reduce_max_epu32(_mm512_max_epu32(_mm512_max_epu32(m0, m1), _mm512_max_epu32(m2, m3)));
        mx = r > mx ? r : mx;
    }
#else
    #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(max:mx)
    for (int64_t i = 0; i < n; i++) {
        float v = load1(w, dt, o + i); uint32_t b; memcpy(&b, &v, 4); b &= 0x7FFFFFFFu;
        mx = b > mx ? b : mx;
    }
#endif
    return mx;
}

/* ------------------------------------------------------------------------------------------------
   pass 2: blocks of 16. Block j (global index) has global scale gs[j / nbs].
   ------------------------------------------------------------------------------------------------ */

/* one block, scalar */
OQ_INLINE void nv_block_scalar(const void* w, int dt, int64_t j, float g, uint8_t* q, uint8_t* sc) {
    int64_t o = j * 16;
    uint32_t mx = 0;
    float x[16];
    for (int i = 0; i < 16; i++) {
        x[i] = load1(w, dt, o + i);
        uint32_t b; memcpy(&b, &x[i], 4); b &= 0x7FFFFFFFu;
        mx = b > mx ? b : mx;
    }
    uint8_t sb = nv_scale_byte(mx, g);
    sc[j] = sb;
    float t = nv_e4m3_value(sb) / g;
    for (int i = 0; i < 16; i += 2) {
        float y0 = x[i] / t, y1 = x[i + 1] / t;
        uint8_t c0 = y0 == 0.0f ? 0 : oq_f32_to_e2m1(y0), c1 = y1 == 0.0f ? 0 : oq_f32_to_e2m1(y1);
        q[o / 2 + i / 2] = oq_e2m1_pack2(c0, c1);
    }
}

#ifdef OQ_AVX512
/* Lane b of the result = max over the 16 lanes of v[b] (unsigned): a transpose-and-max tree. */
OQ_INLINE __m512i nv_hmax16x16(const __m512i* v) {
    __m512i r[8], t[4], u[2];
    for (int i = 0; i < 8; i++)
        r[i] = _mm512_max_epu32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        t[i] = _mm512_max_epu32(_mm512_unpacklo_epi64(r[2 * i], r[2 * i + 1]), _mm512_unpackhi_epi64(r[2 * i], r[2 * i + 1]));
    for (int i = 0; i < 2; i++)
        u[i] = _mm512_max_epu32(_mm512_shuffle_i32x4(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_i32x4(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_max_epu32(_mm512_shuffle_i32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* 16 e4m3 bytes (in 32-bit lanes, finite) -> their float32 values */
OQ_INLINE __m512 nv_e4m3x16_value(__m512i b) {
    __m512i e = _mm512_and_si512(_mm512_srli_epi32(b, 3), _mm512_set1_epi32(15)), m = _mm512_and_si512(b, _mm512_set1_epi32(7));
    __m512 normal = _mm512_castsi512_ps(_mm512_or_si512(_mm512_slli_epi32(_mm512_add_epi32(e, _mm512_set1_epi32(120)), 23),
                                                        _mm512_slli_epi32(m, 20)));
    __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(m), _mm512_set1_ps(0.001953125f));
    __m512 v = _mm512_mask_blend_ps(_mm512_test_epi32_mask(e, e), sub, normal);
    __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), sign));
}

/* 16 lanes of oq_f32x16_to_e2m1 (fp4_e2m1.h) for finite or infinite y, in arithmetic instead of
   comparisons into masks: those run on one port only (the shuffle port, which also widens bf16 and
   packs), these on two. |y| >= 1: the float32 bits rebased to e2m1's exponent bias and rounded to one
   mantissa bit (nearest even, integer add-and-shift), saturated at 6 by clamping the bits first;
   |y| < 1: cvtps2dq(2|y|), nearest even (codes 0, 1, 2: 0.25 -> 0, 0.75 -> 2). Same codes as
   oq_f32x16_to_e2m1 on every float32 (tests: oq_nvfp4_check_e2m1). */
OQ_INLINE __m512i nv_e2m1x16(__m512 y) {
    __m512i b = _mm512_castps_si512(y);
    __m512i a = _mm512_min_epu32(_mm512_and_si512(b, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x40C00000));
    /* nearest-even conversion embedded in the instruction (whatever MXCSR says) */
    __m512i sub = _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_castsi512_ps(a), _mm512_set1_ps(2.0f)),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512i t = _mm512_sub_epi32(a, _mm512_set1_epi32(126 << 23));
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(t, 22), _mm512_set1_epi32(1));
    __m512i nrm = _mm512_srai_epi32(_mm512_add_epi32(_mm512_add_epi32(t, _mm512_set1_epi32(0x1FFFFF)), lsb), 22);
    __m512i lt1 = _mm512_srai_epi32(_mm512_sub_epi32(a, _mm512_set1_epi32(0x3F800000)), 31);  /* -1 where |y| < 1 */
    __m512i code = _mm512_ternarylogic_epi32(lt1, sub, nrm, 0xCA);                           /* lt1 ? sub : nrm */
    return _mm512_ternarylogic_epi32(_mm512_srli_epi32(b, 28), _mm512_set1_epi32(8), code, 0xEA); /* | sign << 3 */
}

/* Scale bytes (stored at sc) and element divisors (stored at tb) of 16 blocks with maxima amax under
   global scales g (lane b: block b): e4m3(clamp(g * (amax / 6))), 0 -> 0.125, t = scale / g. */
OQ_INLINE void nv_scales16(__m512 amax, __m512 g, uint8_t* sc, float* tb) {
    __m512 s = _mm512_mul_ps(g, _mm512_div_ps(amax, _mm512_set1_ps(NV_F4_MAX)));
    s = _mm512_min_ps(_mm512_max_ps(s, _mm512_set1_ps(-NV_F8_MAX)), _mm512_set1_ps(NV_F8_MAX));
    __m512i sb = _mm512_cvtepu8_epi32(e4m3_16(s, 1));
    sb = _mm512_mask_mov_epi32(sb, _mm512_testn_epi32_mask(sb, _mm512_set1_epi32(0x7F)), _mm512_set1_epi32(NV_ZERO_SCALE_BYTE));
    _mm_storeu_si128((__m128i*)sc, _mm512_cvtepi32_epi8(sb));
    _mm512_storeu_ps(tb, _mm512_div_ps(nv_e4m3x16_value(sb), g));
}

/* 16 consecutive blocks from block j (one 256-element group), global scales g (lane b: block j+b) */
OQ_INLINE void nv_group16(const void* w, int dt, int64_t j, __m512 g, uint8_t* q, uint8_t* sc) {
    const __m512i am = _mm512_set1_epi32(0x7FFFFFFF);
    const int64_t o = j * 16;
    __m512 x[16];
    __m512i v[16];
    for (int b = 0; b < 16; b++) {
        OQ_PREFETCH(w, dt, o + 256 + 16 * b);
        x[b] = load16(w, dt, o + 16 * b, (__mmask16)0xFFFF);
        v[b] = _mm512_and_si512(_mm512_castps_si512(x[b]), am);
    }
    float tb[16];  /* per-block divisors, re-read as broadcasts (load ports, not the shuffle port) */
    nv_scales16(_mm512_castsi512_ps(nv_hmax16x16(v)), g, sc + j, tb);
    const __m512 zero = _mm512_setzero_ps();
    for (int b = 0; b < 16; b += 2) {
        /* + 0.0f turns -0.0 into +0.0 and changes nothing else: y == +-0 -> code 0 (compressed-tensors
           takes the sign from torch.sign, +0 for -0.0) */
        __m512 y0 = _mm512_add_ps(_mm512_div_ps(x[b], _mm512_set1_ps(tb[b])), zero);
        __m512 y1 = _mm512_add_ps(_mm512_div_ps(x[b + 1], _mm512_set1_ps(tb[b + 1])), zero);
        _mm_storeu_si128((__m128i*)(q + o / 2 + 8 * b), oq_e2m1_pack32(nv_e2m1x16(y0), nv_e2m1x16(y1)));
    }
}

/* nv_group16 for bf16 input without widening shuffles: 64 bytes = 32 elements = blocks 2c, 2c+1; the
   32-bit lane k holds elements 2k (low half) and 2k+1 (high half), so `<< 16` gives the float32 of
   the even elements and `& 0xFFFF0000` those of the odd ones (lanes 0-7: block 2c, 8-15: block
   2c+1), and byte k of the packed output is code(even k) | code(odd k) << 4: one narrowing per 32
   elements. The arithmetic per element is nv_group16's. */
/* The e2m1 decision points of a quotient y = fl(x / t), t > 0, as bounds on the exact real x / t
   (fl rounds to nearest even; each decision point c below has an even float32 significand, so a
   quotient exactly halfway between c and its float32 neighbour rounds to c):
   - k = 0: fl(x / t) != 0 iff x / t > 2^-150 (half the smallest subnormal; the tie rounds to 0);
   - c = 0.25, 1.25, 2.5, 5 (the encoder's `y > c`): fl(x / t) > c iff x / t > c + ulp(c) / 2;
   - c = 0.75, 1.75, 3.5 (`y >= c`): fl(x / t) >= c iff x / t >= c - ulp_below(c) / 2.
   The bounds have 25-bit significands: exact in double, and so are their products with a float32 t
   (49 bits, no underflow). NV_BOUND_GE: which ones are inclusive. */
static const double NV_BOUNDS[8] = {
    0x1p-150, 0x1p-2 + 0x1p-26, 0.75 - 0x1p-25, 1.25 + 0x1p-24, 1.75 - 0x1p-24, 2.5 + 0x1p-23, 3.5 - 0x1p-23, 5.0 + 0x1p-22};
#define NV_BOUND_GE 0x54u  /* k = 2, 4, 6 */

/* Lane b (16-bit lanes 0-15) = the smallest |x| as a bf16 bit pattern (0..0x7F80) that passes
   decision k under divisor t (lane b of tlo: blocks 0-7, thi: 8-15), t > 0 finite. P = bound * t is
   exact in double; the smallest float32 >= P is P rounded up, the smallest float32 > P is P rounded
   down plus one ulp (bits + 1: P > 0); the smallest bf16 >= a float32 F is (bits(F) + 0xFFFF) >> 16.
   Beyond FLT_MAX both give +inf (0x7F80), which no finite element reaches. */
OQ_INLINE __m256i nv_bounds16(__m512d tlo, __m512d thi, int k) {
    __m512d b = _mm512_set1_pd(NV_BOUNDS[k]);
    __m512d plo = _mm512_mul_pd(tlo, b), phi = _mm512_mul_pd(thi, b);
    __m512i f;
    if ((NV_BOUND_GE >> k) & 1u) {
        f = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_castps_si256(_mm512_cvt_roundpd_ps(plo, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC))),
                               _mm256_castps_si256(_mm512_cvt_roundpd_ps(phi, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC)), 1);
    } else {
        f = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_castps_si256(_mm512_cvt_roundpd_ps(plo, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC))),
                               _mm256_castps_si256(_mm512_cvt_roundpd_ps(phi, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)), 1);
        f = _mm512_add_epi32(f, _mm512_set1_epi32(1));
    }
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(f, _mm512_set1_epi32(0xFFFF)), 16));
}

/* The codes of one group of 16 bf16 blocks (raw 32-element vectors v[c]: blocks 2c, 2c+1) without
   dividing: with y = fl(x / t) monotone in x, the magnitude code is the number of decisions
   k = 1..7 whose smallest passing |x| (nv_bounds16) |x| reaches, compared on the 15-bit |x|
   patterns (bf16 bit order = value order for |x|), and the sign gives code bit 3 only when
   fl(x / t) != 0 (decision 0), as the reference (y == -0.0 -> code 0). Same bytes as the division
   path (tests: test_bf16_boundary_path_*). */
OQ_INLINE void nv_codes_bf16_bounds(const __m512i* v, const float* tb, uint8_t* q) {
    __m512 t = _mm512_loadu_ps(tb);
    __m512d tlo = _mm512_cvtps_pd(_mm512_castps512_ps256(t));
    __m512d thi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1)));
    /* r[k]: 32-bit unit c = (B_k of block 2c, B_k of block 2c+1); transposed (8 x 8 units) into
       tab[c]: 16-bit lane 2k + h = B_k of block 2c + h */
    __m256i r[8], u[8], tab[8];
    __m512i tbits = _mm512_castps_si512(t);
    if (_mm512_cmplt_epu32_mask(_mm512_sub_epi32(tbits, _mm512_set1_epi32(27 << 23)), _mm512_set1_epi32(200 << 23)) == 0xFFFF) {
        /* every t in [2^-100, 2^100): bounds k >= 1 in float32. bound = c + d (c the decision point,
           d = +-2^-e, both float32) and d t is exact (a power of two times t, >= 2^-126), so one
           FMA rounds the exact bound * t once, upward. bound * t is never a float32 (the bound's
           significand is odd with 25 bits, so the product needs more than 24), so rounding up
           gives the smallest float32 > it, which is also the smallest float32 >= it: one form
           serves the strict and the inclusive decisions. */
        static const float cpt[8] = {0.0f, 0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
        static const float dlt[8] = {0.0f, 0x1p-26f, -0x1p-25f, 0x1p-24f, -0x1p-24f, 0x1p-23f, -0x1p-23f, 0x1p-22f};
        r[0] = nv_bounds16(tlo, thi, 0);
        for (int k = 1; k < 8; k++) {
            __m512 f = _mm512_fmadd_round_ps(_mm512_set1_ps(cpt[k]), t, _mm512_mul_ps(_mm512_set1_ps(dlt[k]), t),
                                             _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
            r[k] = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(_mm512_castps_si512(f), _mm512_set1_epi32(0xFFFF)), 16));
        }
    } else {
        for (int k = 0; k < 8; k++) r[k] = nv_bounds16(tlo, thi, k);
    }
    for (int i = 0; i < 4; i++) {
        u[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        u[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    /* u[2i] units: (k=2i,c0) (2i+1,c0) (2i,c1) (2i+1,c1) | same for c4, c5; u[2i+1]: c2, c3 | c6, c7 */
    for (int i = 0; i < 2; i++)
        for (int hh = 0; hh < 2; hh++) {
            __m256i a0 = u[4 * i + hh], a1 = u[4 * i + 2 + hh];
            r[4 * i + 2 * hh] = _mm256_unpacklo_epi64(a0, a1);      /* k = 4i..4i+3 of c = 2hh (| c + 4) */
            r[4 * i + 2 * hh + 1] = _mm256_unpackhi_epi64(a0, a1);  /* c = 2hh + 1 (| c + 5) */
        }
    for (int c = 0; c < 4; c++) {
        tab[c] = _mm256_permute2x128_si256(r[c], r[4 + c], 0x20);
        tab[c + 4] = _mm256_permute2x128_si256(r[c], r[4 + c], 0x31);
    }
    const __m512i h = _mm512_set_epi16(1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i m15 = _mm512_set1_epi16(0x7FFF), c8 = _mm512_set1_epi16(8), c4 = _mm512_set1_epi16(4), c2 = _mm512_set1_epi16(2);
    for (int c = 0; c < 8; c++) {
        __m512i T = _mm512_castsi256_si512(tab[c]);
        __m512i ax = _mm512_and_si512(v[c], m15);
        /* binary search for the magnitude code m (decisions k = 1..7 passed: |x| >= B_k, the B_k
           ascending); p = h + 2 m indexes B_m. ax - B < 0 (bit 15) where a decision fails (|x|, B
           <= 0x7F80: no wrap); each step sets its bit of p unless its decision fails. */
        __m512i p = h;
        __m512i d = _mm512_sub_epi16(ax, _mm512_permutexvar_epi16(_mm512_or_si512(p, c8), T));
        p = _mm512_ternarylogic_epi32(p, _mm512_srai_epi16(d, 15), c8, 0xF2);  /* p | (~fail & 8) */
        d = _mm512_sub_epi16(ax, _mm512_permutexvar_epi16(_mm512_or_si512(p, c4), T));
        p = _mm512_ternarylogic_epi32(p, _mm512_srai_epi16(d, 15), c4, 0xF2);
        d = _mm512_sub_epi16(ax, _mm512_permutexvar_epi16(_mm512_or_si512(p, c2), T));
        p = _mm512_ternarylogic_epi32(p, _mm512_srai_epi16(d, 15), c2, 0xF2);
        __m512i d0 = _mm512_sub_epi16(ax, _mm512_permutexvar_epi16(h, T));
        /* sign bit of x and decision 0 passed (fl(x / t) != 0) -> 0x8000 -> (>> 12) 8 */
        __m512i s8 = _mm512_ternarylogic_epi32(v[c], d0, _mm512_set1_epi16((short)0x8000), 0x20);
        __m512i code = _mm512_or_si512(_mm512_srli_epi16(p, 1), _mm512_srli_epi16(s8, 12));
        /* 32-bit lane j: codes of elements 2j (low word), 2j+1 (high word) -> low + 16 high = byte j */
        _mm_storeu_si128((__m128i*)(q + 16 * c), _mm512_cvtepi32_epi8(_mm512_madd_epi16(code, _mm512_set1_epi32(0x00100001))));
    }
}

/* Scale bytes (to sc + j) and divisors (to tb) of the 16 bf16 blocks from block j: 64 bytes = 32
   elements = blocks 2c, 2c+1; the 32-bit lane k holds elements 2k (low half) and 2k+1 (high half),
   so `<< 16` gives the float32 of the even elements and `& 0xFFFF0000` those of the odd ones. */
OQ_INLINE __m512i nv_bmax_bf16(const uint16_t* w, int64_t j) {
    const int64_t o = j * 16;
    const __m512i m15 = _mm512_set1_epi16(0x7FFF);
    __m512i a[8];
    for (int c = 0; c < 8; c++) {
        _mm_prefetch((const char*)(w + o + 4096 + 32 * c), _MM_HINT_T0);
        /* |x| as 16-bit patterns: ordered as the float32 bits they widen to (<< 16) */
        a[c] = _mm512_and_si512(_mm512_loadu_si512((const void*)(w + o + 32 * c)), m15);
    }
    /* transpose-and-max over 8 vectors (vector c, 128-bit lane L holds elements 8L..8L+7 of
       blocks 2c (L = 0, 1) and 2c+1 (L = 2, 3)): after the three unpack levels, word w of 128-bit
       lane L of d is the max of vector w's lane L */
    __m512i b[4], cc[2];
    for (int i = 0; i < 4; i++)
        b[i] = _mm512_max_epu16(_mm512_unpacklo_epi16(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_epi16(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 2; i++)
        cc[i] = _mm512_max_epu16(_mm512_unpacklo_epi32(b[2 * i], b[2 * i + 1]), _mm512_unpackhi_epi32(b[2 * i], b[2 * i + 1]));
    __m512i d = _mm512_max_epu16(_mm512_unpacklo_epi64(cc[0], cc[1]), _mm512_unpackhi_epi64(cc[0], cc[1]));
    /* lanes 0 and 2 of e: word c = max of block 2c, block 2c+1 */
    __m512i e = _mm512_max_epu16(d, _mm512_shuffle_i32x4(d, d, _MM_SHUFFLE(2, 3, 0, 1)));
    /* 32-bit lane b = (max of block b) << 16, the float32 bits of its |x| maximum */
    const __m512i idx = _mm512_set_epi16(23, 0, 7, 0, 22, 0, 6, 0, 21, 0, 5, 0, 20, 0, 4, 0,
                                         19, 0, 3, 0, 18, 0, 2, 0, 17, 0, 1, 0, 16, 0, 0, 0);
    return _mm512_maskz_permutexvar_epi16((__mmask32)0xAAAAAAAAu, idx, e);
}

/* Pass 1 for bf16: the |x| maximum (bf16 bits) of each of the nb blocks into bm[], by groups of 16
   (the tree above), the last nb % 16 one by one. */
OQ_INLINE void nv_bmax_pass_bf16(const uint16_t* w, int64_t nb, uint16_t* bm, int nthreads) {
    int64_t ng = nb / 16;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < ng; i++)
        _mm256_storeu_si256((__m256i*)(bm + 16 * i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(nv_bmax_bf16(w, 16 * i), 16)));
    for (int64_t j = 16 * ng; j < nb; j++) {
        uint16_t m = 0;
        for (int i = 0; i < 16; i++) { uint16_t a = w[16 * j + i] & 0x7FFFu; m = a > m ? a : m; }
        bm[j] = m;
    }
}

/* max of bm[0..n) (bf16 |x| bits), as float32 bits */
OQ_INLINE uint32_t nv_max_u16(const uint16_t* bm, int64_t n) {
    __m512i m = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) m = _mm512_max_epu16(m, _mm512_loadu_si512((const void*)(bm + i)));
    m = _mm512_max_epu32(_mm512_slli_epi32(m, 16), _mm512_andnot_si512(_mm512_set1_epi32(0xFFFF), m));
    uint32_t r = _mm512_reduce_max_epu32(m);
    for (; i < n; i++) r = ((uint32_t)bm[i] << 16) > r ? ((uint32_t)bm[i] << 16) : r;
    return r;
}

/* Element codes of the 16 bf16 blocks from block j with divisors tb (nv_scales_bf16), packed to q. */
OQ_INLINE void nv_codes_bf16(const uint16_t* w, int64_t j, const float* tb, uint8_t* q) {
    const int64_t o = j * 16;
    __m512i raw[8];
    for (int c = 0; c < 8; c++) raw[c] = _mm512_loadu_si512((const void*)(w + o + 32 * c));
    /* every divisor positive and finite (always, unless a caller's global scale is negative, zero,
       huge or tiny): decisions by bounds instead of divisions */
    __m512i tbits = _mm512_loadu_si512((const void*)tb);
    if (_mm512_cmplt_epu32_mask(_mm512_sub_epi32(tbits, _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7F7FFFFF)) == 0xFFFF) {
        nv_codes_bf16_bounds(raw, tb, q + o / 2);
        return;
    }
    const __m512 zero = _mm512_setzero_ps();
    const __m512i hi = _mm512_set1_epi32((int32_t)0xFFFF0000u);
    for (int c = 0; c < 8; c++) {
        __m512 ev = _mm512_castsi512_ps(_mm512_slli_epi32(raw[c], 16)), od = _mm512_castsi512_ps(_mm512_and_si512(raw[c], hi));
        __m512 t = _mm512_mask_blend_ps((__mmask16)0xFF00, _mm512_set1_ps(tb[2 * c]), _mm512_set1_ps(tb[2 * c + 1]));
        __m512i ce = nv_e2m1x16(_mm512_add_ps(_mm512_div_ps(ev, t), zero));
        __m512i co = nv_e2m1x16(_mm512_add_ps(_mm512_div_ps(od, t), zero));
        _mm_storeu_si128((__m128i*)(q + o / 2 + 16 * c), _mm512_cvtepi32_epi8(_mm512_or_si512(ce, _mm512_slli_epi32(co, 4))));
    }
}

/* 16 consecutive blocks from block j (one 256-element group) */
OQ_INLINE __m512 nv_group_g(int64_t j, int64_t nbs, const float* gs) {
    int64_t e0 = j / nbs, e1 = (j + 15) / nbs;
    if (e0 == e1) return _mm512_set1_ps(gs[e0]);
    float gl[16];
    for (int b = 0; b < 16; b++) gl[b] = gs[(j + b) / nbs];
    return _mm512_loadu_ps(gl);
}
#endif

/* blocks [j0, j1) of a tensor whose slabs (experts) have nbs blocks each, global scales gs[] */
OQ_INLINE void nv_blocks(const void* w, int dt, int64_t j0, int64_t j1, int64_t nbs, const float* gs, uint8_t* q, uint8_t* sc,
                         const uint16_t* bm) {
    int64_t j = j0;
#ifdef OQ_AVX512
    if (dt == 1 && bm) {
        /* two passes over up to 16 groups (8 KiB, in L1): the scales of all, then the codes of all,
           so the scales' latency chains (two divisions, the e4m3 rounding) of independent groups
           overlap instead of each group's codes waiting on its own scales */
        float tb[16 * 16];
        while (j + 16 <= j1) {
            int64_t n = (j1 - j) / 16 < 16 ? (j1 - j) / 16 : 16;
            for (int64_t i = 0; i < n; i++) {
                int64_t jj = j + 16 * i;
                __m512i mx = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(bm + jj))), 16);
                nv_scales16(_mm512_castsi512_ps(mx), nv_group_g(jj, nbs, gs), sc + jj, tb + 16 * i);
            }
            for (int64_t i = 0; i < n; i++) nv_codes_bf16((const uint16_t*)w, j + 16 * i, tb + 16 * i, q);
            j += 16 * n;
        }
    }
    for (; j + 16 <= j1; j += 16) nv_group16(w, dt, j, nv_group_g(j, nbs, gs), q, sc);
#endif
    for (; j < j1; j++) nv_block_scalar(w, dt, j, gs[j / nbs], q, sc);
}

OQ_INLINE int64_t nv_quantize(const void* w, int dt, int64_t E, int64_t per, int use_gs, float* gs,
                              uint8_t* q, uint8_t* sc, int nthreads) {
    int64_t bad = 0;
    int64_t nb = E * (per / 16), nbs = per / 16;
    uint16_t* bm = NULL;
#ifdef OQ_AVX512
    /* bf16: pass 1 keeps every block's maximum (2 bytes per 16 elements), so pass 2 reads the
       elements once, for their codes */
    if (dt == 1) bm = (uint16_t*)malloc((size_t)(nb > 0 ? nb : 1) * sizeof(uint16_t));
    if (bm) {
        nv_bmax_pass_bf16((const uint16_t*)w, nb, bm, nthreads);
        for (int64_t e = 0; e < E; e++) {
            uint32_t mx = nv_max_u16(bm + e * nbs, nbs);
            if (mx >= 0x7F800000u) bad++;
            else if (!use_gs) gs[e] = nv_global_scale(mx);
        }
    } else
#endif
    for (int64_t e = 0; e < E; e++) {
        uint32_t mx = nv_amax_bits(w, dt, e * per, per, nthreads);
        if (mx >= 0x7F800000u) bad++;
        else if (!use_gs) gs[e] = nv_global_scale(mx);
    }
    if (bad) { free(bm); return bad; }
    int64_t chunk = 1024;  /* blocks per task: multiple of 16 */
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t j = 0; j < nb; j += chunk)
        nv_blocks(w, dt, j, j + chunk < nb ? j + chunk : nb, nbs, gs, q, sc, bm);
    free(bm);
    return 0;
}

/* nvfp4 quantizer: w = E slabs of per elements (per % 16 == 0; E = 1 for [N, K] / [M, K], the
   experts of [E, N, K]), contiguous, format dt. gs[E]: the global scales, read if use_gs, else
   written. q: E * per / 2 packed e2m1 bytes, sc: E * per / 16 e4m3 scale bytes. Returns nonzero
   when w holds Inf/NaN (outputs then undefined; the caller raises or runs the reference). */
int64_t oq_nvfp4_quantize(const void* w, int dt, int64_t E, int64_t per, int use_gs, float* gs,
                          uint8_t* q, uint8_t* sc, int nthreads) {
    switch (dt) {  /* literal dt per call: the inlined block code is specialized per input format */
    case 0: return nv_quantize(w, 0, E, per, use_gs, gs, q, sc, nthreads);
    case 1: return nv_quantize(w, 1, E, per, use_gs, gs, q, sc, nthreads);
    default: return nv_quantize(w, 2, E, per, use_gs, gs, q, sc, nthreads);
    }
}

/* Test hook: the number of float32 bit patterns in [lo, hi) (a multiple of 16 apart; NaNs skipped)
   whose nv_e2m1x16 code differs from fp4_e2m1.h's oq_f32x16_to_e2m1; -1 without AVX-512. */
int64_t oq_nvfp4_check_e2m1(int64_t lo, int64_t hi) {
#ifdef OQ_AVX512
    int64_t bad = 0;
    const __m512i step = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t v = lo; v < hi; v += 16) {
        __m512i bits = _mm512_add_epi32(_mm512_set1_epi32((int32_t)(uint32_t)v), step);
        __m512 y = _mm512_castsi512_ps(bits);
        __mmask16 ok = _mm512_cmp_ps_mask(y, y, _CMP_ORD_Q);
        bad += __builtin_popcount(_mm512_mask_cmpneq_epi32_mask(ok, nv_e2m1x16(y), oq_f32x16_to_e2m1(y)));
    }
    return bad;
#else
    (void)lo; (void)hi;
    return -1;
#endif
}
