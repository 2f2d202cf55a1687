/* fp8adamw: AVX2 + F16C codecs, 8 lanes: e4m3 decode / encode, load8 / store8 of every state dtype,
 * stochastic rounding (mix8, sr8) and the lane reductions. Each vector operation repeats, lane by lane,
 * the scalar operation of fp8adamw_staged.h (same order, same rounding), so a tensor gives the same
 * bits whichever loop handles which element. */
#ifndef FP8ADAMW_CODECS8_H
#define FP8ADAMW_CODECS8_H
#include "fp8adamw_common.h"
#ifdef FP8ADAMW_AVX2
/* 8 e4m3 codes -> fp32 times mul. E4M3 is FP16 with its exponent bias lowered by 8 (15 - 7) and
   the mantissa cut to 3 bits, subnormals included: (code & 0x7F) << 7 with the sign moved to bit 15
   is an FP16 of value / 2**8. F16C converts it exactly; * 2**8 is exact; * mul rounds once, as the
   scalar decoder's mag * (mul * 2**-9) does. (NaN codes never reach the decoder: states are finite.) */
static inline __m256 e4m3_decode8(const uint8_t* s, __m256 mul) {
    const __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i*)s));
    const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x7F)), 7),
                                   _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x80)), 8));
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0f)), mul);
}

/* 8 floats (already scaled) -> 8 e4m3 codes: the scalar encoder below, 8 lanes at once; returns the
   codes' magnitudes (sign cleared) in 32-bit lanes */
static inline __m256i e4m3_encode8(uint8_t* d, __m256 y) {
    const __m256i yb = _mm256_castps_si256(y);
    const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(yb, 24), _mm256_set1_epi32(0x80));
    const __m256i ab = _mm256_and_si256(yb, _mm256_set1_epi32(0x7FFFFFFF));
    const __m256i cb = _mm256_min_epi32(ab, _mm256_set1_epi32(0x43E00000));  /* ab < 2**31: signed min ok */
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(cb, 20), _mm256_set1_epi32(1));
    const __m256i normal = _mm256_sub_epi32(
        _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(cb, _mm256_set1_epi32(0x7FFFF)), odd), 20),
        _mm256_set1_epi32(960));
    const __m256 big = _mm256_set1_ps(0x1p23f);
    const __m256i sub = _mm256_sub_epi32(
        _mm256_castps_si256(_mm256_add_ps(_mm256_mul_ps(_mm256_castsi256_ps(cb), _mm256_set1_ps(512.0f)), big)),
        _mm256_castps_si256(big));
    __m256i code = _mm256_blendv_epi8(normal, sub, _mm256_cmpgt_epi32(_mm256_set1_epi32(0x3C800000), cb));
    code = _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7F), _mm256_cmpgt_epi32(ab, _mm256_set1_epi32(0x7F800000)));
    const __m256i signed_code = _mm256_or_si256(code, sign);
    const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(signed_code), _mm256_extracti128_si256(signed_code, 1));
    _mm_storel_epi64((__m128i*)d, _mm_packus_epi16(w16, w16));
    return code;
}

/* The same per-element operations as load_block / store_block / math_block, 8 lanes in registers. */
static inline __m256 load8(const void* base, int dtype, int64_t i, __m256 mul) {
    switch (dtype) {
    case DT_F32: return _mm256_mul_ps(_mm256_loadu_ps((const float*)base + i), mul);
    case DT_BF16: {
        const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((const uint16_t*)base + i)));
        return _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(u, 16)), mul); }
    case DT_F16: return _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)base + i))), mul);
    default: return e4m3_decode8((const uint8_t*)base + i, mul);
    }
}

/* x already scaled; returns the stored magnitudes (bits of dtype, sign cleared) in 32-bit lanes */
static inline __m256i store8(void* base, int dtype, int64_t i, __m256 x) {
    switch (dtype) {
    case DT_F32:
        _mm256_storeu_ps((float*)base + i, x);
        return _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7FFFFFFF));
    case DT_BF16: {  /* no NaN case: the store pass only ever stores finite values */
        const __m256i u = _mm256_castps_si256(x);
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
        _mm_storeu_si128((__m128i*)((uint16_t*)base + i),
                         _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
        return _mm256_and_si256(r, _mm256_set1_epi32(0x7FFF)); }
    case DT_F16: {  /* magnitudes in 16-bit lanes (mag_max) */
        const __m128i h = _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i*)((uint16_t*)base + i), h);
        return _mm256_zextsi128_si256(_mm_and_si128(h, _mm_set1_epi16(0x7FFF))); }
    default: return e4m3_encode8((uint8_t*)base + i, x);
    }
}

static inline __m256i mix8(__m256i x) {  /* mix32, 8 lanes */
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7FEB352D));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x846CA68Bu));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

static inline __m256 sr8(__m256 y, __m256i r, const sr_spec* s) {  /* sr1, 8 lanes */
    const __m256i b = _mm256_castps_si256(y);
    const __m256i ab = _mm256_min_epu32(_mm256_and_si256(b, _mm256_set1_epi32(0x7FFFFFFF)),
                                        _mm256_set1_epi32((int)s->clamp));
    const __m256i dm = _mm256_set1_epi32((int)s->d_mask);
    __m256i out = _mm256_andnot_si256(dm, _mm256_add_epi32(ab, _mm256_and_si256(r, dm)));
    if (s->min_normal) {
        const __m256i t = _mm256_cvttps_epi32(_mm256_mul_ps(_mm256_castsi256_ps(ab), _mm256_set1_ps(s->up)));
        const __m256i km = _mm256_set1_epi32((int)((1u << s->k) - 1u));
        const __m256i code = _mm256_srl_epi32(_mm256_add_epi32(t, _mm256_and_si256(r, km)), _mm_cvtsi32_si128((int)s->k));
        const __m256i sub = _mm256_castps_si256(_mm256_mul_ps(_mm256_cvtepi32_ps(code), _mm256_set1_ps(s->down)));
        out = _mm256_blendv_epi8(out, sub, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)s->min_normal), ab));
    }
    return _mm256_castsi256_ps(_mm256_or_si256(out, _mm256_and_si256(b, _mm256_set1_epi32((int)0x80000000u))));
}

static inline __m256i absbits8(__m256 x) {  /* |x| bits, NaN -> inf bits (absmax_bits per lane) */
    const __m256i ab = _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7FFFFFFF));
    return _mm256_min_epi32(ab, _mm256_set1_epi32(0x7F800000));
}

static inline uint32_t hmax8(__m256i x) {
    uint32_t lanes[8], r = 0;
    _mm256_storeu_si256((__m256i*)lanes, x);
    for (int j = 0; j < 8; j++) r = lanes[j] > r ? lanes[j] : r;
    return r;
}

static inline __m256i abs8(__m256 x) {  /* |x| bits of finite values (the store pass has no others) */
    return _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7FFFFFFF));
}

/* Running maximum of stored magnitudes (store8's result): fp16 codes stay in 16-bit lanes (the low
   128 bits), every other dtype in 32-bit lanes; mag_hmax reduces either. */
static inline __m256i mag_max(__m256i acc, __m256i mag, int dtype) {
    return dtype == DT_F16 ? _mm256_max_epu16(acc, mag) : _mm256_max_epi32(acc, mag);
}
static inline uint32_t mag_hmax(__m256i acc, int dtype) {
    if (dtype != DT_F16) return hmax8(acc);
    uint16_t lanes[16];
    uint32_t r = 0;
    _mm256_storeu_si256((__m256i*)lanes, acc);
    for (int j = 0; j < 16; j++) r = lanes[j] > r ? lanes[j] : r;
    return r;
}
#endif  /* FP8ADAMW_AVX2 */
#endif
