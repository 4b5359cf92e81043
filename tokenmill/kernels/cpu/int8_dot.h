/* W8A8 building blocks shared by int8_gemm.c and decode_step.c: per-token activation quantization
 * (with an optional block Hadamard rotation) and u8 x s8 -> int32 dot products of ROW_BLOCK weight rows.
 *
 *   y[m, n] = scale[n] * (step[m] * sum_k q[n, k] * u[m, k] + low[m] * rowsum[n])
 * where u[m, k] = round((x[m, k] - low[m]) / step[m]) in [0, 255] is row m of x quantized per token
 * (low = min of the row, step = (max - min) / 255) and rowsum[n] = sum_k q[n, k].
 *
 * Exactness: the inner product uses vpmaddubsw, which adds u[2j] * q[2j] + u[2j+1] * q[2j+1] into a
 * saturating int16. The weights obey |q[2j]| + |q[2j+1]| <= 128 (quant/int8_cpu.py's pair budget), so
 * that sum is at most 255 * 128 = 32640 and never saturates; the int32 accumulation is then exact.
 */
#ifndef TM_INT8_DOT_H
#define TM_INT8_DOT_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define ROW_BLOCK 4
#define K_ALIGN 32
/* Weights are read this many row blocks ahead by software prefetch: a stream from memory otherwise
 * runs at about half the machine's read bandwidth (measured on the vocabulary projection). */
#define PREFETCH_BLOCKS 2

static int32_t dot_scalar(const uint8_t *u, const int8_t *w, int64_t k) {
    int32_t acc = 0;
    for (int64_t i = 0; i < k; ++i) acc += (int32_t)u[i] * (int32_t)w[i];
    return acc;
}

#if defined(__AVX2__)
static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* Integer dot products of ROW_BLOCK weight rows with quantized rows u0 and u1: out[r][0..1]. */
static void block_dots(const uint8_t *u0, const uint8_t *u1, const int8_t *w, int64_t k, int32_t out[ROW_BLOCK][2]) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[ROW_BLOCK][2];
    for (int r = 0; r < ROW_BLOCK; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    const int64_t k32 = k & ~(int64_t)(K_ALIGN - 1);
    for (int64_t i = 0; i < k32; i += K_ALIGN) {
        const __m256i a = _mm256_loadu_si256((const __m256i *)(u0 + i));
        const __m256i b = _mm256_loadu_si256((const __m256i *)(u1 + i));
        for (int r = 0; r < ROW_BLOCK; ++r) {
            _mm_prefetch((const char *)(w + (PREFETCH_BLOCKS * ROW_BLOCK + r) * k + i), _MM_HINT_T0);
            const __m256i wr = _mm256_loadu_si256((const __m256i *)(w + r * k + i));
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(a, wr), ones));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(b, wr), ones));
        }
    }
    for (int r = 0; r < ROW_BLOCK; ++r) {
        out[r][0] = hsum_epi32(acc[r][0]) + dot_scalar(u0 + k32, w + r * k + k32, k - k32);
        out[r][1] = hsum_epi32(acc[r][1]) + dot_scalar(u1 + k32, w + r * k + k32, k - k32);
    }
}

/* One row: two accumulators per weight row, so eight independent chains. */
static void block_dots1(const uint8_t *u0, const int8_t *w, int64_t k, int32_t out[ROW_BLOCK]) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[ROW_BLOCK][2];
    for (int r = 0; r < ROW_BLOCK; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    const int64_t k64 = k & ~(int64_t)(2 * K_ALIGN - 1);
    for (int64_t i = 0; i < k64; i += 2 * K_ALIGN) {
        const __m256i a = _mm256_loadu_si256((const __m256i *)(u0 + i));
        const __m256i b = _mm256_loadu_si256((const __m256i *)(u0 + i + K_ALIGN));
        for (int r = 0; r < ROW_BLOCK; ++r) {
            _mm_prefetch((const char *)(w + (PREFETCH_BLOCKS * ROW_BLOCK + r) * k + i), _MM_HINT_T0);
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + r * k + i));
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + r * k + i + K_ALIGN));
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(a, w0), ones));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(b, w1), ones));
        }
    }
    for (int r = 0; r < ROW_BLOCK; ++r)
        out[r] = hsum_epi32(_mm256_add_epi32(acc[r][0], acc[r][1])) + dot_scalar(u0 + k64, w + r * k + k64, k - k64);
}
#else
static void block_dots(const uint8_t *u0, const uint8_t *u1, const int8_t *w, int64_t k, int32_t out[ROW_BLOCK][2]) {
    for (int r = 0; r < ROW_BLOCK; ++r) {
        out[r][0] = dot_scalar(u0, w + r * k, k);
        out[r][1] = dot_scalar(u1, w + r * k, k);
    }
}

static void block_dots1(const uint8_t *u0, const int8_t *w, int64_t k, int32_t out[ROW_BLOCK]) {
    for (int r = 0; r < ROW_BLOCK; ++r) out[r] = dot_scalar(u0, w + r * k, k);
}
#endif

/* x[0..b) = H x[0..b) with H the orthonormal Sylvester Hadamard matrix of size b (a power of 2), the
 * same matrix as quant/int8_cpu.py's hadamard(b): butterflies, then the 1/sqrt(b) normalization. */
static void hadamard_block(float *x, int64_t b) {
    for (int64_t h = 1; h < b; h *= 2)
        for (int64_t i = 0; i < b; i += 2 * h)
            for (int64_t j = i; j < i + h; ++j) {
                const float a = x[j], c = x[j + h];
                x[j] = a + c;
                x[j + h] = a - c;
            }
    const float norm = 1.0f / sqrtf((float)b);
    for (int64_t j = 0; j < b; ++j) x[j] *= norm;
}

/* u[k] = round((x[k] - low) / step); returns low, stores step (1 for a constant row, whose u is 0).
 * rotation_block > 0: x is first rotated block by block (hadamard_block) into scratch [k]. */
static float quantize_row(const float *x, int64_t k, int64_t rotation_block, float *scratch, uint8_t *u,
                          float *step_out) {
    if (rotation_block > 0) {
        for (int64_t i = 0; i < k; ++i) scratch[i] = x[i];
        for (int64_t i = 0; i < k; i += rotation_block) hadamard_block(scratch + i, rotation_block);
        x = scratch;
    }
    float lo = x[0], hi = x[0];
    for (int64_t i = 1; i < k; ++i) {
        lo = x[i] < lo ? x[i] : lo;
        hi = x[i] > hi ? x[i] : hi;
    }
    const float step = hi > lo ? (hi - lo) / 255.0f : 1.0f;
    const float inv = 1.0f / step;
    for (int64_t i = 0; i < k; ++i) {
        const float v = (x[i] - lo) * inv + 0.5f;  /* >= 0.5 */
        u[i] = (uint8_t)(v >= 255.0f ? 255 : (int32_t)v);
    }
    *step_out = step;
    return lo;
}

/* One output from its integer dot product: scale * (step * dot + low * rowsum), the header's formula. */
static inline float dequantize(int32_t dot, float step, float low, float scale, int32_t rowsum) {
    return scale * (step * (float)dot + low * (float)rowsum);
}

/* Outputs n0 .. n0 + ROW_BLOCK - 1 (fewer at the end of n) of all num_rows rows:
 * y[m * y_stride + j] for quantized rows u (row stride k_pad) with their low/step. Within the block the
 * rows go by in pairs, so the block's weights come from memory once and from L1 for every further pair. */
static inline void int8_output_block(float *y, int64_t y_stride, const uint8_t *u, int64_t k_pad, const float *low,
                                     const float *step, const int8_t *q, const int32_t *rowsum, const float *scale,
                                     int64_t n0, int64_t n, int64_t num_rows, int64_t k) {
    if (n0 + ROW_BLOCK > n) {
        for (int64_t j = n0; j < n; ++j)
            for (int64_t m = 0; m < num_rows; ++m)
                y[m * y_stride + j] = dequantize(dot_scalar(u + m * k_pad, q + j * k, k), step[m], low[m], scale[j],
                                                 rowsum[j]);
        return;
    }
    const int8_t *w = q + n0 * k;
    if (num_rows == 1) {
        int32_t dots[ROW_BLOCK];
        block_dots1(u, w, k, dots);
        for (int r = 0; r < ROW_BLOCK; ++r)
            y[n0 + r] = dequantize(dots[r], step[0], low[0], scale[n0 + r], rowsum[n0 + r]);
        return;
    }
    int32_t dots[ROW_BLOCK][2];
    for (int64_t m = 0; m < num_rows; m += 2) {
        const int64_t m1 = m + 1 < num_rows ? m + 1 : m;
        block_dots(u + m * k_pad, u + m1 * k_pad, w, k, dots);
        for (int r = 0; r < ROW_BLOCK; ++r) {
            y[m * y_stride + n0 + r] = dequantize(dots[r][0], step[m], low[m], scale[n0 + r], rowsum[n0 + r]);
            y[m1 * y_stride + n0 + r] = dequantize(dots[r][1], step[m1], low[m1], scale[n0 + r], rowsum[n0 + r]);
        }
    }
}

#endif
