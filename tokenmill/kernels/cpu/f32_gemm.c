/* Float32 matrix products against panel-packed weights (f32_panels.h), for any number of rows, and the
 * packing itself.
 *
 * Why: on the 2-core AVX2 machine (Zen 3) MKL's sgemm reaches 60-70% of the FMA peak at the model's
 * shapes and about 40% at 64 rows; the panel tiles reach about 75% at both (benchmarks/panel_gemm.py).
 *
 * Blocking: rows in chunks whose x block stays in L2 (X_CHUNK_BYTES); inside a chunk the threads take
 * guided grabs of at least PANELS_PER_GRAB panels (work_split.h: a long contiguous run first, then smaller grabs,
 * so a thread slowed by other load on its core does less), each panel over the chunk's rows in tiles of
 * PANEL_ROWS. A panel (k * 64 bytes) is read from L2 once per tile and from memory once per chunk.
 * Invariants: x is [m, k] with row stride x_stride; y is [m, n] contiguous; panels is
 * [num_panels(n), k, PANEL]; bias is [n] or NULL.
 */
#include <omp.h>

#include "f32_panels.h"
#include "work_split.h"

#define X_CHUNK_BYTES (192 * 1024)

void tm_f32_panels_gemm(float *y, const float *x, int64_t x_stride, const float *panels, const float *bias,
                        int64_t m, int64_t n, int64_t k, int num_threads) {
    int64_t chunk = X_CHUNK_BYTES / (k * (int64_t)sizeof(float)) / PANEL_ROWS * PANEL_ROWS;
    chunk = chunk < PANEL_ROWS ? PANEL_ROWS : chunk;
    const int64_t np = num_panels(n);
#pragma omp parallel num_threads(num_threads)
    for (int64_t m0 = 0; m0 < m; m0 += chunk) {
        const int64_t rows = m - m0 < chunk ? m - m0 : chunk;
#pragma omp for schedule(guided, PANELS_PER_GRAB) nowait
        for (int64_t p = 0; p < np; ++p)
            panel_rows(y + m0 * n, n, x + m0 * x_stride, x_stride, panels, bias, n, k, k, rows, p);
    }
}

/* panels [num_panels(n), k, PANEL] from w [n, k] (contiguous), zero past channel n. */
void tm_f32_pack_panels(float *panels, const float *w, int64_t n, int64_t k, int num_threads) {
    const int64_t np = num_panels(n);
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t p = 0; p < np; ++p)
        for (int64_t i = 0; i < k; ++i)
            for (int64_t j = 0; j < PANEL; ++j) {
                const int64_t c = p * PANEL + j;
                panels[(p * k + i) * PANEL + j] = c < n ? w[c * k + i] : 0.0f;
            }
}

/* out [num_ids, k]: rows ids[t] of the weight the panels were packed from (an embedding table tied to
 * the vocabulary projection, read back from its panels). Invariant: 0 <= ids[t] < n. */
void tm_f32_panel_gather(float *out, const float *panels, const int64_t *ids, int64_t num_ids, int64_t k) {
    for (int64_t t = 0; t < num_ids; ++t) {
        const float *src = panels + (ids[t] / PANEL) * k * PANEL + ids[t] % PANEL;
        for (int64_t i = 0; i < k; ++i) out[t * k + i] = src[i * PANEL];
    }
}
