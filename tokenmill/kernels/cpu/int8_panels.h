/* W8A8 products y = x W^T against int8 weights packed in panels of I8_PANEL output channels, on rows
 * already quantized per token (int8_quantize.h's quantize_row: u in [0, 255], x ~= low + step * u):
 *
 *   y[m, c] = scale[c] * (step[m] * sum_i q[c, i] * u[m, i] + low[m] * rowsum[c])  (+ bias[c])
 *
 * Layout: panel p holds channels I8_PANEL * p .. + 15 as [kq][16][4] (kq = ceil(k / 4)): for each quad of
 * input channels, each channel's 4 weights side by side; channels past n and inputs past k are zero.
 * scale and rowsum are padded with zeros to a whole number of panels.
 *
 * Tile: I8_TILE_ROWS rows x one panel. Per quad it loads the panel's two 32-byte vectors (8 channels x
 * 4 inputs each) and broadcasts each row's 4 bytes u[4q .. 4q+3]; vpmaddubsw adds the products of each
 * input pair into an int16, vpmaddwd against ones adds the two pairs into an int32 per channel, vpaddd
 * accumulates: 32 multiply-adds for 3 instructions. Five rows fill the 16 AVX2 registers (10
 * accumulators, 2 weight vectors, the broadcast, the ones and the product); six spill.
 *
 * Exactness: |q[2j]| + |q[2j+1]| <= 128 (quant/int8_cpu.py's pair budget) keeps every vpmaddubsw pair sum
 * within 255 * 128 = 32640: it never saturates, and the int32 sums are exact, so a row's result does not
 * depend on its batch. u's bytes past k may hold anything: their weights are zero.
 */
#ifndef TM_INT8_PANELS_H
#define TM_INT8_PANELS_H

#include <stddef.h>
#include <stdint.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define I8_PANEL 16
#define I8_QUAD 4
#define I8_TILE_ROWS 5

static inline int64_t int8_num_panels(int64_t n) { return (n + I8_PANEL - 1) / I8_PANEL; }
static inline int64_t int8_quads(int64_t k) { return (k + I8_QUAD - 1) / I8_QUAD; }

/* The tile's integer sums, acc[r][j] for channel j of the panel: AVX2 or scalar. */
#if defined(__AVX2__)
static inline __attribute__((always_inline)) void int8_tile_sums(const uint8_t *u, int64_t u_stride,
                                                                const int8_t *panel, int64_t kq, int rows,
                                                                int32_t acc[I8_TILE_ROWS][I8_PANEL]) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i lo[I8_TILE_ROWS], hi[I8_TILE_ROWS];
    for (int r = 0; r < I8_TILE_ROWS; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
    for (int64_t q = 0; q < kq; ++q) {
        const __m256i w_lo = _mm256_loadu_si256((const __m256i *)(panel + q * I8_PANEL * I8_QUAD));
        const __m256i w_hi = _mm256_loadu_si256((const __m256i *)(panel + q * I8_PANEL * I8_QUAD + 32));
        for (int r = 0; r < rows; ++r) {
            int32_t quad;
            __builtin_memcpy(&quad, u + r * u_stride + q * I8_QUAD, sizeof(quad));
            const __m256i a = _mm256_set1_epi32(quad);
            lo[r] = _mm256_add_epi32(lo[r], _mm256_madd_epi16(_mm256_maddubs_epi16(a, w_lo), ones));
            hi[r] = _mm256_add_epi32(hi[r], _mm256_madd_epi16(_mm256_maddubs_epi16(a, w_hi), ones));
        }
    }
    for (int r = 0; r < rows; ++r) {
        _mm256_storeu_si256((__m256i *)acc[r], lo[r]);
        _mm256_storeu_si256((__m256i *)(acc[r] + 8), hi[r]);
    }
}
#else
static inline void int8_tile_sums(const uint8_t *u, int64_t u_stride, const int8_t *panel, int64_t kq, int rows,
                                  int32_t acc[I8_TILE_ROWS][I8_PANEL]) {
    for (int r = 0; r < rows; ++r)
        for (int j = 0; j < I8_PANEL; ++j) {
            int32_t s = 0;
            for (int64_t q = 0; q < kq; ++q)
                for (int t = 0; t < I8_QUAD; ++t)
                    s += (int32_t)u[r * u_stride + q * I8_QUAD + t] * panel[(q * I8_PANEL + j) * I8_QUAD + t];
            acc[r][j] = s;
        }
}
#endif

/* rows (1 .. I8_TILE_ROWS, a constant once inlined) x the first cols channels of a panel, dequantized. */
static inline __attribute__((always_inline)) void int8_panel_tile(
    float *y, int64_t y_stride, const uint8_t *u, int64_t u_stride, const float *low, const float *step,
    const int8_t *panel, const float *scale, const int32_t *rowsum, const float *bias, int64_t kq, int rows, int cols) {
    int32_t acc[I8_TILE_ROWS][I8_PANEL];
    int8_tile_sums(u, u_stride, panel, kq, rows, acc);
    float add[I8_PANEL] = {0};
    if (bias != NULL)
        for (int j = 0; j < cols; ++j) add[j] = bias[j];
    for (int r = 0; r < rows; ++r) {
        float out[I8_PANEL];
        for (int j = 0; j < I8_PANEL; ++j) /* whole panel (vectorized): scale and rowsum are padded */
            out[j] = scale[j] * (step[r] * (float)acc[r][j] + low[r] * (float)rowsum[j]) + add[j];
        for (int j = 0; j < cols; ++j) y[r * y_stride + j] = out[j];
    }
}

/* Panel p for quantized rows 0 .. num_rows-1 (u row stride u_stride, low / step per row) into y. */
static inline void int8_panel_rows(float *y, int64_t y_stride, const uint8_t *u, int64_t u_stride, const float *low,
                                   const float *step, const int8_t *panels, const float *scale, const int32_t *rowsum,
                                   const float *bias, int64_t n, int64_t k, int64_t num_rows, int64_t p) {
    const int64_t kq = int8_quads(k), n0 = p * I8_PANEL;
    const int cols = n - n0 < I8_PANEL ? (int)(n - n0) : I8_PANEL;
    const int8_t *panel = panels + p * kq * I8_PANEL * I8_QUAD;
    const float *b = bias == NULL ? NULL : bias + n0;
    float *yp = y + n0;
    int64_t r = 0;
#define TM_INT8_TILE(rows_)                                                                                      \
    int8_panel_tile(yp + r * y_stride, y_stride, u + r * u_stride, u_stride, low + r, step + r, panel, scale + n0, \
                    rowsum + n0, b, kq, rows_, cols)
    for (; r + I8_TILE_ROWS <= num_rows; r += I8_TILE_ROWS) TM_INT8_TILE(I8_TILE_ROWS);
    switch (num_rows - r) {
        case 4: TM_INT8_TILE(4); break;
        case 3: TM_INT8_TILE(3); break;
        case 2: TM_INT8_TILE(2); break;
        case 1: TM_INT8_TILE(1); break;
        default: break;
    }
#undef TM_INT8_TILE
}

#endif
