/*
 * fp8train.optim fused CPU step, built by _kernel.py with the system C compiler.
 *
 * Entry points: fp8adamw_grad_amax (max |g| per tensor, read before anything is written),
 * fp8adamw_store (the step's one pass: update, store with the given scales, per-tensor statistics for
 * the next step's bounds, _bounds.py) and fp8adamw_pass1 (exact amax of the new values, writing
 * nothing: only for two-pass steps, where a bound is unusable).
 *
 * Numerics are those of the eager path (``_eager.py``), operation for operation: each arithmetic line is
 * one IEEE fp32 operation in the same order, compiled with ``-ffp-contract=off`` (no FMA contraction)
 * and without -ffast-math, so both paths give bit-identical states (tested for every dtype
 * combination). The e4m3 encoder is ``fp8train.cast.cast_to_fp8_reference`` (clamp to 448, round to
 * nearest even) written in integer arithmetic on the fp32 bits, as fp8train's compiled CPU cast does;
 * the e4m3 decoder builds the value as an exact integer times 2**-9.
 * Aliasing: with FP8 primary weights the "param" pointer IS the gradient's buffer. Every loop decodes an
 * element's gradient before it writes that element's weight, and fp8adamw_grad_amax has returned before
 * fp8adamw_store starts.
 * With rounding = 1 each stored value is first rounded stochastically onto its format's grid (sr1 /
 * sr8: _rounding.py's rule and hash, in uint32), after which the nearest encoders store it unchanged.
 *
 * Layout of one pass: the tensors of a bucket are cut into chunks of 64 Ki elements, chunks run in
 * parallel (OpenMP, torch's thread count); a chunk runs the AVX2 loop over whole vectors of 8 and the
 * portable staged loop (blocks of 512 elements decoded to fp32 on the stack) over what is left, or
 * over everything on machines without AVX2.
 *
 * AVX2 + F16C part: the e4m3 codecs 8 lanes at a time, and the per-tensor vector loop that keeps decode, update and encode in registers.
 *
 * Each vector operation repeats, lane by lane, the scalar operation of the portable code (same order,
 * same rounding), so a tensor gives the same bits whichever loop handles which element. The loop takes
 * its dtypes as arguments and ``vector_dispatch`` calls it with constants for the default state dtypes:
 * the compiler then removes the per-vector dtype switches (~25% of the store pass otherwise).
 *
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#define FP8ADAMW_F16C 1
#endif
#if defined(__AVX2__) && defined(FP8ADAMW_F16C)
#define FP8ADAMW_AVX2 1
#endif

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2, DT_E4M3 = 3, DT_NONE = -1 };
enum { C_ONE_MINUS_BETA1, C_BETA2, C_ONE_MINUS_BETA2, C_DECAY, C_STEP_SIZE, C_BC2_SQRT_INV, C_EPS,
       C_GRAD_MUL, N_COEF };
enum { S_M, S_V, S_W, N_SLOT };
/* store pass statistics per tensor (uint32 bit patterns; _bounds.py turns them into the next step's records):
   the largest stored code magnitude of m, v and the master (bits of the stored format, sign cleared), and over the
   elements whose sqrt(v_new) >= tau ("big") the largest |m_new / denom| and the smallest denom, over the others
   ("small") the largest |m_new| */
enum { ST_M, ST_V, ST_W, ST_U_BIG, ST_DENOM_BIG, ST_M_SMALL, N_STAT };
#define INF_BITS 0x7F800000u
#define BLOCK 512        /* elements staged in fp32 on the stack (7 arrays: 14 KiB, L1-resident) */
#define CHUNK (1 << 16)  /* elements per parallel work item */

typedef struct {
    int64_t n_tensors;
    const int64_t* numel;
    const int64_t* grad;        /* data pointers, one per tensor */
    const int64_t* param;
    const int64_t* exp_avg;
    const int64_t* exp_avg_sq;
    const int64_t* master;      /* unused when master_dtype == DT_NONE */
    int32_t grad_dtype, param_dtype, exp_avg_dtype, exp_avg_sq_dtype, master_dtype, n_threads;
    int32_t w_amax_needed;      /* 0: pass 1 may skip the weight (sqrt, divide): its scale is fixed */
    const float* coef;          /* [n][N_COEF] */
    const float* scale_inv;     /* [n][N_SLOT] 1 / scale of the stored m, v, master (powers of two) */
    const float* new_scale;     /* [n][N_SLOT] scales to store with (store pass) */
    float* amax;                /* [n][N_SLOT] pass 1 output; NaN reported as inf */
    int32_t rounding;           /* 0: round to nearest even; 1: stochastic (_rounding.py) */
    const int64_t* sr_key;      /* [n][2] stream keys (uint32 values) of this step, when stochastic */
    const float* tau;           /* [n] store pass: threshold on sqrt(v_new) between "big" and "small" elements */
    uint32_t* stats;            /* [n][N_STAT] store pass output */
    float* grad_amax;           /* [n] fp8adamw_grad_amax output: max |g|, NaN reported as inf */
} fp8adamw_args;

static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline uint32_t max_u32(uint32_t a, uint32_t b) { return a > b ? a : b; }

/* ---- stochastic rounding: _rounding.py is the reference (same hash, same rule, same bits) ---- */
#define GOLDEN 0x9E3779B9u
static inline uint32_t mix32(uint32_t x) {  /* lowbias32 */
    x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; x ^= x >> 16;
    return x;
}
typedef struct { uint32_t d_mask, clamp, min_normal, k; float up, down; } sr_spec;
/* _rounding.SR_SPECS with k = sub_bits(random_bits): up = 2**(log2_q + k), down = 2**-log2_q */
static sr_spec make_spec(int dtype, int random_bits) {
    sr_spec s = {0, 0x7F7F0000u, 0, 0, 1.0f, 1.0f};  /* bf16: no subnormal branch */
    if (dtype == DT_BF16) { s.d_mask = 0xFFFFu; return s; }
    if (dtype == DT_E4M3) {
        s.d_mask = 0xFFFFFu; s.clamp = 0x43E00000u; s.min_normal = 0x3C800000u;
        s.k = random_bits < 28 ? (uint32_t)random_bits : 28u; s.up = ldexpf(1.0f, 9 + (int)s.k); s.down = 0x1p-9f;
    } else {  /* DT_F16 */
        s.d_mask = 0x1FFFu; s.clamp = 0x477FE000u; s.min_normal = 0x38800000u;
        s.k = random_bits < 21 ? (uint32_t)random_bits : 21u; s.up = ldexpf(1.0f, 24 + (int)s.k); s.down = 0x1p-24f;
    }
    return s;
}
static inline float sr1(float y, uint32_t r, const sr_spec* s) {
    uint32_t b = f32_bits(y), ab = b & 0x7FFFFFFFu;
    ab = ab < s->clamp ? ab : s->clamp;
    uint32_t out = (ab + (r & s->d_mask)) & ~s->d_mask;
    if (ab < s->min_normal) {
        uint32_t t = (uint32_t)(int32_t)(bits_f32(ab) * s->up);
        uint32_t code = (t + (r & ((1u << s->k) - 1u))) >> s->k;
        out = f32_bits((float)code * s->down);
    }
    return bits_f32(out | (b & 0x80000000u));
}


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
#endif


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

static inline uint32_t absmax_bits(uint32_t acc, const float* restrict x, int n) {
    /* max |x| on bit patterns (non-negative floats order like their bits); NaN counts as inf */
    for (int i = 0; i < n; i++) {
        uint32_t ab = f32_bits(x[i]) & 0x7FFFFFFFu;
        ab = ab < 0x7F800000u ? ab : 0x7F800000u;
        acc = ab > acc ? ab : acc;
    }
    return acc;
}

typedef struct { int64_t t, begin, end; } chunk_t;

static chunk_t* make_chunks(const fp8adamw_args* a, int64_t* n_chunks) {
    int64_t total = 0, k = 0;
    for (int64_t t = 0; t < a->n_tensors; t++) total += (a->numel[t] + CHUNK - 1) / CHUNK;
    chunk_t* chunks = (chunk_t*)malloc(sizeof(chunk_t) * (size_t)(total > 0 ? total : 1));
    if (!chunks) return NULL;
    for (int64_t t = 0; t < a->n_tensors; t++)
        for (int64_t b = 0; b < a->numel[t]; b += CHUNK) {
            chunks[k].t = t;
            chunks[k].begin = b;
            chunks[k].end = b + CHUNK < a->numel[t] ? b + CHUNK : a->numel[t];
            k++;
        }
    *n_chunks = total;
    return chunks;
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


static void range_pass(const fp8adamw_args* a, int64_t t, int64_t begin, int64_t end, int pass, uint32_t* acc) {
#ifdef FP8ADAMW_AVX2
    begin = vector_dispatch(a, t, begin, end, pass, acc);
#endif
    if (begin < end) staged_range(a, t, begin, end, pass, acc);
}

/* One pass over every chunk; per-tensor results reduced from per-chunk partials (width values each,
   maxima except ST_DENOM_BIG, a minimum, in the store pass). Returns 1 when out of memory. */
static int run_pass(const fp8adamw_args* a, int pass, int width, uint32_t* out) {
    int64_t n_chunks = 0;
    chunk_t* chunks = make_chunks(a, &n_chunks);
    uint32_t* part = (uint32_t*)calloc((size_t)(n_chunks > 0 ? n_chunks : 1) * width, sizeof(uint32_t));
    if (!chunks || !part) { free(chunks); free(part); return 1; }
    const int min_col = pass == 2 ? ST_DENOM_BIG : -1;
    for (int64_t k = 0; k < n_chunks; k++)
        if (min_col >= 0) part[k * width + min_col] = INF_BITS;
    for (int64_t i = 0; i < a->n_tensors; i++)
        for (int s = 0; s < width; s++) out[i * width + s] = s == min_col ? INF_BITS : 0u;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(a->n_threads)
    for (int64_t k = 0; k < n_chunks; k++)
        range_pass(a, chunks[k].t, chunks[k].begin, chunks[k].end, pass, part + k * width);
    for (int64_t k = 0; k < n_chunks; k++)
        for (int s = 0; s < width; s++) {
            uint32_t* dst = out + chunks[k].t * width + s;
            const uint32_t x = part[k * width + s];
            *dst = s == min_col ? (x < *dst ? x : *dst) : (x > *dst ? x : *dst);
        }
    free(chunks); free(part);
    return 0;
}

/* Pass 1 (two-pass steps only): amax of the new m, v and weight of every tensor; writes nothing but a->amax. */
int fp8adamw_pass1(const fp8adamw_args* a) {
    uint32_t* acc = (uint32_t*)calloc((size_t)(a->n_tensors > 0 ? a->n_tensors : 1) * N_SLOT, sizeof(uint32_t));
    if (!acc || run_pass(a, 1, N_SLOT, acc)) { free(acc); return 1; }
    for (int64_t i = 0; i < a->n_tensors * N_SLOT; i++) a->amax[i] = bits_f32(acc[i]);
    free(acc);
    return 0;
}

/* The store pass: the update, stored with a->new_scale; the parameter receives the value the master now holds
   (decoded back), or the update itself when the parameter is the master; a->stats gets the statistics. */
int fp8adamw_store(const fp8adamw_args* a) {
    return run_pass(a, 2, N_STAT, a->stats);
}

/* max |g| of every tensor (NaN reported as inf): read before the store pass, which may write the weight
   into the gradient's buffer (FP8 primary weights). */
static void grad_amax_range(const fp8adamw_args* a, int64_t t, int64_t begin, int64_t end, uint32_t* acc) {
    const void* gp = (const void*)a->grad[t];
    int64_t i = begin;
#ifdef FP8ADAMW_AVX2
    __m256i t0 = _mm256_setzero_si256(), t1 = t0, t2 = t0, t3 = t0;  /* independent chains */
    if (a->grad_dtype == DT_F32) {
        const float* g = (const float*)gp;
        for (; i + 32 <= end; i += 32) {
            t0 = _mm256_max_epi32(t0, absbits8(_mm256_loadu_ps(g + i)));
            t1 = _mm256_max_epi32(t1, absbits8(_mm256_loadu_ps(g + i + 8)));
            t2 = _mm256_max_epi32(t2, absbits8(_mm256_loadu_ps(g + i + 16)));
            t3 = _mm256_max_epi32(t3, absbits8(_mm256_loadu_ps(g + i + 24)));
        }
    }
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= end; i += 8) t0 = _mm256_max_epi32(t0, absbits8(load8(gp, a->grad_dtype, i, one)));
    acc[0] = max_u32(acc[0], hmax8(_mm256_max_epi32(_mm256_max_epi32(t0, t1), _mm256_max_epi32(t2, t3))));
#endif
    float g[BLOCK];
    for (; i < end; i += BLOCK) {
        const int n = (int)(end - i < BLOCK ? end - i : BLOCK);
        load_block(g, gp, a->grad_dtype, i, n, 1.0f);
        acc[0] = absmax_bits(acc[0], g, n);
    }
}

int fp8adamw_grad_amax(const fp8adamw_args* a) {
    int64_t n_chunks = 0;
    chunk_t* chunks = make_chunks(a, &n_chunks);
    uint32_t* part = (uint32_t*)calloc((size_t)(n_chunks > 0 ? n_chunks : 1), sizeof(uint32_t));
    if (!chunks || !part) { free(chunks); free(part); return 1; }
    #pragma omp parallel for schedule(dynamic, 1) num_threads(a->n_threads)
    for (int64_t k = 0; k < n_chunks; k++) grad_amax_range(a, chunks[k].t, chunks[k].begin, chunks[k].end, part + k);
    for (int64_t i = 0; i < a->n_tensors; i++) a->grad_amax[i] = 0.0f;
    for (int64_t k = 0; k < n_chunks; k++) {
        const float x = bits_f32(part[k]);
        if (x > a->grad_amax[chunks[k].t]) a->grad_amax[chunks[k].t] = x;
    }
    free(chunks); free(part);
    return 0;
}
