/* fp8_e4m3.h: float32 -> float8_e4m3fn bytes for CPU kernels (oq-plugin-fp8).

   Round to nearest even with integer arithmetic, scalar and 16 AVX-512 lanes (the same algorithm),
   checked against torch's cast on every float32 in [-448, 448]. Part of oq_plugin_fp8's package
   data (csrc/): kernels of other schemes with e4m3 elements (oq-plugin-mxfp8) include it by adding
   oq_plugin_fp8.cpu.CSRC_DIR to their NativeLibrary's include_dirs. */
#ifndef OQ_FP8_E4M3_H
#define OQ_FP8_E4M3_H

#include "oq_kernels.h"

/* float32 -> float8_e4m3fn byte, round to nearest even, integer arithmetic. y finite, |y| <= 448
   (the callers clamp). zero_fix: +-0.0 -> 0x00 (compressed-tensors' "+ 0.0"); otherwise -0.0 -> 0x80. */
OQ_INLINE uint8_t f32_to_e4m3(float y, int zero_fix) {
    uint32_t b; memcpy(&b, &y, 4);
    uint32_t sign = (b >> 24) & 0x80u, a = b & 0x7FFFFFFFu, r;
    if (a == 0 && zero_fix) return 0;
    if (a >= (121u << 23)) {              /* >= 2^-6: normal e4m3, rebias 127 -> 7, drop 20 bits RNE */
        uint32_t t = a - (120u << 23);
        r = (t + 0x7FFFFu + ((t >> 20) & 1u)) >> 20;
    } else {                              /* subnormal e4m3: round(|y| / 2^-9), 8 -> 0x08 = 2^-6 */
        uint32_t E = a >> 23, m = (a & 0x7FFFFFu) | (E ? 0x800000u : 0u);
        uint32_t s = 141u - (E ? E : 1u);
        if (s > 31u) s = 31u;
        uint32_t q = m >> s, rem = m & ((1u << s) - 1u), half = 1u << (s - 1u);
        r = q + (uint32_t)(rem > half || (rem == half && (q & 1u)));
    }
    return (uint8_t)(sign | r);
}

#ifdef OQ_AVX512
/* 16 lanes of f32_to_e4m3 (same integer algorithm) */
OQ_INLINE __m128i e4m3_16(__m512 y, int zero_fix) {
    const __m512i one = _mm512_set1_epi32(1);
    __m512i b = _mm512_castps_si512(y);
    __m512i a = _mm512_and_si512(b, _mm512_set1_epi32(0x7FFFFFFF));
    __m512i sign = _mm512_and_si512(_mm512_srli_epi32(b, 24), _mm512_set1_epi32(0x80));
    __m512i t = _mm512_sub_epi32(a, _mm512_set1_epi32(120 << 23));
    __m512i rn = _mm512_srli_epi32(_mm512_add_epi32(t, _mm512_add_epi32(_mm512_set1_epi32(0x7FFFF),
                                   _mm512_and_si512(_mm512_srli_epi32(t, 20), one))), 20);
    __mmask16 sub = _mm512_cmplt_epu32_mask(a, _mm512_set1_epi32(121 << 23));
    __m512i r = rn;
    if (sub) {
        __m512i E = _mm512_srli_epi32(a, 23);
        __mmask16 nz = _mm512_test_epi32_mask(E, E);
        __m512i m = _mm512_and_si512(a, _mm512_set1_epi32(0x7FFFFF));
        m = _mm512_mask_or_epi32(m, nz, m, _mm512_set1_epi32(0x800000));
        __m512i s = _mm512_sub_epi32(_mm512_set1_epi32(141), _mm512_max_epu32(E, one));
        s = _mm512_min_epi32(_mm512_max_epi32(s, one), _mm512_set1_epi32(31));  /* normal lanes: unused */
        __m512i q = _mm512_srlv_epi32(m, s);
        __m512i rem = _mm512_and_si512(m, _mm512_sub_epi32(_mm512_sllv_epi32(one, s), one));
        __m512i half = _mm512_sllv_epi32(one, _mm512_sub_epi32(s, one));
        __mmask16 up = _mm512_cmpgt_epu32_mask(rem, half)
                     | (_mm512_cmpeq_epi32_mask(rem, half) & _mm512_test_epi32_mask(q, one));
        r = _mm512_mask_mov_epi32(rn, sub, _mm512_mask_add_epi32(q, up, q, one));
    }
    r = _mm512_or_si512(r, sign);
    if (zero_fix) r = _mm512_maskz_mov_epi32(_mm512_test_epi32_mask(a, a), r);
    return _mm512_cvtepi32_epi8(r);
}
#endif

#endif /* OQ_FP8_E4M3_H */
