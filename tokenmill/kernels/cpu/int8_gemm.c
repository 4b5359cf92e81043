/* W8A8 matrix products for any number of rows against panel-packed int8 weights (int8_panels.h), the
 * activation quantization fused in, and the packing itself.
 *
 * Each row of x is quantized per token to `levels` (255, or 127 for the paired tile of int8_panels.h) in one
 * pass (int8_quantize.h's quantize_row; with rotation_block = b >
 * 0 it is first multiplied block by block by the b x b Hadamard matrix that quant/int8_cpu.py folds into
 * down_proj's weights), then the products run tile by tile.
 *
 * Blocking (as f32_gemm.c): rows in chunks whose quantized block stays in L2; inside a chunk the threads
 * take guided grabs of at least PANELS_PER_GRAB panels (work_split.h), each over the chunk's rows in tiles of
 * I8_TILE_ROWS.
 * Invariants: x is [m, k] float32 with row stride x_stride; y is [m, n] contiguous; panels is
 * [int8_num_panels(n), int8_quads(k), I8_PANEL, I8_QUAD]; scale and rowsum are padded to whole panels;
 * rotation_block is 0 or a power of 2 dividing k; bias is [n] or NULL.
 */
#include <omp.h>
#include <string.h>

#include "int8_amx.h"
#include "int8_quantize.h"
#include "int8_panels.h"
#include "work_split.h"

#define U_CHUNK_BYTES (192 * 1024)

/* Returns 0, or -1 when the quantized-activation buffers cannot be allocated (y untouched). */
int tm_int8_panels_gemm(float *y, const float *x, int64_t x_stride, int64_t rotation_block, const int8_t *panels,
                        const int32_t *rowsum, const float *scale, const float *bias, int64_t m, int64_t n, int64_t k,
                        int64_t levels, int num_threads) {
    const int64_t u_stride = int8_quads(k) * I8_QUAD;
    uint8_t *u = (uint8_t *)malloc((size_t)(m * u_stride));
    /* low [m], step [m], then a rotation scratch [k] per thread */
    float *low = (float *)malloc((size_t)(2 * m + (int64_t)num_threads * k) * sizeof(float));
    if (u == NULL || low == NULL) {
        free(u);
        free(low);
        return -1;
    }
    float *step = low + m;
    /* whole tiles of rows: AMX row-block pairs (32) and the AVX2 tile (5) */
    const int64_t tile_rows = 160;
    int64_t chunk = U_CHUNK_BYTES / u_stride / tile_rows * tile_rows;
    chunk = chunk < tile_rows ? tile_rows : chunk;
    const int64_t np = int8_num_panels(n), pairs = (np + 1) / 2;
    const int amx_rows = int8_amx_rows(m, k);
#pragma omp parallel num_threads(num_threads)
    {
        float *scratch = step + m + (int64_t)omp_get_thread_num() * k;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < m; ++r) {
            low[r] = quantize_row(x + r * x_stride, k, rotation_block, scratch, u + r * u_stride, &step[r], levels);
            memset(u + r * u_stride + k, 0, (size_t)(u_stride - k));
        }
#if TM_HAVE_AMX_INT8
        if (amx_rows) bf16_amx_load_config_rows(amx_rows);
#endif
        for (int64_t m0 = 0; m0 < m; m0 += chunk) {
            const int64_t rows = m - m0 < chunk ? m - m0 : chunk;
#pragma omp for schedule(guided, PANELS_PER_GRAB / 2) nowait
            for (int64_t q = 0; q < pairs; ++q)
                int8_panel_rows_amx(y, n, u, u_stride, low, step, panels, scale, rowsum, bias, n, k, m0, rows, 2 * q,
                                    2 * q + 1 < np ? 2 : 1, levels, amx_rows, 2 * q + 2, next_pair_panels(np, q));
        }
#if TM_HAVE_AMX_INT8
        if (amx_rows) _tile_release();
#endif
    }
    free(u);
    free(low);
    return 0;
}

/* panels [int8_num_panels(n), int8_quads(k), I8_PANEL, I8_QUAD] from q [n, k] (contiguous), zero past n and k. */
void tm_int8_pack_panels(int8_t *panels, const int8_t *q, int64_t n, int64_t k) {
    const int64_t np = int8_num_panels(n), kq = int8_quads(k);
    for (int64_t p = 0; p < np; ++p)
        for (int64_t g = 0; g < kq; ++g)
            for (int64_t j = 0; j < I8_PANEL; ++j)
                for (int64_t t = 0; t < I8_QUAD; ++t) {
                    const int64_t c = p * I8_PANEL + j, i = g * I8_QUAD + t;
                    panels[((p * kq + g) * I8_PANEL + j) * I8_QUAD + t] = c < n && i < k ? q[c * k + i] : 0;
                }
}
