/* W4A16 matrix product for decode-sized row counts (quant/int4_cpu.py's group-wise 4-bit weights,
 * activations quantized to 16 bits per group of 32 in the same call; arithmetic and exactness: int4_dot.h), and
 * the dequantization of those weights to float32 for products with many rows.
 *
 * At a few rows a projection is bound by reading its weights: 4-bit weights with fp16 group scales
 * and minima are 0.625 bytes per weight against int8's 1 (+ a scale per channel).
 *
 * Invariants: x is [num_rows, k] float32 with row stride x_stride; packed is [n_pad, k / 2], d and m
 * [n_pad / 4, k / 32, 4] (int4_dot.h), n_pad = n rounded up to 4; k % 64 == 0; y is [num_rows, n]
 * float32 contiguous; w is [n, k] float32 contiguous.
 * Work split: blocks of 4 output channels over the OpenMP pool (torch's libgomp).
 */
#include <stdlib.h>

#include "int4_dot.h"

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
