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
 * SIMD path (AVX512-BF16): lanes are channels. The 16 channels' packed bytes of a pair of groups, transposed by dwords
 * (4 bytes: 8 inputs of a channel, 4 in low nibbles and 4 in high), become vectors of 16 floats (fma with the 16
 * channels' scale and minimum), and two of them, rounded at once and interleaved by words, one 64-byte panel row (an
 * input pair of all 16 channels). Measured on the Zen 4: 0.082 ns a weight; lanes filled by a gather instead, 0.13;
 * per channel 64 inputs at a time then a 16 x 16 dword transpose of the rounded pairs, 0.13.
 */
#ifndef TM_INT4_BF16_H
#define TM_INT4_BF16_H

#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "bf16_panels.h"
#include "int4_dot.h"

#if defined(__AVX512BF16__)
/* The fp16 scales (or minima) of channels c0 .. c0 + 15 for group g, as 16 floats; channels at or past n_pad: 0. The
 * 4-channel blocks hold a group's 4 halves together (int4_dot.h's [n_pad / 4, k / 32, 4]). */
static inline __m512 int4_group_halves16(const uint16_t *t, int64_t n_pad, int64_t groups, int64_t c0, int64_t g) {
    long long block[4];
    for (int b = 0; b < 4; ++b) {
        const int64_t c = c0 + 4 * b;
        block[b] = 0;
        if (c < n_pad) memcpy(&block[b], t + ((c / INT4_CHANNELS) * groups + g) * INT4_CHANNELS, sizeof(block[b]));
    }
    return _mm512_cvtph_ps(_mm256_set_epi64x(block[3], block[2], block[1], block[0]));
}
#endif

/* dst: one bf16 panel [k / 2][16][2] of channels c0 .. c0 + 15 of the int4 weights (packed [n_pad, k / 2], d and m
 * [n_pad / 4, k / 32, 4]); channels at or past n_pad are zero. */
static inline void int4_bf16_panel(uint16_t *dst, const uint8_t *packed, const uint16_t *d, const uint16_t *m,
                                   int64_t n_pad, int64_t k, int64_t c0) {
    const int64_t groups = k / INT4_GROUP, row_bytes = k / 2;
#if defined(__AVX512BF16__)
    /* Per pair of groups, each channel's 32 packed bytes are 8 dwords (dword i: inputs 4i .. 4i + 3 in its low
     * nibbles, 4i + 32 .. 4i + 35 in its high ones); transposed 16 x 8 (lane j: channel c0 + j), each is 4 panel rows
     * (input pairs) of 16 channels: 8 vectors of 16 floats (fma with the channels' scale and minimum), two at a time
     * rounded together and interleaved by words into (input 2p, 2p + 1) dwords. */
    const __m512i nibble = _mm512_set1_epi32(0x0F);
    /* word i of a pair row: bf16(first)[j] for even i = 2j, bf16(second)[j] for odd i (cvtne2ps: first in 0-15) */
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                                22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i lanes_lo = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0);
    const __m512i lanes_hi = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
    for (int64_t pr = 0; pr < k / 64; ++pr) { /* inputs 64 pr .. 64 pr + 63: groups 2 pr (low nibbles), 2 pr + 1 */
        __m512i r[8], t[8], u[8], col[8];
        for (int a = 0; a < 8; ++a) { /* row a: channel c0 + a in the low half, c0 + 8 + a in the high half */
            const int64_t c = c0 + a, c8 = c + 8;
            const __m256i lo = c < n_pad ? _mm256_loadu_si256((const __m256i *)(packed + c * row_bytes + 32 * pr))
                                         : _mm256_setzero_si256();
            const __m256i hi = c8 < n_pad ? _mm256_loadu_si256((const __m256i *)(packed + c8 * row_bytes + 32 * pr))
                                          : _mm256_setzero_si256();
            r[a] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        }
        /* an 8 x 8 dword transpose within each 256-bit half */
        for (int i = 0; i < 4; ++i) {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        for (int i = 0; i < 2; ++i) { /* u[4i + c], 128-bit lane L of a half: rows 4i .. 4i + 3 of dword 4L + c */
            u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
            u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
            u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
            u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
        }
        for (int c = 0; c < 4; ++c) { /* dword c from each half's first 128-bit lanes, dword 4 + c from the second */
            col[c] = _mm512_permutex2var_epi64(u[c], lanes_lo, u[4 + c]);
            col[4 + c] = _mm512_permutex2var_epi64(u[c], lanes_hi, u[4 + c]);
        }
        const __m512 d0 = int4_group_halves16(d, n_pad, groups, c0, 2 * pr);
        const __m512 m0 = int4_group_halves16(m, n_pad, groups, c0, 2 * pr);
        const __m512 d1 = int4_group_halves16(d, n_pad, groups, c0, 2 * pr + 1);
        const __m512 m1 = int4_group_halves16(m, n_pad, groups, c0, 2 * pr + 1);
        for (int i = 0; i < 8; ++i) {
            const __m512i v = col[i];
            __m512 f[8]; /* inputs 4i .. 4i + 3 (low nibbles), then 4i + 32 .. 4i + 35 (high) */
            for (int b = 0; b < 4; ++b) {
                const __m512i lo = _mm512_and_si512(_mm512_srli_epi32(v, 8 * b), nibble);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi32(v, 8 * b + 4), nibble);
                f[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), d0, m0);
                f[4 + b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), d1, m1);
            }
            for (int h = 0; h < 2; ++h)
                for (int p = 0; p < 2; ++p) { /* pair row 32 pr + 16 h + 2 i + p */
                    const __m512i two = (__m512i)_mm512_cvtne2ps_pbh(f[4 * h + 2 * p + 1], f[4 * h + 2 * p]);
                    _mm512_storeu_si512((void *)(dst + (32 * pr + 16 * h + 2 * i + p) * 2 * BF16_PANEL),
                                        _mm512_permutexvar_epi16(interleave, two));
                }
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
