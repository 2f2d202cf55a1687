/* fp8adamw: the AVX2 vector loop (8 lanes) that keeps decode, update and encode in registers, and its
 * dispatch. The loop takes its dtypes as arguments and ``vector_dispatch`` calls it with constants for
 * the default state dtypes: the compiler then removes the per-vector dtype switches (~25% of the store
 * pass otherwise). */
#ifndef FP8ADAMW_LOOP8_H
#define FP8ADAMW_LOOP8_H
#include "fp8adamw_codecs8.h"
#ifdef FP8ADAMW_AVX2
/* Elements [begin, begin + 8k) of tensor t; returns where it stopped (the caller stages the rest). */
/* The dtypes are arguments so that the specialisations below compile them in as constants. */
static inline __attribute__((always_inline)) int64_t vector_range(
        const fp8adamw_args* a, int64_t t, int64_t begin, int64_t end, const int pass, uint32_t* acc,
        const int gd, const int pd, const int md, const int vd, const int master_dtype, const int sr) {
    const float* c = a->coef + t * N_COEF;
    const float* dm = a->scale_inv + t * N_SLOT;
    const float* em = a->new_scale + t * N_SLOT;
    const int has_master = master_dtype != DT_NONE;
    const int wd = has_master ? master_dtype : pd;
    void* mp = (void*)a->exp_avg[t];
    void* vp = (void*)a->exp_avg_sq[t];
    void* pp = (void*)a->param[t];
    void* wp = has_master ? (void*)a->master[t] : pp;
    const void* gp = (const void*)a->grad[t];
    const __m256 c1 = _mm256_set1_ps(c[C_ONE_MINUS_BETA1]), b2 = _mm256_set1_ps(c[C_BETA2]);
    const __m256 c2 = _mm256_set1_ps(c[C_ONE_MINUS_BETA2]), decay = _mm256_set1_ps(c[C_DECAY]);
    const __m256 step_size = _mm256_set1_ps(c[C_STEP_SIZE]), bc2_sqrt_inv = _mm256_set1_ps(c[C_BC2_SQRT_INV]);
    const __m256 eps = _mm256_set1_ps(c[C_EPS]), gmul = _mm256_set1_ps(c[C_GRAD_MUL]);
    const float wmul = has_master ? dm[S_W] : 1.0f, w_inv = 1.0f / em[S_W];  /* exact: 2**k */
    const __m256 m_dec = _mm256_set1_ps(dm[S_M]), v_dec = _mm256_set1_ps(dm[S_V]);
    const __m256 w_dec = _mm256_set1_ps(wmul), w_back = _mm256_set1_ps(w_inv);
    const __m256 m_enc = _mm256_set1_ps(em[S_M]), v_enc = _mm256_set1_ps(em[S_V]), w_enc = _mm256_set1_ps(em[S_W]);
    const int need_w = pass == 2 || a->w_amax_needed;
    /* stochastic rounding: element index i times GOLDEN, kept incrementally (i + 8: + 8 * GOLDEN) */
    const sr_spec sp_m = make_spec(md, 32), sp_v = make_spec(vd, 16), sp_w = make_spec(wd, 16);
    const int sr_m = sr && md != DT_F32, sr_v = sr && vd != DT_F32, sr_w = sr && wd != DT_F32;
    const __m256i key0 = _mm256_set1_epi32(sr ? (int)(uint32_t)a->sr_key[2 * t] : 0);
    const __m256i key1 = _mm256_set1_epi32(sr ? (int)(uint32_t)a->sr_key[2 * t + 1] : 0);
    __m256i xg = _mm256_mullo_epi32(_mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)begin),
                                                     _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
                                    _mm256_set1_epi32((int)GOLDEN));
    const __m256i xg_step = _mm256_set1_epi32((int)(8u * GOLDEN));
    __m256i am = _mm256_setzero_si256(), av = am, aw = am, au = am, ams = am;  /* maxima: bits */
    __m256i adn = _mm256_set1_epi32((int)INF_BITS);                           /* minimum: bits */
    const __m256 tau = _mm256_set1_ps(pass == 2 ? a->tau[t] : 0.0f);
    const __m256i inf_bits = _mm256_set1_epi32((int)INF_BITS);
    int64_t i = begin;
    for (; i + 8 <= end; i += 8) {
        const __m256 g = load8(gp, gd, i, gmul);
        const __m256 m = load8(mp, md, i, m_dec);
        const __m256 v = load8(vp, vd, i, v_dec);
        const __m256 m1 = _mm256_add_ps(m, _mm256_mul_ps(_mm256_sub_ps(g, m), c1));
        const __m256 v1 = _mm256_add_ps(_mm256_mul_ps(v, b2), _mm256_mul_ps(_mm256_mul_ps(g, g), c2));
        if (pass == 1) {
            am = _mm256_max_epi32(am, absbits8(m1));
            av = _mm256_max_epi32(av, absbits8(v1));
        }
        if (!need_w) continue;
        const __m256 w = load8(wp, wd, i, w_dec);
        const __m256 sq = _mm256_sqrt_ps(v1);
        const __m256 denom = _mm256_add_ps(_mm256_mul_ps(sq, bc2_sqrt_inv), eps);
        const __m256 u = _mm256_div_ps(m1, denom);
        __m256 w1 = _mm256_sub_ps(_mm256_mul_ps(w, decay), _mm256_mul_ps(step_size, u));
        if (pass == 1) {
            aw = _mm256_max_epi32(aw, absbits8(w1));
            continue;
        }
        {   /* block_stats, 8 lanes (every value here is finite: bits compare like magnitudes) */
            const __m256i big = _mm256_castps_si256(_mm256_cmp_ps(sq, tau, _CMP_GE_OQ));
            au = _mm256_max_epi32(au, _mm256_and_si256(big, abs8(u)));
            ams = _mm256_max_epi32(ams, _mm256_andnot_si256(big, abs8(m1)));
            adn = _mm256_min_epi32(adn, _mm256_blendv_epi8(inf_bits, _mm256_castps_si256(denom), big));
        }
        __m256 ym = _mm256_mul_ps(m1, m_enc), yv = _mm256_mul_ps(v1, v_enc);
        __m256 yw = has_master ? _mm256_mul_ps(w1, w_enc) : w1;
        if (sr) {
            const __m256i r0 = mix8(_mm256_add_epi32(key0, xg)), r1 = mix8(_mm256_add_epi32(key1, xg));
            xg = _mm256_add_epi32(xg, xg_step);
            if (sr_m) ym = sr8(ym, r0, &sp_m);
            if (sr_v) yv = sr8(yv, _mm256_and_si256(r1, _mm256_set1_epi32(0xFFFF)), &sp_v);
            if (sr_w) yw = sr8(yw, _mm256_srli_epi32(r1, 16), &sp_w);
        }
        am = mag_max(am, store8(mp, md, i, ym), md);
        av = mag_max(av, store8(vp, vd, i, yv), vd);
        if (has_master && wd == DT_F16) {  /* store8's fp16 case, keeping the codes to decode back */
            const __m128i h = _mm256_cvtps_ph(yw, _MM_FROUND_TO_NEAREST_INT);
            _mm_storeu_si128((__m128i*)((uint16_t*)wp + i), h);
            aw = _mm256_max_epu16(aw, _mm256_zextsi128_si256(_mm_and_si128(h, _mm_set1_epi16(0x7FFF))));
            w1 = _mm256_mul_ps(_mm256_cvtph_ps(h), w_back);  /* = load8 of what was just stored */
        } else if (has_master) {
            aw = mag_max(aw, store8(wp, wd, i, yw), wd);
            w1 = load8(wp, wd, i, w_back);
        } else {
            w1 = yw;
        }
        store8(pp, pd, i, w1);
    }
    const uint32_t r[N_SLOT] = {pass == 1 ? hmax8(am) : mag_hmax(am, md), pass == 1 ? hmax8(av) : mag_hmax(av, vd),
                                pass == 1 ? hmax8(aw) : mag_hmax(aw, wd)};
    for (int s = 0; s < N_SLOT; s++) acc[s] = max_u32(acc[s], r[s]);  /* pass 1: amax; store: ST_M, ST_V, ST_W */
    if (pass == 2) {
        acc[ST_U_BIG] = max_u32(acc[ST_U_BIG], hmax8(au));
        acc[ST_M_SMALL] = max_u32(acc[ST_M_SMALL], hmax8(ams));
        uint32_t lanes[8];
        _mm256_storeu_si256((__m256i*)lanes, adn);
        for (int j = 0; j < 8; j++) acc[ST_DENOM_BIG] = lanes[j] < acc[ST_DENOM_BIG] ? lanes[j] : acc[ST_DENOM_BIG];
    }
    return i;
}

#define VECTOR_PASS(pass, acc, gd, pd, md, vd, wd, sr) \
    vector_range(a, t, begin, end, pass, acc, gd, pd, md, vd, wd, sr)
#define SPECIALISE(PD, WD)                                                                        \
    if (pd == PD && wd == WD)                                                                     \
        return pass == 1 ? VECTOR_PASS(1, acc, PD, PD, DT_E4M3, DT_F16, WD, 0)                 \
             : a->rounding ? VECTOR_PASS(2, acc, PD, PD, DT_E4M3, DT_F16, WD, 1)               \
                           : VECTOR_PASS(2, acc, PD, PD, DT_E4M3, DT_F16, WD, 0);
/* Specialised loops for e4m3 m and fp16 v with fp32 or bf16 parameters (gradients alike) and an
   fp16, fp32 or no master; every other combination takes the generic loop (dtype switches per
   vector, ~25% slower). */
static int64_t vector_dispatch(const fp8adamw_args* a, int64_t t, int64_t begin, int64_t end, int pass, uint32_t* acc) {
    const int gd = a->grad_dtype, pd = a->param_dtype, wd = a->master_dtype;
    if (a->exp_avg_dtype == DT_E4M3 && a->exp_avg_sq_dtype == DT_F16 && gd == pd) {
        SPECIALISE(DT_F32, DT_F16)
        SPECIALISE(DT_BF16, DT_F16)
        SPECIALISE(DT_F32, DT_NONE)
        SPECIALISE(DT_BF16, DT_NONE)
        SPECIALISE(DT_BF16, DT_F32)
    }
    return pass == 1 ? VECTOR_PASS(1, acc, gd, pd, a->exp_avg_dtype, a->exp_avg_sq_dtype, wd, 0)
                     : VECTOR_PASS(2, acc, gd, pd, a->exp_avg_dtype, a->exp_avg_sq_dtype, wd, a->rounding);
}
#undef SPECIALISE
#undef VECTOR_PASS
#endif
#endif
