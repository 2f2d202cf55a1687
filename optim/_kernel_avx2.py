"""AVX2 + F16C part of the fused CPU kernel (see ``_kernel_src.py``): the e4m3 codecs 8 lanes at a
time, and the per-tensor vector loop that keeps decode, update and encode in registers.

Each vector operation repeats, lane by lane, the scalar operation of the portable code (same order,
same rounding), so a tensor gives the same bits whichever loop handles which element. The loop takes
its dtypes as arguments and ``vector_dispatch`` calls it with constants for the default state dtypes:
the compiler then removes the per-vector dtype switches (~25% of pass 2 otherwise).
"""

__all__ = ["AVX2_CODECS", "AVX2_LOOPS"]

AVX2_CODECS = r"""
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

/* 8 floats (already scaled) -> 8 e4m3 codes: the scalar encoder below, 8 lanes at once */
static inline void e4m3_encode8(uint8_t* d, __m256 y) {
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
    code = _mm256_or_si256(code, sign);
    const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
    _mm_storel_epi64((__m128i*)d, _mm_packus_epi16(w16, w16));
}
#endif

"""

AVX2_LOOPS = r"""
#ifdef FP8ADAMW_AVX2
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

static inline void store8(void* base, int dtype, int64_t i, __m256 x) {  /* x already scaled */
    switch (dtype) {
    case DT_F32: _mm256_storeu_ps((float*)base + i, x); break;
    case DT_BF16: {  /* no NaN case: pass 2 only ever stores finite values */
        const __m256i u = _mm256_castps_si256(x);
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
        _mm_storeu_si128((__m128i*)((uint16_t*)base + i),
                         _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
        break; }
    case DT_F16: _mm_storeu_si128((__m128i*)((uint16_t*)base + i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT)); break;
    default: e4m3_encode8((uint8_t*)base + i, x);
    }
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

/* Elements [begin, begin + 8k) of tensor t; returns where it stopped (the caller stages the rest). */
/* The dtypes are arguments so that the specialisations below compile them in as constants. */
static inline __attribute__((always_inline)) int64_t vector_range(
        const fp8adamw_args* a, int64_t t, int64_t begin, int64_t end, const int pass, uint32_t* amax3,
        const int gd, const int pd, const int md, const int vd, const int master_dtype) {
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
    __m256i am = _mm256_setzero_si256(), av = am, aw = am;
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
        const __m256 denom = _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(v1), bc2_sqrt_inv), eps);
        __m256 w1 = _mm256_sub_ps(_mm256_mul_ps(w, decay), _mm256_mul_ps(step_size, _mm256_div_ps(m1, denom)));
        if (pass == 1) {
            aw = _mm256_max_epi32(aw, absbits8(w1));
            continue;
        }
        store8(mp, md, i, _mm256_mul_ps(m1, m_enc));
        store8(vp, vd, i, _mm256_mul_ps(v1, v_enc));
        if (has_master) {
            store8(wp, wd, i, _mm256_mul_ps(w1, w_enc));
            w1 = load8(wp, wd, i, w_back);
        }
        store8(pp, pd, i, w1);
    }
    if (pass == 1) {
        const uint32_t r[N_SLOT] = {hmax8(am), hmax8(av), hmax8(aw)};
        for (int s = 0; s < N_SLOT; s++) amax3[s] = r[s] > amax3[s] ? r[s] : amax3[s];
    }
    return i;
}

#define VECTOR_PASS(pass, amax3, gd, pd, md, vd, wd) vector_range(a, t, begin, end, pass, amax3, gd, pd, md, vd, wd)
#define SPECIALISE(PD, WD)                                                                        \
    if (pd == PD && wd == WD)                                                                     \
        return pass == 1 ? VECTOR_PASS(1, amax3, PD, PD, DT_E4M3, DT_F16, WD)                    \
                         : VECTOR_PASS(2, amax3, PD, PD, DT_E4M3, DT_F16, WD);
/* Specialised loops for e4m3 m and fp16 v with fp32 or bf16 parameters (gradients alike) and an
   fp16, fp32 or no master; every other combination takes the generic loop (dtype switches per
   vector, ~25% slower). */
static int64_t vector_dispatch(const fp8adamw_args* a, int64_t t, int64_t begin, int64_t end, int pass, uint32_t* amax3) {
    const int gd = a->grad_dtype, pd = a->param_dtype, wd = a->master_dtype;
    if (a->exp_avg_dtype == DT_E4M3 && a->exp_avg_sq_dtype == DT_F16 && gd == pd) {
        SPECIALISE(DT_F32, DT_F16)
        SPECIALISE(DT_BF16, DT_F16)
        SPECIALISE(DT_F32, DT_NONE)
        SPECIALISE(DT_BF16, DT_NONE)
        SPECIALISE(DT_BF16, DT_F32)
    }
    return pass == 1 ? VECTOR_PASS(1, amax3, gd, pd, a->exp_avg_dtype, a->exp_avg_sq_dtype, wd)
                     : VECTOR_PASS(2, amax3, gd, pd, a->exp_avg_dtype, a->exp_avg_sq_dtype, wd);
}
#undef SPECIALISE
#undef VECTOR_PASS
#endif

"""
