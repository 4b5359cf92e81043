/* W4A16 matrix product for decode-sized row counts (quant/int4_cpu.py's group-wise 4-bit weights,
 * activations quantized to 16 bits per group of 32 in the same call; arithmetic and exactness: int4_dot.h), and
 * for products with many rows either the dequantization of those weights to float32 (for torch's GEMM) or a bf16
 * product over panels dequantized pass by pass (int4_bf16.h; activations rounded to bf16).
 *
 * At a few rows a projection is bound by reading its weights: 4-bit weights with fp16 group scales
 * and minima are 0.625 bytes per weight against int8's 1 (+ a scale per channel).
 *
 * Invariants: x is [num_rows, k] float32 with row stride x_stride; packed is [n_pad, k / 2], d and m
 * [n_pad / 4, k / 32, 4] (int4_dot.h), n_pad = n rounded up to 4; k % 64 == 0; y is [num_rows, n]
 * float32 contiguous; w is [n, k] float32 contiguous.
 * Work split: blocks of 4 output channels over the OpenMP pool (torch's libgomp).
 */
#include <omp.h>
#include <stdlib.h>

#include "int4_bf16.h"
#include "int4_dot.h"
#include "work_split.h"

/* Returns 0, or -1 when the quantized-activation buffers cannot be allocated (y untouched). */
int tm_int4_gemm_small(float *y, const float *x, int64_t x_stride, const uint8_t *packed, const uint16_t *d,
                       const uint16_t *m, int64_t num_rows, int64_t n, int64_t k, int num_threads) {
    const int64_t groups = k / INT4_GROUP;
    int16_t *a = (int16_t *)aligned_alloc(64, (size_t)((num_rows * k * 2 + 63) / 64 * 64));
    float *s = (float *)malloc((size_t)(2 * num_rows * groups) * sizeof(float));
    if (a == NULL || s == NULL) {
        free(a);
        free(s);
        return -1;
    }
    float *t = s + num_rows * groups;
    for (int64_t r = 0; r < num_rows; ++r)
        int4_quantize_row(x + r * x_stride, k, a + r * k, s + r * groups, t + r * groups);
    const int64_t num_blocks = (n + INT4_CHANNELS - 1) / INT4_CHANNELS;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t b = 0; b < num_blocks; ++b)
        int4_output_block(y, n, a, k, s, t, groups, packed, d, m, b * INT4_CHANNELS, n, num_rows, k);
    free(a);
    free(s);
    return 0;
}

/* w [n, k] = d * q + m, every weight in float32 exactly as the product above reads it. */
void tm_int4_dequantize(float *w, const uint8_t *packed, const uint16_t *d, const uint16_t *m, int64_t n, int64_t k,
                        int num_threads) {
    const int64_t groups = k / INT4_GROUP;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t j = 0; j < n; ++j) {
        const uint8_t *row = packed + j * (k / 2);
        const int64_t scale_base = (j / INT4_CHANNELS) * groups * INT4_CHANNELS + j % INT4_CHANNELS;
        for (int64_t p = 0; p < k / 64; ++p) {
            const float d0 = int4_half_to_float(d[scale_base + 2 * p * INT4_CHANNELS]);
            const float m0 = int4_half_to_float(m[scale_base + 2 * p * INT4_CHANNELS]);
            const float d1 = int4_half_to_float(d[scale_base + (2 * p + 1) * INT4_CHANNELS]);
            const float m1 = int4_half_to_float(m[scale_base + (2 * p + 1) * INT4_CHANNELS]);
            float *out = w + j * k + 64 * p;
            for (int i = 0; i < 32; ++i) {
                const uint8_t byte = row[32 * p + i];
                out[i] = d0 * (float)(byte & 0x0F) + m0;
                out[32 + i] = d1 * (float)(byte >> 4) + m1;
            }
        }
    }
}

/* Rows of activations in chunks that every pair of panels passes over, each chunk building the pairs' panels again:
 * 1 MiB (896 rows at k = 576), not bf16_gemm.c's 256 KiB, which at 2048 x 1536 rebuilt every pair 32 times (Zen 4:
 * down_proj 12.0 against 9.3 ms; 4 MiB no faster). */
#define X_CHUNK_BYTES (1024 * 1024)

/* y [num_rows, n] float32 = bf16(x) bf16(W)^T for the int4 weights W: x [num_rows, k] float32 (row stride x_stride)
 * rounded to bf16, each thread's pair of panels dequantized into its own scratch just before its pass
 * (int4_bf16.h), the products bf16_panels.h's (AMX tiles where present, else vdpbf16ps; sums in float32).
 * Returns 0, or -1 when the scratch memory cannot be allocated (y untouched). */
int tm_int4_bf16_gemm(float *y, const float *x, int64_t x_stride, const uint8_t *packed, const uint16_t *d,
                      const uint16_t *m, int64_t num_rows, int64_t n, int64_t k, int num_threads) {
    const int64_t rows16 = (num_rows + 15) / 16 * 16, n_pad = (n + INT4_CHANNELS - 1) / INT4_CHANNELS * INT4_CHANNELS;
    const int64_t np = bf16_num_panels(n), pairs = (np + 1) / 2, pair_elems = 2 * k * BF16_PANEL;
    uint16_t *xb = (uint16_t *)aligned_alloc(64, (size_t)(rows16 * k * 2));
    uint16_t *scratch = (uint16_t *)aligned_alloc(64, (size_t)(num_threads * pair_elems * 2));
    if (xb == NULL || scratch == NULL) {
        free(xb);
        free(scratch);
        return -1;
    }
    const int amx_rows = bf16_amx_rows(num_rows);
    int64_t chunk = X_CHUNK_BYTES / (k * 2) / 32 * 32;
    chunk = chunk < 32 ? 32 : chunk;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows16; ++r) { /* rows past num_rows: zero, read by a last padded AMX block */
            if (r < num_rows)
                bf16_store_x_row(xb, k, k, r, x + r * x_stride, k);
            else
                memset(xb + r * k, 0, (size_t)k * 2);
        }
        bf16_out mine = bf16_plain_out(y, 0, n, NULL);
        uint16_t *own = scratch + omp_get_thread_num() * pair_elems;
        mine.pair_panels = own;
#if TM_HAVE_AMX
        if (amx_rows) bf16_amx_load_config_rows(amx_rows);
#endif
        bf16_pending pend;
        pend.blocks = 0;
        for (int64_t m0 = 0; m0 < num_rows; m0 += chunk) {
            const int64_t rows = num_rows - m0 < chunk ? num_rows - m0 : chunk;
#pragma omp for schedule(guided, PANELS_PER_GRAB / 2) nowait
            for (int64_t q = 0; q < pairs; ++q) { /* pend (AMX) keeps the last pass's sums, not its weights */
                const int two = 2 * q + 1 < np;
                int4_bf16_pair(own, packed, d, m, n_pad, k, 2 * q, two ? 2 * q + 1 : -1);
                bf16_panel_rows(&mine, xb, k, NULL, k, k, m0, rows, 2 * q, two ? 2 : 1, amx_rows, -1, 1, &pend);
            }
        }
        bf16_flush(&pend);
#if TM_HAVE_AMX
        if (amx_rows) _tile_release();
#endif
    }
    free(xb);
    free(scratch);
    return 0;
}

/* panels [num_panels(n), k / 2, 16, 2] bf16 (bf16_panels.h) = the int4 weights as tm_int4_bf16_gemm multiplies them
 * (for tests: against the float32 dequantization rounded to bf16 and packed). */
void tm_int4_bf16_panels(uint16_t *panels, const uint8_t *packed, const uint16_t *d, const uint16_t *m, int64_t n,
                         int64_t k) {
    const int64_t n_pad = (n + INT4_CHANNELS - 1) / INT4_CHANNELS * INT4_CHANNELS;
    for (int64_t p = 0; p < bf16_num_panels(n); ++p)
        int4_bf16_panel(panels + p * k * BF16_PANEL, packed, d, m, n_pad, k, p * BF16_PANEL);
}
