/* fp8adamw: the kernel's shared definitions (argument table, enums, bit helpers) and the scalar
 * stochastic rounding; included by fp8adamw.c (one translation unit, _kernel.py).
 *
 * Numerics are those of the eager path (``_eager.py``), operation for operation: each arithmetic line is
 * one IEEE fp32 operation in the same order, compiled with ``-ffp-contract=off`` (no FMA contraction)
 * and without -ffast-math, so both paths give bit-identical states (tested for every dtype
 * combination). With rounding = 1 each stored value is first rounded stochastically onto its format's
 * grid (sr1 / sr8 / sr16: _rounding.py's rule and hash, in uint32), after which the nearest encoders
 * store it unchanged.
 */
#ifndef FP8ADAMW_COMMON_H
#define FP8ADAMW_COMMON_H
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
    double* grad_sumsq;         /* [n] fp8adamw_grad_amax output when not NULL: sum of g**2 */
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

static inline uint32_t absmax_bits(uint32_t acc, const float* restrict x, int n) {
    /* max |x| on bit patterns (non-negative floats order like their bits); NaN counts as inf */
    for (int i = 0; i < n; i++) {
        uint32_t ab = f32_bits(x[i]) & 0x7FFFFFFFu;
        ab = ab < 0x7F800000u ? ab : 0x7F800000u;
        acc = ab > acc ? ab : acc;
    }
    return acc;
}
#endif
