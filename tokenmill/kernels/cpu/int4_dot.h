/* W4A16 building blocks shared by int4_gemm.c and step_forward.c: quant/int4_cpu.py's group-wise 4-bit
 * weights (GGUF's Q4_1 rule) against activations quantized to 16 bits per group.
 *
 * Weights: output channel n, group g of GROUP = 32 consecutive input channels, with an fp16 scale d and
 * minimum m:  w[n, k] = d[n, g] * q[n, k] + m[n, g],  q in 0..15.
 *   packed [n_pad, k / 2] bytes: the input channels go in pairs of groups (64 channels); byte j (0..31)
 *     of pair p holds q[64 p + j] in its low nibble and q[64 p + 32 + j] in its high nibble.
 *   d, m [n_pad / 4, k / 32, 4] fp16: channel blocks of INT4_CHANNELS = 4, so one 16-byte load holds the
 *     scales of 4 channels x 2 groups. n_pad = n rounded up to 4 (padding channels are all zero).
 * Activations, per row r and group g: a = round(x / s) in [-32767, 32767] with s = max|x| / 32767 (1 for
 * an all-zero group), and t = the group's exact float sum. Then
 *   y[r, n] = sum_g d[n, g] s[r, g] sum_{k in g} q[n, k] a[r, k] + m[n, g] t[r, g].
 * Exactness: vpmaddwd(q widened to int16, a) adds two products into an int32, and a group's sum is at
 * most 32 * 15 * 32767 < 2^24: exact in int32 and in its float conversion.
 * Why 16-bit activations: with 8 bits per group (llama.cpp's Q8 blocks) SmolLM2's outlier channels
 * cost whole groups their precision (measured: logprobs 0.5 nat off fp32 within 4 tokens); 16 bits
 * leave the weights' own rounding as the only error, for the same vpmadd count per weight.
 *
 * Invariants: k % 64 == 0; activation rows have stride a_stride (int16 elements) and k / 32 group entries at
 * stride g_stride (floats).
 */
#ifndef TM_INT4_DOT_H
#define TM_INT4_DOT_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vec8.h"
#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define TM_INT4_SIMD 1
#endif

#define INT4_GROUP 32
#define INT4_CHANNELS 4
/* Channel blocks read ahead by software prefetch while the first row streams the weights. */
#define INT4_PREFETCH_BLOCKS 2

/* IEEE half -> float (normals, subnormals, zero, inf/nan). */
static inline float int4_half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
    uint32_t bits;
    if (exponent == 0x1Fu) {
        bits = sign | 0x7F800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else {
        const float value = ldexpf((float)mantissa, -24);
        memcpy(&bits, &value, sizeof(bits));
        bits |= sign;
    }
    float out;
    memcpy(&out, &bits, sizeof(out));
    return out;
}

/* Row x [k] -> a [k] int16, s and t [k / 32] (the header's activation format). */
static void int4_quantize_row(const float *x, int64_t k, int16_t *a, float *s, float *t) {
    for (int64_t g = 0; g < k / INT4_GROUP; ++g) {
        const float *xg = x + g * INT4_GROUP;
        float amax = 0.0f, sum = 0.0f;
        for (int i = 0; i < INT4_GROUP; ++i) {
            const float v = fabsf(xg[i]);
            amax = v > amax ? v : amax;
            sum += xg[i];
        }
        const float step = amax > 0.0f ? amax / 32767.0f : 1.0f, inv = 1.0f / step;
        for (int i = 0; i < INT4_GROUP; ++i) {
            const float v = xg[i] * inv;
            const int32_t r = v >= 0.0f ? (int32_t)(v + 0.5f) : -(int32_t)(0.5f - v);
            a[g * INT4_GROUP + i] = (int16_t)(r > 32767 ? 32767 : (r < -32767 ? -32767 : r));
        }
        s[g] = step;
        t[g] = sum;
    }
}

/* q of input channel k in a packed weight row. */
static inline int32_t int4_q(const uint8_t *row, int64_t k) {
    const uint8_t byte = row[(k / 64) * 32 + k % 32];
    return (k % 64) < 32 ? byte & 0x0F : byte >> 4;
}

/* Outputs n0 .. n0 + 3 (those < n) of rows 0 .. num_rows - 1, by plain loops: the reference the SIMD
 * block below must match, and the path of CPUs without AVX2 + F16C. */
static void int4_output_block_scalar(float *y, int64_t y_stride, const int16_t *a, int64_t a_stride, const float *s,
                                     const float *t, int64_t g_stride, const uint8_t *packed, const uint16_t *d,
                                     const uint16_t *m, int64_t n0, int64_t n, int64_t num_rows, int64_t k) {
    const int64_t groups = k / INT4_GROUP;
    const uint16_t *db = d + (n0 / INT4_CHANNELS) * groups * INT4_CHANNELS;
    const uint16_t *mb = m + (n0 / INT4_CHANNELS) * groups * INT4_CHANNELS;
    for (int c = 0; c < INT4_CHANNELS && n0 + c < n; ++c) {
        const uint8_t *row = packed + (n0 + c) * (k / 2);
        for (int64_t r = 0; r < num_rows; ++r) {
            float acc = 0.0f;
            for (int64_t g = 0; g < groups; ++g) {
                int32_t dot = 0;
                for (int64_t i = g * INT4_GROUP; i < (g + 1) * INT4_GROUP; ++i)
                    dot += int4_q(row, i) * (int32_t)a[r * a_stride + i];
                acc += int4_half_to_float(db[g * INT4_CHANNELS + c]) * s[r * g_stride + g] * (float)dot
                       + int4_half_to_float(mb[g * INT4_CHANNELS + c]) * t[r * g_stride + g];
            }
            y[r * y_stride + n0 + c] = acc;
        }
    }
}

#if defined(TM_INT4_SIMD)
/* Rows unpacked together: a block's 4-bit weights are widened to 16 bits once per pair of groups and multiplied
 * with up to INT4_ROW_BLOCK rows (32 vector registers with AVX-512VL hold 4 rows' 16 accumulators; AVX2's 16 hold
 * 2). Before, every row unpacked the weights again, so a step's int4 projections cost ~2 ms per row on the AMX
 * Xeon (1 row 2.56, 2 rows 4.58, 5 rows 10.67 ms for SmolLM2-135M). */
#if defined(__AVX512VL__)
#define INT4_ROW_BLOCK 4
#else
#define INT4_ROW_BLOCK 2
#endif

/* A row's 4 outputs from its channels' accumulators and group-minimum lanes. Not inlined: under -ffast-math each
 * inlined copy may sum in its own order, and a row's result must not depend on the row block it falls in. */
static __attribute__((noinline)) void int4_finish(float *y, const __m256 *acc, const __m256 *min_acc) {
    float mins[8] __attribute__((aligned(32)));
    _mm256_store_ps(mins, *min_acc);
    for (int c = 0; c < INT4_CHANNELS; ++c) y[c] = hsum((v8)acc[c]) + mins[c] + mins[c + 4];
}

/* Rows r0 .. r0 + rows - 1 (rows <= INT4_ROW_BLOCK, a constant once inlined) of a full block of 4 channels. Each
 * (row, channel) accumulator sees the same operations in the same order as when rows were done one by one:
 * bitwise the same outputs whatever the number of rows or the block a row falls in. */
static inline __attribute__((always_inline)) void int4_rows_simd(
    float *y, int64_t y_stride, const int16_t *a, int64_t a_stride, const float *s, const float *t, int64_t g_stride,
    const uint8_t *w, const uint16_t *db, const uint16_t *mb, int64_t n0, int64_t pairs, int64_t row_bytes, int rows,
    int prefetch) {
    const __m256i low_nibbles = _mm256_set1_epi16(0x0F);
    __m256 acc[INT4_ROW_BLOCK][INT4_CHANNELS], min_acc[INT4_ROW_BLOCK];
    float scales[INT4_ROW_BLOCK][8] __attribute__((aligned(32)));
    for (int r = 0; r < rows; ++r) {
        min_acc[r] = _mm256_setzero_ps();
        for (int c = 0; c < INT4_CHANNELS; ++c) acc[r][c] = _mm256_setzero_ps();
    }
    for (int64_t p = 0; p < pairs; ++p) {
        if (prefetch)
            for (int c = 0; c < INT4_CHANNELS; ++c)
                _mm_prefetch((const char *)(w + (INT4_PREFETCH_BLOCKS * INT4_CHANNELS + c) * row_bytes + 32 * p),
                             _MM_HINT_T0);
        /* lanes 0-3: group 2p of channels 0-3; lanes 4-7: group 2p + 1 */
        const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(db + p * 8)));
        const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mb + p * 8)));
        for (int r = 0; r < rows; ++r) {
            const float *sr = s + r * g_stride, *tr = t + r * g_stride;
            const __m256 sv = _mm256_set_m128(_mm_set1_ps(sr[2 * p + 1]), _mm_set1_ps(sr[2 * p]));
            const __m256 tv = _mm256_set_m128(_mm_set1_ps(tr[2 * p + 1]), _mm_set1_ps(tr[2 * p]));
            min_acc[r] = _mm256_fmadd_ps(mv, tv, min_acc[r]);
            _mm256_store_ps(scales[r], _mm256_mul_ps(dv, sv));
        }
        for (int c = 0; c < INT4_CHANNELS; ++c) {
            /* Bytes widened to 16 bits first (two shuffles, each with its load folded in), then split into nibbles
             * with and/shift: the shuffle port did 6 operations per 64 weights before (4 widenings, 2 extracts). */
            const uint8_t *wp = w + c * row_bytes + 32 * p;
            const __m256i b0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)wp));        /* bytes 0-15 */
            const __m256i b1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(wp + 16))); /* bytes 16-31 */
            const __m256i u0 = _mm256_and_si256(b0, low_nibbles); /* q of channels 64p + 0..15 (group 2p) */
            const __m256i u1 = _mm256_and_si256(b1, low_nibbles); /* 64p + 16..31 (group 2p) */
            const __m256i u2 = _mm256_srli_epi16(b0, 4);          /* 64p + 32..47 (group 2p + 1) */
            const __m256i u3 = _mm256_srli_epi16(b1, 4);          /* 64p + 48..63 (group 2p + 1) */
            for (int r = 0; r < rows; ++r) {
                const int16_t *ap = a + r * a_stride + 64 * p;
                const __m256i i0 = _mm256_add_epi32(_mm256_madd_epi16(u0, _mm256_loadu_si256((const __m256i *)ap)),
                                                    _mm256_madd_epi16(u1, _mm256_loadu_si256((const __m256i *)(ap + 16))));
                const __m256i i1 = _mm256_add_epi32(
                    _mm256_madd_epi16(u2, _mm256_loadu_si256((const __m256i *)(ap + 32))),
                    _mm256_madd_epi16(u3, _mm256_loadu_si256((const __m256i *)(ap + 48))));
                acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), _mm256_broadcast_ss(&scales[r][c]), acc[r][c]);
                acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), _mm256_broadcast_ss(&scales[r][c + 4]), acc[r][c]);
            }
        }
    }
    for (int r = 0; r < rows; ++r) int4_finish(y + r * y_stride + n0, acc[r], &min_acc[r]);
}

/* As int4_output_block_scalar for a full block of 4 channels, INT4_ROW_BLOCK rows at a time; the first block of
 * rows prefetches the next channel blocks from memory, the others find the weights in L1. */
static void int4_output_block_simd(float *y, int64_t y_stride, const int16_t *a, int64_t a_stride, const float *s,
                                   const float *t, int64_t g_stride, const uint8_t *packed, const uint16_t *d,
                                   const uint16_t *m, int64_t n0, int64_t num_rows, int64_t k) {
    const int64_t groups = k / INT4_GROUP, pairs = k / 64, row_bytes = k / 2;
    const uint16_t *db = d + (n0 / INT4_CHANNELS) * groups * INT4_CHANNELS;
    const uint16_t *mb = m + (n0 / INT4_CHANNELS) * groups * INT4_CHANNELS;
    const uint8_t *w = packed + n0 * row_bytes;
    int64_t r = 0;
    for (; r + INT4_ROW_BLOCK <= num_rows; r += INT4_ROW_BLOCK)
        int4_rows_simd(y + r * y_stride, y_stride, a + r * a_stride, a_stride, s + r * g_stride, t + r * g_stride,
                       g_stride, w, db, mb, n0, pairs, row_bytes, INT4_ROW_BLOCK, r == 0);
    switch (num_rows - r) {
#if INT4_ROW_BLOCK > 3
        case 3:
            int4_rows_simd(y + r * y_stride, y_stride, a + r * a_stride, a_stride, s + r * g_stride, t + r * g_stride,
                           g_stride, w, db, mb, n0, pairs, row_bytes, 3, r == 0);
            break;
        case 2:
            int4_rows_simd(y + r * y_stride, y_stride, a + r * a_stride, a_stride, s + r * g_stride, t + r * g_stride,
                           g_stride, w, db, mb, n0, pairs, row_bytes, 2, r == 0);
            break;
#endif
        case 1:
            int4_rows_simd(y + r * y_stride, y_stride, a + r * a_stride, a_stride, s + r * g_stride, t + r * g_stride,
                           g_stride, w, db, mb, n0, pairs, row_bytes, 1, r == 0);
            break;
        default: break;
    }
}
#endif

/* Outputs n0 .. n0 + 3 (those < n) of all num_rows rows: y[r * y_stride + j]. */
static inline void int4_output_block(float *y, int64_t y_stride, const int16_t *a, int64_t a_stride, const float *s,
                                     const float *t, int64_t g_stride, const uint8_t *packed, const uint16_t *d,
                                     const uint16_t *m, int64_t n0, int64_t n, int64_t num_rows, int64_t k) {
#if defined(TM_INT4_SIMD)
    if (n0 + INT4_CHANNELS <= n) {
        int4_output_block_simd(y, y_stride, a, a_stride, s, t, g_stride, packed, d, m, n0, num_rows, k);
        return;
    }
#endif
    int4_output_block_scalar(y, y_stride, a, a_stride, s, t, g_stride, packed, d, m, n0, n, num_rows, k);
}

#endif
