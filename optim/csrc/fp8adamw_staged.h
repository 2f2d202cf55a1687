/* fp8adamw: the portable staged loop: blocks of BLOCK elements decoded to fp32 on the stack, the
 * update, the statistics, the stores. Runs what the vector loops leave (tails), or everything on
 * machines without AVX2. The e4m3 encoder is ``fp8train.cast.cast_to_fp8_reference`` (clamp to 448,
 * round to nearest even) in integer arithmetic on the fp32 bits; the decoder builds the value as an
 * exact integer times 2**-9. */
#ifndef FP8ADAMW_STAGED_H
#define FP8ADAMW_STAGED_H
#include "fp8adamw_common.h"
#include "fp8adamw_codecs8.h"


static void load_block(float* restrict dst, const void* base, int dtype, int64_t off, int n, float mul) {
    int i = 0;
    switch (dtype) {
    case DT_F32: { const float* s = (const float*)base + off; for (; i < n; i++) dst[i] = s[i] * mul; break; }
    case DT_BF16: { const uint16_t* s = (const uint16_t*)base + off;
        for (; i < n; i++) dst[i] = bits_f32((uint32_t)s[i] << 16) * mul;
        break; }
    case DT_F16: { const uint16_t* s = (const uint16_t*)base + off;
#ifdef FP8ADAMW_F16C
        const __m256 vm = _mm256_set1_ps(mul);
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + i))), vm));
        for (; i < n; i++) dst[i] = _cvtsh_ss(s[i]) * mul;
#else
        const _Float16* h = (const _Float16*)s; for (; i < n; i++) dst[i] = (float)h[i] * mul;
#endif
        break; }
    case DT_E4M3: { const uint8_t* s = (const uint8_t*)base + off; const float mul9 = mul * 0x1p-9f;
#ifdef FP8ADAMW_AVX2
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, e4m3_decode8(s + i, _mm256_set1_ps(mul)));
#endif
        for (; i < n; i++) {  /* |value| = mantissa integer * 2**(e-1) * 2**-9 (e = 0: subnormal) */
            int32_t b = s[i], e = (b >> 3) & 15, normal = e > 0;
            float v = (float)(((b & 7) + (normal << 3)) << (e - normal)) * mul9;
            dst[i] = (b & 0x80) ? -v : v;
        }
        break; }
    }
}

/* Stores n values (times mul) in dtype; returns the largest stored magnitude as bits of that dtype
   (sign cleared; non-negative values of every format order like their bit patterns). */
static uint32_t store_block(void* base, int dtype, int64_t off, int n, const float* restrict src, float mul,
                            const uint32_t* rnd, int random_bits) {
    int i = 0;
    uint32_t top = 0;
    float y[BLOCK];
    if (rnd && dtype != DT_F32) {  /* stochastic: onto the grid first; the nearest store keeps it */
        const sr_spec sp = make_spec(dtype, random_bits);
        for (int j = 0; j < n; j++) y[j] = sr1(src[j] * mul, rnd[j], &sp);
        src = y;
        mul = 1.0f;
    }
    switch (dtype) {
    case DT_F32: { float* d = (float*)base + off;
        for (; i < n; i++) { d[i] = src[i] * mul; uint32_t b = f32_bits(d[i]) & 0x7FFFFFFFu; top = b > top ? b : top; }
        break; }
    case DT_BF16: { uint16_t* d = (uint16_t*)base + off;
        for (; i < n; i++) {  /* round to nearest even on the bits; NaN -> canonical 0x7FC0 (as torch) */
            float x = src[i] * mul; uint32_t u = f32_bits(x);
            uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
            d[i] = (x != x) ? (uint16_t)0x7FC0 : (uint16_t)r;
            uint32_t b = d[i] & 0x7FFFu; top = b > top ? b : top;
        }
        break; }
    case DT_F16: { uint16_t* d = (uint16_t*)base + off;
#ifdef FP8ADAMW_F16C
        const __m256 vm = _mm256_set1_ps(mul);
        __m128i acc = _mm_setzero_si128();
        for (; i + 8 <= n; i += 8) {
            const __m128i h = _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(src + i), vm), _MM_FROUND_TO_NEAREST_INT);
            _mm_storeu_si128((__m128i*)(d + i), h);
            acc = _mm_max_epu16(acc, _mm_and_si128(h, _mm_set1_epi16(0x7FFF)));
        }
        uint16_t lanes[8];
        _mm_storeu_si128((__m128i*)lanes, acc);
        for (int j = 0; j < 8; j++) top = lanes[j] > top ? lanes[j] : top;
        for (; i < n; i++) {
            d[i] = _cvtss_sh(src[i] * mul, _MM_FROUND_TO_NEAREST_INT);
            top = max_u32(top, d[i] & 0x7FFFu);
        }
#else
        _Float16* h = (_Float16*)d;
        for (; i < n; i++) { h[i] = (_Float16)(src[i] * mul); top = max_u32(top, d[i] & 0x7FFFu); }
#endif
        break; }
    case DT_E4M3: { uint8_t* d = (uint8_t*)base + off;
#ifdef FP8ADAMW_AVX2
        __m256i acc = _mm256_setzero_si256();
        for (; i + 8 <= n; i += 8)
            acc = _mm256_max_epi32(acc, e4m3_encode8(d + i, _mm256_mul_ps(_mm256_loadu_ps(src + i),
                                                                          _mm256_set1_ps(mul))));
        uint32_t lanes[8];
        _mm256_storeu_si256((__m256i*)lanes, acc);
        for (int j = 0; j < 8; j++) top = lanes[j] > top ? lanes[j] : top;
#endif
        for (; i < n; i++) {  /* fp8train.cast._cast_bits: clamp to 448, round at 3 mantissa bits */
            uint32_t yb = f32_bits(src[i] * mul);
            uint32_t sign = (yb >> 24) & 0x80u, ab = yb & 0x7FFFFFFFu;
            uint32_t cb = ab < 0x43E00000u ? ab : 0x43E00000u;               /* |y| clamped, inf too */
            uint32_t code_normal = ((cb + 0x7FFFFu + ((cb >> 20) & 1u)) >> 20) - 960u;
            uint32_t code_sub = f32_bits(bits_f32(cb) * 512.0f + 0x1p23f) - 0x4B000000u;  /* rint */
            uint32_t code = cb < 0x3C800000u ? code_sub : code_normal;        /* below 2**-6 */
            code = ab > 0x7F800000u ? 0x7Fu : code;                            /* NaN */
            d[i] = (uint8_t)(code | sign);
            top = code > top ? code : top;
        }
        break; }
    }
    return top;
}

/* The AdamW update of one block, in fp32; _eager.py performs the same operations in the same order.
   sq, dn, up (may be NULL together): sqrt(v_new), the denominator and m_new / denom, for the statistics. */
static void math_block(int n, const float* restrict g, const float* restrict m, const float* restrict v,
                       const float* restrict w, float* restrict mn, float* restrict vn, float* restrict wn,
                       float* restrict sq, float* restrict dn, float* restrict up, const float* c) {
    const float c1 = c[C_ONE_MINUS_BETA1], b2 = c[C_BETA2], c2 = c[C_ONE_MINUS_BETA2], decay = c[C_DECAY];
    const float step_size = c[C_STEP_SIZE], bc2_sqrt_inv = c[C_BC2_SQRT_INV], eps = c[C_EPS];
    for (int i = 0; i < n; i++) {
        float m1 = m[i] + (g[i] - m[i]) * c1;
        float v1 = v[i] * b2 + (g[i] * g[i]) * c2;
        float s = sqrtf(v1);
        float denom = s * bc2_sqrt_inv + eps;
        float u = m1 / denom;
        mn[i] = m1;
        vn[i] = v1;
        wn[i] = w[i] * decay - step_size * u;
        if (sq) { sq[i] = s; dn[i] = denom; up[i] = u; }
    }
}
/* decode one block of gradient and states, then the update: shared by both passes */
static void step_block(const fp8adamw_args* a, int64_t t, int64_t off, int n, float* g, float* m, float* v,
                       float* w, float* mn, float* vn, float* wn, float* sq, float* dn, float* up) {
    const float* c = a->coef + t * N_COEF;
    const float* dm = a->scale_inv + t * N_SLOT;
    load_block(g, (const void*)a->grad[t], a->grad_dtype, off, n, c[C_GRAD_MUL]);
    load_block(m, (const void*)a->exp_avg[t], a->exp_avg_dtype, off, n, dm[S_M]);
    load_block(v, (const void*)a->exp_avg_sq[t], a->exp_avg_sq_dtype, off, n, dm[S_V]);
    if (a->master_dtype == DT_NONE) load_block(w, (const void*)a->param[t], a->param_dtype, off, n, 1.0f);
    else load_block(w, (const void*)a->master[t], a->master_dtype, off, n, dm[S_W]);
    math_block(n, g, m, v, w, mn, vn, wn, sq, dn, up, c);
}


/* The big / small statistics of one block (see N_STAT). */
static void block_stats(int n, const float* mn, const float* sq, const float* dn, const float* up, float tau,
                        uint32_t* st) {
    for (int i = 0; i < n; i++) {
        if (sq[i] >= tau) {
            st[ST_U_BIG] = max_u32(st[ST_U_BIG], f32_bits(up[i]) & 0x7FFFFFFFu);
            const uint32_t d = f32_bits(dn[i]);
            st[ST_DENOM_BIG] = d < st[ST_DENOM_BIG] ? d : st[ST_DENOM_BIG];
        } else {
            st[ST_M_SMALL] = max_u32(st[ST_M_SMALL], f32_bits(mn[i]) & 0x7FFFFFFFu);
        }
    }
}

/* Elements [begin, end) of tensor t through fp32 staging blocks (portable; also the AVX2 tails).
   pass 1: acc is amax3 (the new values' amax); pass 2 (the store pass): acc is the tensor's N_STAT statistics. */
static void staged_range(const fp8adamw_args* a, int64_t t, int64_t begin, int64_t end, int pass, uint32_t* acc) {
    float g[BLOCK], m[BLOCK], v[BLOCK], w[BLOCK], mn[BLOCK], vn[BLOCK], wn[BLOCK], sq[BLOCK], dn[BLOCK], up[BLOCK];
    const float* em = a->new_scale + t * N_SLOT;
    for (int64_t off = begin; off < end; off += BLOCK) {
        int n = (int)(end - off < BLOCK ? end - off : BLOCK);
        step_block(a, t, off, n, g, m, v, w, mn, vn, wn, pass == 1 ? NULL : sq, dn, up);
        if (pass == 1) {
            acc[S_M] = absmax_bits(acc[S_M], mn, n);
            acc[S_V] = absmax_bits(acc[S_V], vn, n);
            if (a->w_amax_needed) acc[S_W] = absmax_bits(acc[S_W], wn, n);
            continue;
        }
        block_stats(n, mn, sq, dn, up, a->tau[t], acc);
        uint32_t r0[BLOCK], rv[BLOCK], rw[BLOCK];
        const int sr = a->rounding;
        if (sr) {
            const uint32_t k0 = (uint32_t)a->sr_key[2 * t], k1 = (uint32_t)a->sr_key[2 * t + 1];
            for (int i = 0; i < n; i++) {
                const uint32_t x = (uint32_t)(off + i) * GOLDEN, r1 = mix32(k1 + x);
                r0[i] = mix32(k0 + x);
                rv[i] = r1 & 0xFFFFu;
                rw[i] = r1 >> 16;
            }
        }
        acc[ST_M] = max_u32(acc[ST_M], store_block((void*)a->exp_avg[t], a->exp_avg_dtype, off, n, mn, em[S_M],
                                                   sr ? r0 : NULL, 32));
        acc[ST_V] = max_u32(acc[ST_V], store_block((void*)a->exp_avg_sq[t], a->exp_avg_sq_dtype, off, n, vn, em[S_V],
                                                   sr ? rv : NULL, 16));
        if (a->master_dtype != DT_NONE) {
            acc[ST_W] = max_u32(acc[ST_W], store_block((void*)a->master[t], a->master_dtype, off, n, wn, em[S_W],
                                                       sr ? rw : NULL, 16));
            load_block(wn, (const void*)a->master[t], a->master_dtype, off, n, 1.0f / em[S_W]);  /* exact: 2**k */
            store_block((void*)a->param[t], a->param_dtype, off, n, wn, 1.0f, NULL, 16);
        } else {
            store_block((void*)a->param[t], a->param_dtype, off, n, wn, 1.0f, sr ? rw : NULL, 16);
        }
    }
}

#endif
