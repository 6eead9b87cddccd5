/* mx_scale.h: the e8m0 scale rules shared by the MX quantizers (oq-plugin-mxfp8's mxfp8_quant.c and
   oq-plugin-mxfp4's mxfp4_quant.c, which includes it from this package's csrc/): the rceil exponent
   of oq_plugin_mxfp8.quant.rceil_exponent (torchao's float32 log2 rounding reproduced with
   integers), scalar and 16 lanes, and the 16x16 transpose-and-max tree for per-block amax. Needs
   oq_kernels.h first. */
#ifndef OQ_MX_SCALE_H
#define OQ_MX_SCALE_H

/* biased e8m0 byte of clamp(ceil(fl32(log2(descale))), -127, 127) + 127; descale finite, >= 0 */
OQ_INLINE uint32_t mx_rceil_exponent(float descale) {
    uint32_t bits; memcpy(&bits, &descale, 4);
    int32_t biased = (int32_t)((bits >> 23) & 0xFFu), mant = (int32_t)(bits & 0x7FFFFFu), e;
    if (biased == 0) {
        int32_t sub_i = mant - (1 << 22);
        e = sub_i > 0 ? -126 - (2 * sub_i <= 22) : -127;
    } else {
        int32_t k = biased - 127, n = k > 0 ? k : -k - 1;
        int32_t limit = n >= 64 ? 22 : n >= 32 ? 11 : n >= 16 ? 5 : n >= 8 ? 2 : n >= 4 ? 1 : 0;
        e = mant == 0 ? k : k + 1 - (mant <= limit);
    }
    e = e < -127 ? -127 : (e > 127 ? 127 : e);
    return (uint32_t)(e + 127);
}

OQ_INLINE float f32_from_bits(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }

#ifdef OQ_AVX512
/* 16 lanes of mx_rceil_exponent (the same integer rules, lane by lane) */
OQ_INLINE __m512i mx_rceil_exponent16(__m512 descale) {
    const __m512i one = _mm512_set1_epi32(1), zero = _mm512_setzero_si512();
    __m512i bits = _mm512_castps_si512(descale);
    __m512i biased = _mm512_srli_epi32(bits, 23), mant = _mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFF));
    __m512i k = _mm512_sub_epi32(biased, _mm512_set1_epi32(127));
    /* n = k > 0 ? k : -k - 1 (k = 0 gives 0 instead of -1: the same limit, 0) */
    __m512i n = _mm512_max_epi32(k, _mm512_sub_epi32(zero, _mm512_add_epi32(k, one)));
    __m512i limit = zero;
    limit = _mm512_mask_mov_epi32(limit, _mm512_cmpge_epi32_mask(n, _mm512_set1_epi32(4)), one);
    limit = _mm512_mask_mov_epi32(limit, _mm512_cmpge_epi32_mask(n, _mm512_set1_epi32(8)), _mm512_set1_epi32(2));
    limit = _mm512_mask_mov_epi32(limit, _mm512_cmpge_epi32_mask(n, _mm512_set1_epi32(16)), _mm512_set1_epi32(5));
    limit = _mm512_mask_mov_epi32(limit, _mm512_cmpge_epi32_mask(n, _mm512_set1_epi32(32)), _mm512_set1_epi32(11));
    limit = _mm512_mask_mov_epi32(limit, _mm512_cmpge_epi32_mask(n, _mm512_set1_epi32(64)), _mm512_set1_epi32(22));
    __m512i e = _mm512_add_epi32(k, one);
    e = _mm512_mask_sub_epi32(e, _mm512_cmple_epi32_mask(mant, limit), e, one);
    e = _mm512_mask_mov_epi32(e, _mm512_cmpeq_epi32_mask(mant, zero), k);
    __mmask16 sub = _mm512_cmpeq_epi32_mask(biased, zero);
    if (sub) {  /* subnormal descale */
        __m512i si = _mm512_sub_epi32(mant, _mm512_set1_epi32(1 << 22));
        __m512i es = _mm512_set1_epi32(-126);
        es = _mm512_mask_sub_epi32(es, _mm512_cmple_epi32_mask(_mm512_add_epi32(si, si), _mm512_set1_epi32(22)), es, one);
        es = _mm512_mask_mov_epi32(es, _mm512_cmple_epi32_mask(si, zero), _mm512_set1_epi32(-127));
        e = _mm512_mask_mov_epi32(e, sub, es);
    }
    e = _mm512_min_epi32(_mm512_max_epi32(e, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
    return _mm512_add_epi32(e, _mm512_set1_epi32(127));
}

/* Lane b of the result = max over the 16 lanes of v[b] (unsigned): a transpose-and-max tree,
   45 instructions for 16 horizontal reductions. */
OQ_INLINE __m512i hmax_epu32_16x16(const __m512i* v) {
    __m512i r[8], t[4], u[2];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: [max(a0,a2), max(b0,b2), max(a1,a3), max(b1,b3)] */
        r[i] = _mm512_max_epu32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)  /* per 128-bit lane: blocks 4i..4i+3, partial over that lane */
        t[i] = _mm512_max_epu32(_mm512_unpacklo_epi64(r[2 * i], r[2 * i + 1]), _mm512_unpackhi_epi64(r[2 * i], r[2 * i + 1]));
    for (int i = 0; i < 2; i++)
        u[i] = _mm512_max_epu32(_mm512_shuffle_i32x4(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_i32x4(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_max_epu32(_mm512_shuffle_i32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

#endif

#endif
