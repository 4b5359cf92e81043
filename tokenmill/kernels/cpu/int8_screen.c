/* The int8 screen of a greedy vocabulary projection (layers/screened_head.py): which 16-channel panels can hold a
 * row's largest logit, read from an int8 copy of the weight (a quarter of float32's bytes, half of bf16's).
 *
 * Weight: panels [P][k][16] of int8 q with one float32 scale s_n per channel n, w_n ~= s_n q_n, |w_n - s_n q_n| <=
 * s_n / 2 (round to nearest). Rows x [m][k] float32 (the values the exact projection multiplies). Each row's screen
 * score a_n = s_n (x . q_n) is within b_n = bound_n * |x|_1 of the exact logit x . w_n as any float32 kernel
 * computes it (bound_n: half a step for the weight's rounding, the two sums' float32 rounding and slack for this
 * file's own roundings; layers/screened_head.py), so the largest logit's channel n* has a_n* + b_n* >= max_j (a_j -
 * b_j) =: floor. The panels with a channel n < n_valid of some row meeting that are listed (ascending): the exact
 * projection then needs only those.
 *
 * Two passes over OpenMP threads: scores (16 channels x up to SCREEN_ROWS rows per register tile, int8 widened to
 * float32, FMAs against broadcast x) with each thread's floors, then the panels' flags. x is taken as float32, or
 * rounded to bf16 first (round_bf16: the values a bf16 projection multiplies). scratch: m * (P * 16 + k) floats.
 */
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "prefetch_stream.h"
#include "work_split.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

typedef float f32x16 __attribute__((vector_size(64), aligned(4)));
typedef int8_t i8x16 __attribute__((vector_size(16), aligned(1)));

#define SCREEN_ROWS 8
/* 1: each panel's pass prefetches the next panel (prefetch_stream.h), which the thread most likely takes next (guided
 * grabs of PANELS_PER_GRAB); 0: the hardware prefetchers alone (A/B builds: -DSCREEN_PREFETCH=0). Measured on the AMX
 * Xeon, SmolLM2's head with the caches flushed before each call (as after a decode step's forward): 1 row 2.09 ->
 * 1.43 ms (the bf16 head's argmax 2.2), 4 rows 3.54 -> 2.41; the execution plan then takes the screen at 1 row, and a
 * 1-request decode step (engine step) went 9.9-10.3 -> 9.3-9.5 ms. */
#ifndef SCREEN_PREFETCH
#define SCREEN_PREFETCH 1
#endif
#define MAX_THREADS 256

/* 16 int8 as float32 (GCC scalarizes __builtin_convertvector between these widths: the intrinsics where they exist). */
static inline __attribute__((always_inline)) f32x16 widen16(const int8_t *p) {
#if defined(__AVX512F__)
    return (f32x16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__)
    const __m128i q = _mm_loadu_si128((const __m128i *)p);
    f32x16 w;
    __m256 *half = (__m256 *)&w;
    half[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    half[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
    return w;
#else
    return __builtin_convertvector(*(const i8x16 *)p, f32x16);
#endif
}

/* scores[r * stride + j] = s_j (x_r . q_j) for the panel's 16 channels and rows r < rows (a constant once inlined).
 * Fewer than 4 rows split the inputs over 4 / rows partial sums (interleaved), so that 4 FMA chains are in flight.
 * next (NULL: none): a panel to prefetch over the pass (SCREEN_PREFETCH). */
static inline __attribute__((always_inline)) void screen_panel(float *scores, int64_t stride, const float *x,
                                                               int64_t k, int rows, const int8_t *panel,
                                                               const float *scale, const int8_t *next) {
    const int parts = rows >= 4 ? 1 : rows == 1 ? 4 : 2; /* k % parts == 0 is not needed: the tail runs part 0 */
    f32x16 acc[SCREEN_ROWS][4];
    for (int r = 0; r < rows; ++r)
        for (int p = 0; p < parts; ++p) acc[r][p] = (f32x16){0};
    prefetch_stream ahead = prefetch_stream_over(next, k * 16, k / parts);
    int64_t i = 0;
    for (; i + parts <= k; i += parts) {
        prefetch_stream_step(&ahead);
        for (int p = 0; p < parts; ++p) {
            const f32x16 w = widen16(panel + (i + p) * 16);
            for (int r = 0; r < rows; ++r) acc[r][p] += x[r * k + i + p] * w;
        }
    }
    for (; i < k; ++i) {
        const f32x16 w = widen16(panel + i * 16);
        for (int r = 0; r < rows; ++r) acc[r][0] += x[r * k + i] * w;
    }
    const f32x16 s = *(const f32x16 *)scale;
    for (int r = 0; r < rows; ++r) {
        f32x16 sum = acc[r][0];
        for (int p = 1; p < parts; ++p) sum += acc[r][p];
        *(f32x16 *)(scores + r * stride) = sum * s;
    }
}

/* Fills passed[0 .. count) with the panels that pass (ascending) and returns count; -1 for m or the thread count
 * out of range. */
int64_t tm_int8_screen(int64_t *passed, float *scratch, const float *x_in, int64_t m, int round_bf16,
                       const int8_t *panels, const float *scale, const float *bound, int64_t n_valid, int64_t k,
                       int num_threads) {
    if (m < 1 || num_threads < 1 || num_threads > MAX_THREADS) return -1;
    const int64_t num_panels = (n_valid + 15) / 16, stride = num_panels * 16;
    float *scores = scratch, *x = scratch + m * stride;
    float l1[m], floor_[m], thread_floor[MAX_THREADS][SCREEN_ROWS];
    for (int64_t r = 0; r < m; ++r) {
        float sum = 0.0f;
        for (int64_t i = 0; i < k; ++i) {
            const float v = round_bf16 ? bf16_to_f32(f32_to_bf16(x_in[r * k + i])) : x_in[r * k + i];
            x[r * k + i] = v;
            sum += fabsf(v);
        }
        l1[r] = sum;
        floor_[r] = -FLT_MAX; /* not -INFINITY: the kernels build with -ffast-math (finite math) */
    }
    for (int64_t r0 = 0; r0 < m; r0 += SCREEN_ROWS) {
        const int rows = m - r0 < SCREEN_ROWS ? (int)(m - r0) : SCREEN_ROWS;
        for (int t = 0; t < num_threads; ++t) /* a thread the runtime does not start leaves its row as it is */
            for (int r = 0; r < SCREEN_ROWS; ++r) thread_floor[t][r] = -FLT_MAX;
#pragma omp parallel num_threads(num_threads)
        {
            float *best = thread_floor[omp_get_thread_num()];
#pragma omp for schedule(guided, PANELS_PER_GRAB)
            for (int64_t p = 0; p < num_panels; ++p) {
                float *out = scores + r0 * stride + p * 16;
                const int8_t *panel = panels + p * k * 16;
                const int8_t *next = SCREEN_PREFETCH && p + 1 < num_panels ? panel + k * 16 : NULL;
                switch (rows) {
#define TM_SCREEN_CASE(R) \
                    case R: screen_panel(out, stride, x + r0 * k, k, R, panel, scale + p * 16, next); break;
                    TM_SCREEN_CASE(1) TM_SCREEN_CASE(2) TM_SCREEN_CASE(3) TM_SCREEN_CASE(4)
                    TM_SCREEN_CASE(5) TM_SCREEN_CASE(6) TM_SCREEN_CASE(7)
                    default: screen_panel(out, stride, x + r0 * k, k, SCREEN_ROWS, panel, scale + p * 16, next);
#undef TM_SCREEN_CASE
                }
                for (int r = 0; r < rows; ++r) {
                    const float *a = out + r * stride, b = l1[r0 + r];
                    for (int j = 0; j < 16 && p * 16 + j < n_valid; ++j) {
                        const float low = a[j] - b * bound[p * 16 + j];
                        best[r] = low > best[r] ? low : best[r];
                    }
                }
            }
        }
        for (int t = 0; t < num_threads; ++t)
            for (int r = 0; r < rows; ++r)
                floor_[r0 + r] = thread_floor[t][r] > floor_[r0 + r] ? thread_floor[t][r] : floor_[r0 + r];
    }
    uint8_t flag[num_panels];
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < num_panels; ++p) {
        uint8_t any = 0;
        for (int64_t r = 0; r < m && !any; ++r)
            for (int j = 0; j < 16 && p * 16 + j < n_valid; ++j)
                any |= scores[r * stride + p * 16 + j] + l1[r] * bound[p * 16 + j] >= floor_[r];
        flag[p] = any;
    }
    int64_t count = 0;
    for (int64_t p = 0; p < num_panels; ++p)
        if (flag[p]) passed[count++] = p;
    return count;
}
