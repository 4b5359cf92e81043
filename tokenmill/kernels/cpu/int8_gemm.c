/* W8A8 matrix product for decode-sized row counts, with the activation quantization fused in (the
 * arithmetic and its exactness: int8_dot.h).
 *
 * At a few rows a projection is bound by reading its weights (one token of SmolLM2-135M reads ~107 MB
 * of int8 weights). fbgemm's quantized linear adds per-call work (range pass, quantization, row
 * offsets, requantization, each a separate op for per-token ranges) that costs more than the product at
 * one row; this kernel does the range and quantization in one pass over x and the product in another.
 *
 * With rotation_block = b > 0, x is first multiplied block by block by the b x b Hadamard matrix (the
 * rotation quant/int8_cpu.py folds into down_proj's weights), inside the quantization pass.
 *
 * Invariants: x is [num_rows, k] float32 with row stride x_stride; q is [n, k] int8 contiguous;
 * rotation_block is 0 or a power of 2 dividing k;
 * rowsum and scale are [n]; y is [num_rows, n] float32 contiguous. Any n, k >= 1, num_rows >= 1.
 *
 * Work split: blocks of ROW_BLOCK output channels over the OpenMP pool (torch's libgomp).
 */
#include "int8_dot.h"

/* Returns 0, or -1 when the quantized-activation buffer cannot be allocated (y untouched). */
int tm_int8_gemm_small(float *y, const float *x, int64_t x_stride, int64_t rotation_block, const int8_t *q,
                       const int32_t *rowsum, const float *scale, int64_t num_rows, int64_t n, int64_t k,
                       int num_threads) {
    const int64_t k_pad = (k + K_ALIGN - 1) / K_ALIGN * K_ALIGN;
    uint8_t *u = (uint8_t *)aligned_alloc(64, (size_t)((num_rows * k_pad + 63) / 64 * 64));
    /* row_low [num_rows], row_step [num_rows], then the rotation scratch [k] */
    float *row_low = (float *)malloc((size_t)(num_rows * 2 + k) * sizeof(float));
    if (u == NULL || row_low == NULL) {
        free(u);
        free(row_low);
        return -1;
    }
    float *row_step = row_low + num_rows, *scratch = row_step + num_rows;
    for (int64_t m = 0; m < num_rows; ++m)
        row_low[m] = quantize_row(x + m * x_stride, k, rotation_block, scratch, u + m * k_pad, &row_step[m]);

    const int64_t num_blocks = (n + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t b = 0; b < num_blocks; ++b)
        int8_output_block(y, n, u, k_pad, row_low, row_step, q, rowsum, scale, b * ROW_BLOCK, n, num_rows, k);
    free(u);
    free(row_low);
    return 0;
}
