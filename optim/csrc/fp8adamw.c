/*
 * fp8train.optim fused CPU step, built by _kernel.py with the system C compiler.
 *
 * Numerics are those of the eager path (``_eager.py``), operation for operation: each arithmetic line is
 * one IEEE fp32 operation in the same order, compiled with ``-ffp-contract=off`` (no FMA contraction)
 * and without -ffast-math, so both paths give bit-identical states (tested for every dtype
 * combination). The e4m3 encoder is ``fp8train.cast.cast_to_fp8_reference`` (clamp to 448, round to
 * nearest even) written in integer arithmetic on the fp32 bits, as fp8train's compiled CPU cast does;
 * the e4m3 decoder builds the value as an exact integer times 2**-9.
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
 * the compiler then removes the per-vector dtype switches (~25% of pass 2 otherwise).
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
    const float* new_scale;     /* [n][N_SLOT] scales to store with (pass 2) */
    float* amax;                /* [n][N_SLOT] pass 1 output; NaN reported as inf */
} fp8adamw_args;

static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }


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

static void store_block(void* base, int dtype, int64_t off, int n, const float* restrict src, float mul) {
    int i = 0;
    switch (dtype) {
    case DT_F32: { float* d = (float*)base + off; for (; i < n; i++) d[i] = src[i] * mul; break; }
    case DT_BF16: { uint16_t* d = (uint16_t*)base + off;
        for (; i < n; i++) {  /* round to nearest even on the bits; NaN -> canonical 0x7FC0 (as torch) */
            float x = src[i] * mul; uint32_t u = f32_bits(x);
            uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
            d[i] = (x != x) ? (uint16_t)0x7FC0 : (uint16_t)r;
        }
        break; }
    case DT_F16: { uint16_t* d = (uint16_t*)base + off;
#ifdef FP8ADAMW_F16C
        const __m256 vm = _mm256_set1_ps(mul);
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i*)(d + i),
                             _mm256_cvtps_ph(_mm256_mul_ps(_mm256_loadu_ps(src + i), vm), _MM_FROUND_TO_NEAREST_INT));
        for (; i < n; i++) d[i] = _cvtss_sh(src[i] * mul, _MM_FROUND_TO_NEAREST_INT);
#else
        _Float16* h = (_Float16*)d; for (; i < n; i++) h[i] = (_Float16)(src[i] * mul);
#endif
        break; }
    case DT_E4M3: { uint8_t* d = (uint8_t*)base + off;
#ifdef FP8ADAMW_AVX2
        for (; i + 8 <= n; i += 8) e4m3_encode8(d + i, _mm256_mul_ps(_mm256_loadu_ps(src + i), _mm256_set1_ps(mul)));
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
        }
        break; }
    }
}

/* The AdamW update of one block, in fp32; _eager.py performs the same operations in the same order. */
static void math_block(int n, const float* restrict g, const float* restrict m, const float* restrict v,
                       const float* restrict w, float* restrict mn, float* restrict vn, float* restrict wn,
                       const float* c) {
    const float c1 = c[C_ONE_MINUS_BETA1], b2 = c[C_BETA2], c2 = c[C_ONE_MINUS_BETA2], decay = c[C_DECAY];
    const float step_size = c[C_STEP_SIZE], bc2_sqrt_inv = c[C_BC2_SQRT_INV], eps = c[C_EPS];
    for (int i = 0; i < n; i++) {
        float m1 = m[i] + (g[i] - m[i]) * c1;
        float v1 = v[i] * b2 + (g[i] * g[i]) * c2;
        float denom = sqrtf(v1) * bc2_sqrt_inv + eps;
        mn[i] = m1;
        vn[i] = v1;
        wn[i] = w[i] * decay - step_size * (m1 / denom);
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
                       float* w, float* mn, float* vn, float* wn) {
    const float* c = a->coef + t * N_COEF;
    const float* dm = a->scale_inv + t * N_SLOT;
    load_block(g, (const void*)a->grad[t], a->grad_dtype, off, n, c[C_GRAD_MUL]);
    load_block(m, (const void*)a->exp_avg[t], a->exp_avg_dtype, off, n, dm[S_M]);
    load_block(v, (const void*)a->exp_avg_sq[t], a->exp_avg_sq_dtype, off, n, dm[S_V]);
    if (a->master_dtype == DT_NONE) load_block(w, (const void*)a->param[t], a->param_dtype, off, n, 1.0f);
    else load_block(w, (const void*)a->master[t], a->master_dtype, off, n, dm[S_W]);
    math_block(n, g, m, v, w, mn, vn, wn, c);
}

/* Elements [begin, end) of tensor t through fp32 staging blocks (portable; also the AVX2 tails). */
static void staged_range(const fp8adamw_args* a, int64_t t, int64_t begin, int64_t end, int pass, uint32_t* amax3) {
    float g[BLOCK], m[BLOCK], v[BLOCK], w[BLOCK], mn[BLOCK], vn[BLOCK], wn[BLOCK];
    const float* em = a->new_scale + t * N_SLOT;
    for (int64_t off = begin; off < end; off += BLOCK) {
        int n = (int)(end - off < BLOCK ? end - off : BLOCK);
        step_block(a, t, off, n, g, m, v, w, mn, vn, wn);
        if (pass == 1) {
            amax3[S_M] = absmax_bits(amax3[S_M], mn, n);
            amax3[S_V] = absmax_bits(amax3[S_V], vn, n);
            if (a->w_amax_needed) amax3[S_W] = absmax_bits(amax3[S_W], wn, n);
            continue;
        }
        store_block((void*)a->exp_avg[t], a->exp_avg_dtype, off, n, mn, em[S_M]);
        store_block((void*)a->exp_avg_sq[t], a->exp_avg_sq_dtype, off, n, vn, em[S_V]);
        if (a->master_dtype != DT_NONE) {
            store_block((void*)a->master[t], a->master_dtype, off, n, wn, em[S_W]);
            load_block(wn, (const void*)a->master[t], a->master_dtype, off, n, 1.0f / em[S_W]);  /* exact: 2**k */
        }
        store_block((void*)a->param[t], a->param_dtype, off, n, wn, 1.0f);
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


static void range_pass1(const fp8adamw_args* a, int64_t t, int64_t begin, int64_t end, uint32_t* amax3) {
#ifdef FP8ADAMW_AVX2
    begin = vector_dispatch(a, t, begin, end, 1, amax3);
#endif
    if (begin < end) staged_range(a, t, begin, end, 1, amax3);
}

static void range_pass2(const fp8adamw_args* a, int64_t t, int64_t begin, int64_t end) {
#ifdef FP8ADAMW_AVX2
    begin = vector_dispatch(a, t, begin, end, 2, NULL);
#endif
    if (begin < end) staged_range(a, t, begin, end, 2, NULL);
}

/* Pass 1: amax of the new m, v and weight of every tensor; writes nothing but a->amax. */
int fp8adamw_pass1(const fp8adamw_args* a) {
    int64_t n_chunks = 0;
    chunk_t* chunks = make_chunks(a, &n_chunks);
    uint32_t* part = (uint32_t*)calloc((size_t)(n_chunks > 0 ? n_chunks : 1) * N_SLOT, sizeof(uint32_t));
    uint32_t* acc = (uint32_t*)calloc((size_t)(a->n_tensors > 0 ? a->n_tensors : 1) * N_SLOT, sizeof(uint32_t));
    if (!chunks || !part || !acc) { free(chunks); free(part); free(acc); return 1; }
    #pragma omp parallel for schedule(dynamic, 1) num_threads(a->n_threads)
    for (int64_t k = 0; k < n_chunks; k++)
        range_pass1(a, chunks[k].t, chunks[k].begin, chunks[k].end, part + k * N_SLOT);
    for (int64_t k = 0; k < n_chunks; k++)
        for (int s = 0; s < N_SLOT; s++) {
            uint32_t* dst = acc + chunks[k].t * N_SLOT + s;
            if (part[k * N_SLOT + s] > *dst) *dst = part[k * N_SLOT + s];
        }
    for (int64_t i = 0; i < a->n_tensors * N_SLOT; i++) a->amax[i] = bits_f32(acc[i]);
    free(acc); free(chunks); free(part);
    return 0;
}

/* Pass 2: the same update again, stored with the new scales; the parameter receives the value the
   master now holds (decoded back), or the update itself when the parameter is the master. */
int fp8adamw_pass2(const fp8adamw_args* a) {
    int64_t n_chunks = 0;
    chunk_t* chunks = make_chunks(a, &n_chunks);
    if (!chunks) return 1;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(a->n_threads)
    for (int64_t k = 0; k < n_chunks; k++) range_pass2(a, chunks[k].t, chunks[k].begin, chunks[k].end);
    free(chunks);
    return 0;
}
