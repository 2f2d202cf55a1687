/*
 * fp8train.optim fused CPU step, built by _kernel.py with the system C compiler as ONE translation unit:
 * this file and the headers it includes (_kernel.py inlines them; the cache key hashes the result).
 *   fp8adamw_common.h   argument table, enums, bit helpers, scalar stochastic rounding
 *   fp8adamw_codecs8.h  AVX2 + F16C codecs, 8 lanes
 *   fp8adamw_staged.h   the portable staged loop (tails; everything without AVX2)
 *   fp8adamw_loop8.h    the AVX2 vector loop
 *   fp8adamw_loop16.h   the AVX-512 vector loop (default state formats)
 *   fp8adamw_gradstats.h max |g| and, on request, sum of g**2 per tensor (fp8adamw_grad_amax)
 *
 * Entry points: fp8adamw_grad_amax (max |g| per tensor, and the sum of squares when asked; read before
 * anything is written),
 * fp8adamw_store (the step's one pass: update, store with the given scales, per-tensor statistics for
 * the next step's bounds, _bounds.py) and fp8adamw_pass1 (exact amax of the new values, writing
 * nothing: only for two-pass steps, where a bound is unusable).
 * Aliasing: with FP8 primary weights the "param" pointer IS the gradient's buffer. Every loop decodes an
 * element's gradient before it writes that element's weight, and fp8adamw_grad_amax has returned before
 * fp8adamw_store starts.
 *
 * Layout of one pass: the tensors of a bucket are cut into chunks of 64 Ki elements, chunks run in
 * parallel (OpenMP, torch's thread count); a chunk runs the AVX-512 loop over whole vectors of 16 (store
 * pass, default formats, AVX-512 builds), the AVX2 loop over whole vectors of 8, and the portable staged
 * loop (blocks of 512 elements decoded to fp32 on the stack) over what is left, or over everything on
 * machines without AVX2.
 */

#include "fp8adamw_common.h"
#include "fp8adamw_codecs8.h"
#include "fp8adamw_staged.h"
#include "fp8adamw_loop8.h"
#include "fp8adamw_loop16.h"

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

#include "fp8adamw_gradstats.h"


static void range_pass(const fp8adamw_args* a, int64_t t, int64_t begin, int64_t end, int pass, uint32_t* acc) {
#ifdef FP8ADAMW_AVX512
    begin = vector_dispatch16(a, t, begin, end, pass, acc);
#endif
#ifdef FP8ADAMW_AVX2
    begin = vector_dispatch(a, t, begin, end, pass, acc);
#endif
    if (begin < end) staged_range(a, t, begin, end, pass, acc);
}

/* The widest vector loop this build has: 16 (AVX-512), 8 (AVX2) or 1 (portable). */
int fp8adamw_vector_lanes(void) {
#if defined(FP8ADAMW_AVX512)
    return 16;
#elif defined(FP8ADAMW_AVX2)
    return 8;
#else
    return 1;
#endif
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
