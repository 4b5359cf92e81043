/* int4 weights (int4_dot.h's group-wise 4-bit layout) as bf16 panels (bf16_panels.h's layout), built one pair of
 * 16-channel panels at a time just before a pass multiplies them (bf16_out.pair_panels): products with many rows
 * then run on the CPU's bf16 units (vdpbf16ps, AMX-BF16 tiles) while the weights stay 4-bit in memory.
 *
 * Why: past a few dozen rows a projection is bound by arithmetic, where int4_dot.h's 16-bit vpmaddwd products run
 * at a third of the bf16 units' rate; dequantizing a whole weight to float32 for torch's GEMM (quant/int4_cpu.py's
 * other route) writes and reads 4 bytes per weight per call and multiplies in float32.
 *
 * Values: bf16(d q + m) of the group's fp16 scale d and minimum m, computed as one float32 fma and rounded to nearest
 * even: the float32 weights of tm_int4_dequantize rounded to bf16 (8 bits of mantissa, far below the 4-bit grid's
 * step d). A pair's panels are 2 * k * 32 bytes (k = 1536: 96 KiB, in L2); k % 64 == 0, so k_pad == k.
 *
 * SIMD path (AVX512-BF16): per channel, 64 inputs (a pair of groups, 32 packed bytes) become 4 vectors of 16 floats,
 * fma'd and rounded two vectors at once into 32 bf16 = 16 input pairs; 16 channels' such rows are transposed
 * (16 x 16 dwords) into 16 panel rows of 64 bytes (an input pair of all 16 channels).
 */
#ifndef TM_INT4_BF16_H
#define TM_INT4_BF16_H

#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "bf16_panels.h"
#include "int4_dot.h"

#if defined(__AVX512BF16__)
/* r[i] (16 dwords each) <- column i of the 16 x 16 dword matrix whose rows are r[0 .. 15]. */
static inline __attribute__((always_inline)) void int4_transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; ++i) { /* per 128-bit lane: (a0 b0 a1 b1), (a2 b2 a3 b3) of rows a, b */
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) { /* u[4i + c], lane L: rows 4i .. 4i + 3 of column 4L + c */
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int c = 0; c < 4; ++c) { /* column 4L + c: lane L of u[c], u[4 + c], u[8 + c], u[12 + c] */
        const __m512i p = _mm512_shuffle_i32x4(u[c], u[4 + c], _MM_SHUFFLE(2, 0, 2, 0));
        const __m512i q = _mm512_shuffle_i32x4(u[c], u[4 + c], _MM_SHUFFLE(3, 1, 3, 1));
        const __m512i s = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(2, 0, 2, 0));
        const __m512i v = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], _MM_SHUFFLE(3, 1, 3, 1));
        r[c] = _mm512_shuffle_i32x4(p, s, _MM_SHUFFLE(2, 0, 2, 0));
        r[8 + c] = _mm512_shuffle_i32x4(p, s, _MM_SHUFFLE(3, 1, 3, 1));
        r[4 + c] = _mm512_shuffle_i32x4(q, v, _MM_SHUFFLE(2, 0, 2, 0));
        r[12 + c] = _mm512_shuffle_i32x4(q, v, _MM_SHUFFLE(3, 1, 3, 1));
    }
}
#endif

/* dst: one bf16 panel [k / 2][16][2] of channels c0 .. c0 + 15 of the int4 weights (packed [n_pad, k / 2], d and m
 * [n_pad / 4, k / 32, 4]); channels at or past n_pad are zero. */
static inline void int4_bf16_panel(uint16_t *dst, const uint8_t *packed, const uint16_t *d, const uint16_t *m,
                                   int64_t n_pad, int64_t k, int64_t c0) {
    const int64_t groups = k / INT4_GROUP, row_bytes = k / 2;
#if defined(__AVX512BF16__)
    const __m512i low_nibbles = _mm512_set1_epi32(0x0F);
    for (int64_t pr = 0; pr < k / 64; ++pr) { /* inputs 64 pr .. 64 pr + 63: groups 2 pr (low nibbles), 2 pr + 1 */
        __m512i first[BF16_PANEL], second[BF16_PANEL]; /* per channel: input pairs 32 pr + 0..15, + 16..31 */
        for (int j = 0; j < BF16_PANEL; ++j) {
            const int64_t c = c0 + j;
            if (c >= n_pad) {
                first[j] = second[j] = _mm512_setzero_si512();
                continue;
            }
            const uint8_t *w = packed + c * row_bytes + 32 * pr;
            const int64_t s = (c / INT4_CHANNELS) * groups * INT4_CHANNELS + c % INT4_CHANNELS;
            const __m512 d0 = _mm512_set1_ps(_cvtsh_ss(d[s + 2 * pr * INT4_CHANNELS]));
            const __m512 m0 = _mm512_set1_ps(_cvtsh_ss(m[s + 2 * pr * INT4_CHANNELS]));
            const __m512 d1 = _mm512_set1_ps(_cvtsh_ss(d[s + (2 * pr + 1) * INT4_CHANNELS]));
            const __m512 m1 = _mm512_set1_ps(_cvtsh_ss(m[s + (2 * pr + 1) * INT4_CHANNELS]));
            const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)w));        /* bytes 0-15 */
            const __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + 16))); /* bytes 16-31 */
            const __m512 v0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b0, low_nibbles)), d0, m0);
            const __m512 v1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b1, low_nibbles)), d0, m0);
            const __m512 v2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b0, 4)), d1, m1);
            const __m512 v3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b1, 4)), d1, m1);
            first[j] = (__m512i)_mm512_cvtne2ps_pbh(v1, v0); /* inputs 0-15 low half, 16-31 high half */
            second[j] = (__m512i)_mm512_cvtne2ps_pbh(v3, v2);
        }
        int4_transpose16(first);
        int4_transpose16(second);
        uint16_t *out = dst + 32 * pr * 2 * BF16_PANEL; /* input pair 32 pr: 16 channels x 2 */
        for (int i = 0; i < BF16_PANEL; ++i) {
            _mm512_storeu_si512((void *)(out + i * 2 * BF16_PANEL), first[i]);
            _mm512_storeu_si512((void *)(out + (16 + i) * 2 * BF16_PANEL), second[i]);
        }
    }
#else
    for (int64_t j = 0; j < BF16_PANEL; ++j) {
        const int64_t c = c0 + j;
        const uint8_t *row = packed + c * row_bytes;
        const int64_t s = (c / INT4_CHANNELS) * groups * INT4_CHANNELS + c % INT4_CHANNELS;
        for (int64_t i = 0; i < k; ++i) {
            float v = 0.0f;
            if (c < n_pad) {
                const int64_t g = i / INT4_GROUP;
                v = __builtin_fmaf((float)int4_q(row, i), int4_half_to_float(d[s + g * INT4_CHANNELS]),
                                   int4_half_to_float(m[s + g * INT4_CHANNELS]));
            }
            dst[(i / 2 * BF16_PANEL + j) * 2 + i % 2] = f32_to_bf16(v);
        }
    }
#endif
}

/* dst: a pass's pair of panels in bf16_out.pair_panels' order, panel `first` then (second >= 0) panel `second` of an
 * int4 weight of n_pad channels (n rounded up to 4): p and p + 1 for a plain product, a gate panel and its up panel
 * for a fused MLP. */
static inline void int4_bf16_pair(uint16_t *dst, const uint8_t *packed, const uint16_t *d, const uint16_t *m,
                                  int64_t n_pad, int64_t k, int64_t first, int64_t second) {
    int4_bf16_panel(dst, packed, d, m, n_pad, k, first * BF16_PANEL);
    if (second >= 0) int4_bf16_panel(dst + k * BF16_PANEL, packed, d, m, n_pad, k, second * BF16_PANEL);
}

#endif
