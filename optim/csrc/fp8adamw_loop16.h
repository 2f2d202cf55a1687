/* fp8adamw: the AVX-512 store-pass loop (16 lanes) for the default state formats (e4m3 m, fp16 v) with
 * fp32 or bf16 parameters (gradients alike) and an fp16, fp32 or no master; every other case, pass 1
 * and the < 16 elements left over take the 8-lane loop (fp8adamw_loop8.h) and the staged one.
 *
 * Each operation repeats, lane by lane, the one of the 8-lane loop (same order, same rounding: fp32
 * mul / add / sub / div / sqrt are IEEE in any width, no FMA (-ffp-contract=off), the fp16 conversions
 * round to nearest even explicitly), so the bits do not depend on which loop ran an element. Where
 * the 8-lane code blends with a vector mask this one uses a mask register; the integer narrowings
 * (_mm512_cvtepi32_epi8 / _epi16) truncate where the 8-lane code saturates, the same on these values
 * (codes <= 0xFF, bf16 halves <= 0xFFFF). */
#ifndef FP8ADAMW_LOOP16_H
#define FP8ADAMW_LOOP16_H
#include "fp8adamw_common.h"
#if defined(FP8ADAMW_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define FP8ADAMW_AVX512 1
/* Software prefetch, PREFETCH_AHEAD elements ahead, of the streams of 2 or 4 bytes per element (m's 1 byte is
   left to the hardware): without it the loop waited on the loads of g and the stores of the parameter for ~30 %
   of its profile samples, and the store pass took ~1.2x as long (50M parameters, 2 threads, measured) */
#define PREFETCH_AHEAD 512

static inline __m512 load16(const void* base, int dtype, int64_t i, __m512 mul) {
    switch (dtype) {
    case DT_F32: return _mm512_mul_ps(_mm512_loadu_ps((const float*)base + i), mul);
    case DT_BF16: {
        const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)((const uint16_t*)base + i)));
        return _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(u, 16)), mul); }
    case DT_F16:
        return _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)base + i))), mul);
    default: {  /* e4m3: e4m3_decode8, 16 lanes, its x 256 folded into mul (the caller's, where exact) */
        const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)((const uint8_t*)base + i)));
        const __m256i h = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x7F)), 7),
                                          _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x80)), 8));
        return _mm512_mul_ps(_mm512_cvtph_ps(h), mul); }
    }
}

/* e4m3_encode8, 16 lanes, for finite y (the store pass runs only when the new values are proven finite, so the
   NaN -> 0x7F select of the 8-lane code is left out: the same codes) */
static inline __m512i e4m3_encode16(uint8_t* d, __m512 y) {
    const __m512i yb = _mm512_castps_si512(y);
    const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(yb, 24), _mm512_set1_epi32(0x80));
    const __m512i ab = _mm512_and_si512(yb, _mm512_set1_epi32(0x7FFFFFFF));
    const __m512i cb = _mm512_min_epi32(ab, _mm512_set1_epi32(0x43E00000));
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(cb, 20), _mm512_set1_epi32(1));
    const __m512i normal = _mm512_sub_epi32(
        _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(cb, _mm512_set1_epi32(0x7FFFF)), odd), 20),
        _mm512_set1_epi32(960));
    const __m512 big = _mm512_set1_ps(0x1p23f);
    const __m512i sub = _mm512_sub_epi32(
        _mm512_castps_si512(_mm512_add_ps(_mm512_mul_ps(_mm512_castsi512_ps(cb), _mm512_set1_ps(512.0f)), big)),
        _mm512_castps_si512(big));
    const __m512i code = _mm512_mask_blend_epi32(_mm512_cmpgt_epi32_mask(_mm512_set1_epi32(0x3C800000), cb),
                                                 normal, sub);
    _mm_storeu_si128((__m128i*)d, _mm512_cvtepi32_epi8(_mm512_or_si512(code, sign)));
    return code;
}

/* x already scaled; fp32 and bf16 (parameters, an fp32 master): store8's cases, 16 lanes; returns the
   stored magnitudes' bits in 32-bit lanes */
static inline __m512i store16(void* base, int dtype, int64_t i, __m512 x) {
    if (dtype == DT_F32) {
        _mm512_storeu_ps((float*)base + i, x);
        return _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF));
    }
    const __m512i u = _mm512_castps_si512(x);  /* bf16, finite values only */
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
    _mm256_storeu_si256((__m256i*)((uint16_t*)base + i), _mm512_cvtepi32_epi16(r));
    return _mm512_and_si512(r, _mm512_set1_epi32(0x7FFF));
}

static inline __m256i f16_store16(void* base, int64_t i, __m512 x) {  /* the fp16 codes */
    const __m256i h = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256((__m256i*)((uint16_t*)base + i), h);
    return h;
}

static inline __m512i mix16(__m512i x) {  /* mix32, 16 lanes */
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7FEB352D));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0x846CA68Bu));
    return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

static inline __m512 sr16(__m512 y, __m512i r, const sr_spec* s) {  /* sr8, 16 lanes */
    const __m512i b = _mm512_castps_si512(y);
    const __m512i ab = _mm512_min_epu32(_mm512_and_si512(b, _mm512_set1_epi32(0x7FFFFFFF)),
                                        _mm512_set1_epi32((int)s->clamp));
    const __m512i dm = _mm512_set1_epi32((int)s->d_mask);
    __m512i out = _mm512_andnot_si512(dm, _mm512_add_epi32(ab, _mm512_and_si512(r, dm)));
    if (s->min_normal) {
        const __m512i t = _mm512_cvttps_epi32(_mm512_mul_ps(_mm512_castsi512_ps(ab), _mm512_set1_ps(s->up)));
        const __m512i km = _mm512_set1_epi32((int)((1u << s->k) - 1u));
        const __m512i code = _mm512_srl_epi32(_mm512_add_epi32(t, _mm512_and_si512(r, km)),
                                              _mm_cvtsi32_si128((int)s->k));
        const __m512i sub = _mm512_castps_si512(_mm512_mul_ps(_mm512_cvtepi32_ps(code), _mm512_set1_ps(s->down)));
        out = _mm512_mask_blend_epi32(_mm512_cmpgt_epi32_mask(_mm512_set1_epi32((int)s->min_normal), ab), out, sub);
    }
    return _mm512_castsi512_ps(_mm512_or_si512(out, _mm512_and_si512(b, _mm512_set1_epi32((int)0x80000000u))));
}

static inline uint32_t hmax16_u16(__m256i x) { return _mm512_reduce_max_epu32(_mm512_cvtepu16_epi32(x)); }

/* Store pass over elements [begin, begin + 16k) of tensor t (e4m3 m, fp16 v); returns where it stopped.
   pd: parameter (= gradient) dtype; master_dtype: DT_F16, DT_F32 or DT_NONE; constants at every call. */
static inline __attribute__((always_inline)) int64_t store_range16(
        const fp8adamw_args* a, int64_t t, int64_t begin, int64_t end, uint32_t* acc,
        const int pd, const int master_dtype, const int sr) {
    const float* c = a->coef + t * N_COEF;
    const float* dm = a->scale_inv + t * N_SLOT;
    const float* em = a->new_scale + t * N_SLOT;
    const int has_master = master_dtype != DT_NONE, wd = has_master ? master_dtype : pd;
    void* mp = (void*)a->exp_avg[t];
    void* vp = (void*)a->exp_avg_sq[t];
    void* pp = (void*)a->param[t];
    void* wp = has_master ? (void*)a->master[t] : pp;
    const void* gp = (const void*)a->grad[t];
    const __m512 c1 = _mm512_set1_ps(c[C_ONE_MINUS_BETA1]), b2 = _mm512_set1_ps(c[C_BETA2]);
    const __m512 c2 = _mm512_set1_ps(c[C_ONE_MINUS_BETA2]), decay = _mm512_set1_ps(c[C_DECAY]);
    const __m512 step_size = _mm512_set1_ps(c[C_STEP_SIZE]), bc2_sqrt_inv = _mm512_set1_ps(c[C_BC2_SQRT_INV]);
    const __m512 eps = _mm512_set1_ps(c[C_EPS]), gmul = _mm512_set1_ps(c[C_GRAD_MUL]);
    const float wmul = has_master ? dm[S_W] : 1.0f, w_inv = 1.0f / em[S_W];  /* exact: 2**k */
    /* m's decode (fp16 bits x 2**8 x scale_inv) in one multiply: exact, as both are one rounding of the same
       product, while 2**8 x scale_inv is finite; a tensor where it is not takes the 8-lane loop */
    const float m_dec256 = 256.0f * dm[S_M];
    if (!(m_dec256 <= 0x1.fffffep127f)) return begin;
    const __m512 m_dec = _mm512_set1_ps(m_dec256), v_dec = _mm512_set1_ps(dm[S_V]);
    const __m512 w_dec = _mm512_set1_ps(wmul), w_back = _mm512_set1_ps(w_inv);
    const __m512 m_enc = _mm512_set1_ps(em[S_M]), v_enc = _mm512_set1_ps(em[S_V]), w_enc = _mm512_set1_ps(em[S_W]);
    const sr_spec sp_m = make_spec(DT_E4M3, 32), sp_v = make_spec(DT_F16, 16), sp_w = make_spec(wd, 16);
    const int sr_w = sr && wd != DT_F32;
    const __m512i key0 = _mm512_set1_epi32(sr ? (int)(uint32_t)a->sr_key[2 * t] : 0);
    const __m512i key1 = _mm512_set1_epi32(sr ? (int)(uint32_t)a->sr_key[2 * t + 1] : 0);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i xg = _mm512_mullo_epi32(_mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)begin), lane),
                                    _mm512_set1_epi32((int)GOLDEN));
    const __m512i xg_step = _mm512_set1_epi32((int)(16u * GOLDEN));
    const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
    __m512i am = _mm512_setzero_si512(), au = am, ams = am, aw = am;  /* maxima: bits */
    __m256i av = _mm256_setzero_si256(), aw16 = av;                   /* fp16 codes' maxima */
    __m512i adn = _mm512_set1_epi32((int)INF_BITS);                   /* minimum: bits */
    const __m512 tau = _mm512_set1_ps(a->tau[t]);
    int64_t i = begin;
    for (; i + 16 <= end; i += 16) {
        const int64_t ahead = i + PREFETCH_AHEAD < end ? i + PREFETCH_AHEAD : i;  /* within the chunk */
        if (pd == DT_F32) {
            _mm_prefetch((const char*)((const float*)gp + ahead), _MM_HINT_T0);
            _mm_prefetch((const char*)((const float*)pp + ahead), _MM_HINT_T0);
        }
        if ((i & 31) == 0) {  /* a line holds 32 elements of 2 bytes */
            if (pd == DT_BF16) {
                _mm_prefetch((const char*)((const uint16_t*)gp + ahead), _MM_HINT_T0);
                _mm_prefetch((const char*)((const uint16_t*)pp + ahead), _MM_HINT_T0);
            }
            _mm_prefetch((const char*)((const uint16_t*)vp + ahead), _MM_HINT_T0);
            if (wd == DT_F16 && has_master) _mm_prefetch((const char*)((const uint16_t*)wp + ahead), _MM_HINT_T0);
        }
        if (wd == DT_F32 && has_master) _mm_prefetch((const char*)((const float*)wp + ahead), _MM_HINT_T0);
        const __m512 g = load16(gp, pd, i, gmul);
        const __m512 m = load16(mp, DT_E4M3, i, m_dec);
        const __m512 v = load16(vp, DT_F16, i, v_dec);
        const __m512 m1 = _mm512_add_ps(m, _mm512_mul_ps(_mm512_sub_ps(g, m), c1));
        const __m512 v1 = _mm512_add_ps(_mm512_mul_ps(v, b2), _mm512_mul_ps(_mm512_mul_ps(g, g), c2));
        const __m512 w = load16(wp, wd, i, w_dec);
        const __m512 sq = _mm512_sqrt_ps(v1);
        const __m512 denom = _mm512_add_ps(_mm512_mul_ps(sq, bc2_sqrt_inv), eps);
        const __m512 u = _mm512_div_ps(m1, denom);
        __m512 w1 = _mm512_sub_ps(_mm512_mul_ps(w, decay), _mm512_mul_ps(step_size, u));
        {   /* block_stats, 16 lanes: masked max / min leave a lane's accumulator as the 8-lane and / blend do */
            const __mmask16 big = _mm512_cmp_ps_mask(sq, tau, _CMP_GE_OQ);
            au = _mm512_mask_max_epi32(au, big, au, _mm512_and_si512(_mm512_castps_si512(u), abs_mask));
            ams = _mm512_mask_max_epi32(ams, (__mmask16)~big, ams, _mm512_and_si512(_mm512_castps_si512(m1), abs_mask));
            adn = _mm512_mask_min_epi32(adn, big, adn, _mm512_castps_si512(denom));
        }
        __m512 ym = _mm512_mul_ps(m1, m_enc), yv = _mm512_mul_ps(v1, v_enc);
        __m512 yw = has_master ? _mm512_mul_ps(w1, w_enc) : w1;
        if (sr) {
            const __m512i r0 = mix16(_mm512_add_epi32(key0, xg)), r1 = mix16(_mm512_add_epi32(key1, xg));
            xg = _mm512_add_epi32(xg, xg_step);
            ym = sr16(ym, r0, &sp_m);
            yv = sr16(yv, _mm512_and_si512(r1, _mm512_set1_epi32(0xFFFF)), &sp_v);
            if (sr_w) yw = sr16(yw, _mm512_srli_epi32(r1, 16), &sp_w);
        }
        am = _mm512_max_epi32(am, e4m3_encode16((uint8_t*)mp + i, ym));
        av = _mm256_max_epu16(av, _mm256_and_si256(f16_store16(vp, i, yv), _mm256_set1_epi16(0x7FFF)));
        if (has_master && wd == DT_F16) {  /* decode back what was just stored */
            const __m256i h = f16_store16(wp, i, yw);
            aw16 = _mm256_max_epu16(aw16, _mm256_and_si256(h, _mm256_set1_epi16(0x7FFF)));
            w1 = _mm512_mul_ps(_mm512_cvtph_ps(h), w_back);
        } else if (has_master) {  /* fp32 master: load8 of the stored value is the value itself */
            aw = _mm512_max_epi32(aw, store16(wp, wd, i, yw));
            w1 = _mm512_mul_ps(yw, w_back);
        } else {
            w1 = yw;
        }
        store16(pp, pd, i, w1);
    }
    acc[ST_M] = max_u32(acc[ST_M], _mm512_reduce_max_epu32(am));
    acc[ST_V] = max_u32(acc[ST_V], hmax16_u16(av));
    acc[ST_W] = max_u32(acc[ST_W], wd == DT_F16 ? hmax16_u16(aw16) : _mm512_reduce_max_epu32(aw));
    acc[ST_U_BIG] = max_u32(acc[ST_U_BIG], _mm512_reduce_max_epu32(au));
    acc[ST_M_SMALL] = max_u32(acc[ST_M_SMALL], _mm512_reduce_max_epu32(ams));
    const uint32_t dn = _mm512_reduce_min_epu32(adn);
    acc[ST_DENOM_BIG] = dn < acc[ST_DENOM_BIG] ? dn : acc[ST_DENOM_BIG];
    return i;
}

#define SPECIALISE16(PD, WD) \
    if (pd == PD && wd == WD) return a->rounding ? store_range16(a, t, begin, end, acc, PD, WD, 1) \
                                                 : store_range16(a, t, begin, end, acc, PD, WD, 0);
/* The store pass's 16-lane part where it applies (see the top of this file); returns where it stopped. */
static int64_t vector_dispatch16(const fp8adamw_args* a, int64_t t, int64_t begin, int64_t end, int pass,
                                 uint32_t* acc) {
    const int pd = a->param_dtype, wd = a->master_dtype;
    if (pass == 2 && a->exp_avg_dtype == DT_E4M3 && a->exp_avg_sq_dtype == DT_F16 && a->grad_dtype == pd) {
        SPECIALISE16(DT_F32, DT_F16)
        SPECIALISE16(DT_BF16, DT_F16)
        SPECIALISE16(DT_F32, DT_NONE)
        SPECIALISE16(DT_BF16, DT_NONE)
        SPECIALISE16(DT_BF16, DT_F32)
    }
    return begin;
}
#undef SPECIALISE16
#endif
#endif
