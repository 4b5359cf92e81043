/* bfloat16 matrix products against panel-packed weights (bf16_panels.h), for any number of rows, and the
 * packing.
 *
 * Why: oneDNN's bf16 products (torch) carry a per-call cost that dominates at decode sizes, and a bf16
 * model's one-call C forward needs its own bf16 product; the execution plan (worker/plan.py) times this
 * against torch's and keeps the faster per row-count bucket.
 *
 * Work split: rows in chunks whose activations stay in L2; inside a chunk the threads take guided grabs of at least
 * PANELS_PER_GRAB panels (work_split.h), in pairs over the chunk's rows (AMX: two 16-row blocks x two panels per
 * pass where the CPU has AMX-BF16, the next pair's weights prefetched meanwhile; vdpbf16ps or portable rows for the
 * rest).
 * Invariants: x is bf16 [m, x_stride] with x_stride >= bf16_k_pad(k) and zeros in columns k .. k_pad - 1, readable
 * up to a whole number of 16-row blocks when rows_padded (bf16_panel_rows);
 * y is [m, n] float32 or bf16 (y_bf16); panels as bf16_panels.h; bias is float32 [n] or NULL.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "bf16_panels.h"
#include "work_split.h"

/* 1 when bf16 products run on AMX tiles in this process (see bf16_amx_ready). */
int tm_bf16_amx_ready(void) { return bf16_amx_ready(); }

/* Rows in chunks whose activation block stays in L2 while every panel passes over it (as f32_gemm.c). */
#define X_CHUNK_BYTES (256 * 1024)

/* The product of x and the panels into `out` (a bf16_out; greedy: best / best_id hold num_threads running rows of
 * m each, one per thread, which this function points each thread's copy of `out` at). */
static void panels_product(const bf16_out *out, const uint16_t *x, int64_t x_stride, int rows_padded,
                           const uint16_t *panels, int64_t m, int64_t n, int64_t k, int num_threads) {
    const int64_t np = bf16_num_panels(n), k_pad = bf16_k_pad(k), pairs = (np + 1) / 2;
    const int amx_rows = bf16_amx_rows(m);
    int64_t chunk = X_CHUNK_BYTES / (k_pad * 2) / 32 * 32;
    chunk = chunk < 32 ? 32 : chunk;
#pragma omp parallel num_threads(num_threads)
    {
        bf16_out mine = *out;
        if (mine.best != NULL) {
            mine.best += omp_get_thread_num() * m;
            mine.best_id += omp_get_thread_num() * m;
        }
#if TM_HAVE_AMX
        if (amx_rows) bf16_amx_load_config_rows(amx_rows);
#endif
        bf16_pending pend;
        pend.blocks = 0;
        for (int64_t m0 = 0; m0 < m; m0 += chunk) {
            const int64_t rows = m - m0 < chunk ? m - m0 : chunk;
#pragma omp for schedule(guided, PANELS_PER_GRAB / 2) nowait
            for (int64_t q = 0; q < pairs; ++q)
                bf16_panel_rows(&mine, x, x_stride, panels, k_pad, k_pad, m0, rows, 2 * q, 2 * q + 1 < np ? 2 : 1,
                                amx_rows, q + 1 < pairs ? 2 * q + 2 : -1, rows_padded, &pend);
        }
        bf16_flush(&pend);
#if TM_HAVE_AMX
        if (amx_rows) _tile_release();
#endif
    }
}

void tm_bf16_panels_gemm(void *y, int y_bf16, const uint16_t *x, int64_t x_stride, int rows_padded,
                         const uint16_t *panels, const float *bias, int64_t m, int64_t n, int64_t k, int num_threads) {
    const bf16_out out = bf16_plain_out(y, y_bf16, n, bias);
    panels_product(&out, x, x_stride, rows_padded, panels, m, n, k, num_threads);
}

/* ids [m] = the channel of each row's largest value of x W^T (+ bias), the lowest among equal values (argmax of
 * tm_bf16_panels_gemm's float32 output, bit for bit: the same sums), without writing the [m, n] products; values
 * [m] (NULL: not wanted) = that value. Returns 0, or 1 when scratch memory could not be allocated. */
int tm_bf16_panels_argmax(int64_t *ids, float *values, const uint16_t *x, int64_t x_stride, int rows_padded,
                          const uint16_t *panels, const float *bias, int64_t m, int64_t n, int64_t k, int num_threads) {
    float *best = (float *)malloc((size_t)(num_threads * m) * sizeof(float));
    int64_t *best_id = (int64_t *)malloc((size_t)(num_threads * m) * sizeof(int64_t));
    if (best == NULL || best_id == NULL) {
        free(best), free(best_id);
        return 1;
    }
    for (int64_t i = 0; i < num_threads * m; ++i) best[i] = -INFINITY, best_id[i] = n; /* n: no channel yet */
    bf16_out out = bf16_plain_out(NULL, 0, n, bias);
    out.best = best, out.best_id = best_id;
    panels_product(&out, x, x_stride, rows_padded, panels, m, n, k, num_threads);
    for (int64_t r = 0; r < m; ++r) { /* merge the threads' rows */
        float b = best[r];
        int64_t id = best_id[r];
        for (int t = 1; t < num_threads; ++t)
            if (bf16_beats(best[t * m + r], best_id[t * m + r], b, id)) b = best[t * m + r], id = best_id[t * m + r];
        ids[r] = id < n ? id : 0;
        if (values != NULL) values[r] = b;
    }
    free(best), free(best_id);
    return 0;
}

/* panels (bf16_panels.h) from w [n, k] bf16 (contiguous), zero past channel n and input k. */
void tm_bf16_pack_panels(uint16_t *panels, const uint16_t *w, int64_t n, int64_t k, int num_threads) {
    const int64_t np = bf16_num_panels(n), k_pad = bf16_k_pad(k);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < np; ++p)
        for (int64_t kp = 0; kp < k_pad / 2; ++kp)
            for (int64_t j = 0; j < BF16_PANEL; ++j)
                for (int64_t i = 0; i < 2; ++i) {
                    const int64_t c = p * BF16_PANEL + j, col = 2 * kp + i;
                    panels[((p * (k_pad / 2) + kp) * BF16_PANEL + j) * 2 + i] = c < n && col < k ? w[c * k + col] : 0;
                }
}
