/* Float32 products y = x w^T (+ b) against a weight packed in panels of PANEL output channels.
 *
 * Layout: panel p holds output channels PANEL * p .. PANEL * p + PANEL - 1 as [k][PANEL], channel
 * fastest; channels past n are zero. A tile is PANEL_ROWS rows x one panel: per input channel i it loads
 * the panel's two 8-float vectors at i once and broadcasts x[r][i] of each row, 12 FMAs into 12
 * accumulators (16 AVX2 registers: 12 + 2 weight vectors + 1 broadcast). The panel streams through in
 * order, so a thread reads one sequential stream of weights.
 *
 * Invariant: every output is one accumulator lane summed over i = 0 .. k-1 in order, whatever the number
 * of rows, the tile a row falls in or the thread: a row's result does not depend on its batch, and a
 * prefill row and a decode row of the same input are bitwise equal.
 */
#ifndef TM_F32_PANELS_H
#define TM_F32_PANELS_H

#include <stddef.h>
#include <stdint.h>

#include "vec8.h"

#define PANEL 16
#define PANEL_ROWS 6

#if defined(__AVX512F__)
/* With AVX-512 a panel's 16 channels are one 16-float vector: per input channel one weight load and one FMA per
 * row (half the AVX2 tile's), which matters once a tile has more than a row or two (speculative verification,
 * small batches, prompts). Each output is still one lane summed over i in order: bitwise the AVX2 tile's result. */
typedef float v16 __attribute__((vector_size(64), aligned(4)));
/* Software prefetch this many 64-byte lines (8 KiB) ahead in the weight stream (the next panel's when near a panel's
 * end: a thread's panels are contiguous). The hardware prefetchers alone kept a 5-row tile at half the memory
 * bandwidth of a 1-row one. A/B on the AMX Xeon (interleaved, 2 threads), lm_head 49152 x 576 at 5 rows: none 4.99,
 * 16 lines 5.14 (1 row 0.91x), 64 lines 2.99, 128 lines 2.36 ms, 256 lines no better than 64; 3072 x 576 at 5 rows
 * 1.27x (64). Arithmetic unchanged. */
#ifndef TM_PREFETCH_LINES
#define TM_PREFETCH_LINES 128
#endif

static inline __attribute__((always_inline)) void panel_tile(float *y, int64_t y_stride, const float *x,
                                                            int64_t x_stride, const float *panel, const float *bias,
                                                            int64_t k, int rows, int cols) {
    v16 acc[PANEL_ROWS];
    for (int r = 0; r < PANEL_ROWS; ++r) acc[r] = (v16){0};
    for (int64_t i = 0; i < k; ++i) {
        __builtin_prefetch(panel + (i + TM_PREFETCH_LINES) * PANEL);
        const v16 w = *(const v16 *)(panel + i * PANEL);
        for (int r = 0; r < rows; ++r) acc[r] += ((v16){0} + x[r * x_stride + i]) * w;
    }
    if (bias != NULL) {
        float b[PANEL] = {0};
        for (int j = 0; j < cols; ++j) b[j] = bias[j];
        for (int r = 0; r < rows; ++r) acc[r] += *(const v16 *)b;
    }
    for (int r = 0; r < rows; ++r) {
        if (cols == PANEL) {
            *(v16 *)(y + r * y_stride) = acc[r];
        } else {
            for (int j = 0; j < cols; ++j) y[r * y_stride + j] = acc[r][j];
        }
    }
}
#else
/* rows (1 .. PANEL_ROWS, a constant once inlined) x the first cols (1 .. PANEL) channels of a panel. */
static inline __attribute__((always_inline)) void panel_tile(float *y, int64_t y_stride, const float *x,
                                                            int64_t x_stride, const float *panel, const float *bias,
                                                            int64_t k, int rows, int cols) {
    v8 lo[PANEL_ROWS], hi[PANEL_ROWS];
    for (int r = 0; r < PANEL_ROWS; ++r) lo[r] = hi[r] = (v8){0};
    for (int64_t i = 0; i < k; ++i) {
        const v8 w_lo = *(const v8 *)(panel + i * PANEL), w_hi = *(const v8 *)(panel + i * PANEL + LANES);
        for (int r = 0; r < rows; ++r) {
            const v8 xb = (v8){0} + x[r * x_stride + i];
            lo[r] += xb * w_lo;
            hi[r] += xb * w_hi;
        }
    }
    if (bias != NULL) {
        float b[PANEL] = {0};
        for (int j = 0; j < cols; ++j) b[j] = bias[j];
        for (int r = 0; r < rows; ++r) {
            lo[r] += *(const v8 *)b;
            hi[r] += *(const v8 *)(b + LANES);
        }
    }
    for (int r = 0; r < rows; ++r) {
        if (cols == PANEL) {
            *(v8 *)(y + r * y_stride) = lo[r];
            *(v8 *)(y + r * y_stride + LANES) = hi[r];
        } else {
            for (int j = 0; j < cols; ++j) y[r * y_stride + j] = j < LANES ? lo[r][j] : hi[r][j - LANES];
        }
    }
}

#endif

/* Panel p of `panels` (k inputs) for rows 0 .. num_rows-1 of x (row stride x_stride) into y (row stride y_stride),
 * over the first k_len <= k inputs (the rest known zero in these rows: a tensor-parallel rank's o_proj). */
static inline void panel_rows(float *y, int64_t y_stride, const float *x, int64_t x_stride, const float *panels,
                              const float *bias, int64_t n, int64_t k, int64_t k_len, int64_t num_rows, int64_t p) {
    const int64_t n0 = p * PANEL;
    const int cols = n - n0 < PANEL ? (int)(n - n0) : PANEL;
    const float *panel = panels + p * k * PANEL;
    const float *b = bias == NULL ? NULL : bias + n0;
    float *yp = y + n0;
    int64_t r = 0;
    for (; r + PANEL_ROWS <= num_rows; r += PANEL_ROWS)
        panel_tile(yp + r * y_stride, y_stride, x + r * x_stride, x_stride, panel, b, k_len, PANEL_ROWS, cols);
    switch (num_rows - r) {
        case 5: panel_tile(yp + r * y_stride, y_stride, x + r * x_stride, x_stride, panel, b, k_len, 5, cols); break;
        case 4: panel_tile(yp + r * y_stride, y_stride, x + r * x_stride, x_stride, panel, b, k_len, 4, cols); break;
        case 3: panel_tile(yp + r * y_stride, y_stride, x + r * x_stride, x_stride, panel, b, k_len, 3, cols); break;
        case 2: panel_tile(yp + r * y_stride, y_stride, x + r * x_stride, x_stride, panel, b, k_len, 2, cols); break;
        case 1: panel_tile(yp + r * y_stride, y_stride, x + r * x_stride, x_stride, panel, b, k_len, 1, cols); break;
        default: break;
    }
}

static inline int64_t num_panels(int64_t n) { return (n + PANEL - 1) / PANEL; }

#endif
