/* AVX512-VNNI tiles for int8_panels.h's products (int8_gemm.c, step_forward.c through int8_amx.h), on CPUs with
 * AVX512-VNNI (Intel since Cascade Lake, AMD since Zen 4): a panel's quad of input channels is one zmm (16
 * channels x 4 bytes, the VNNI order), so vpdpbusd does a row's 64 multiply-adds of a quad in one instruction,
 * against six (vpmaddubsw, vpmaddwd, vpaddd on two ymm halves) in int8_panels.h's AVX2 tile.
 *
 * Exactness: vpdpbusd adds four u8 x s8 products into an int32 lane with no int16 step, so the sums are exactly
 * those of the AVX2 tiles (whose pair sums never saturate under the pair budget) and of the AMX tiles, and the
 * epilogue is int8_amx.h's (int8_store_block's operations): outputs are bit for bit those of the other tiles, and
 * a row's result does not depend on the rows beside it.
 *
 * Tile: VNNI_ROWS rows x two panels (2 * VNNI_ROWS accumulators, two weight vectors, one broadcast of 32): per quad
 * two 64-byte weight loads and one 4-byte broadcast per row feed 2 * VNNI_ROWS vpdpbusd. Remainder rows take
 * the same tile with fewer rows (a constant once inlined), an odd last panel the one-panel tile.
 */
#ifndef TM_INT8_VNNI_H
#define TM_INT8_VNNI_H

#include <stdint.h>

#include "int8_panels.h"
#include "prefetch_stream.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#define TM_HAVE_VNNI 1
#define VNNI_ROWS 8

/* Rows 0 .. rows - 1 (u, low, step, y at those rows) x panels p .. p + panels - 1 (panels 1 or 2; rows and panels
 * constants once inlined). pf: the pass's prefetch of the next pair (int8_panel_rows_vnni), a step per 8 quads. */
static inline __attribute__((always_inline)) void int8_vnni_tile(float *y, int64_t y_stride, const uint8_t *u,
                                                                int64_t u_stride, const float *low, const float *step,
                                                                const int8_t *panels, const float *scale,
                                                                const int32_t *rowsum, const float *bias, int64_t n,
                                                                int64_t kq, int64_t p, int rows, int num_panels,
                                                                prefetch_stream *pf) {
    const int64_t panel_bytes = kq * I8_PANEL * I8_QUAD;
    const int8_t *w0 = panels + p * panel_bytes, *w1 = w0 + panel_bytes;
    __m512i acc[2][VNNI_ROWS];
    for (int r = 0; r < rows; ++r) acc[0][r] = acc[1][r] = _mm512_setzero_si512();
    for (int64_t q = 0; q < kq; ++q) {
        if (q % 8 == 0) prefetch_stream_step(pf);
        const __m512i b0 = _mm512_loadu_si512((const void *)(w0 + q * I8_PANEL * I8_QUAD));
        const __m512i b1 = num_panels == 2 ? _mm512_loadu_si512((const void *)(w1 + q * I8_PANEL * I8_QUAD)) : b0;
        for (int r = 0; r < rows; ++r) {
            int32_t quad;
            __builtin_memcpy(&quad, u + r * u_stride + q * I8_QUAD, sizeof(quad));
            const __m512i a = _mm512_set1_epi32(quad);
            acc[0][r] = _mm512_dpbusd_epi32(acc[0][r], a, b0);
            if (num_panels == 2) acc[1][r] = _mm512_dpbusd_epi32(acc[1][r], a, b1);
        }
    }
    /* int8_store_block's epilogue: y = scale * (step * sum + low * rowsum) + bias */
    for (int j = 0; j < num_panels; ++j) {
        const int64_t n0 = (p + j) * I8_PANEL;
        const int cols = n - n0 < I8_PANEL ? (int)(n - n0) : I8_PANEL;
        const __mmask16 keep = (__mmask16)((1u << cols) - 1u);
        const __m512 sc = _mm512_loadu_ps(scale + n0); /* scale and rowsum are padded to whole panels */
        const __m512 rs = _mm512_cvtepi32_ps(_mm512_loadu_si512((const void *)(rowsum + n0)));
        const __m512 ad = bias == NULL ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(keep, bias + n0);
        for (int r = 0; r < rows; ++r) {
            const __m512 a = _mm512_cvtepi32_ps(acc[j][r]);
            const __m512 t = _mm512_fmadd_ps(_mm512_set1_ps(step[r]), a, _mm512_mul_ps(_mm512_set1_ps(low[r]), rs));
            _mm512_mask_storeu_ps(y + r * y_stride + n0, keep, _mm512_fmadd_ps(sc, t, ad));
        }
    }
}

/* Rows row0 .. row0 + m - 1 of panels p .. p + num_panels - 1 (1 or 2) into y, the weights of panels next_p ..
 * next_p + next_num - 1 (the pair the thread likely takes next; next_num 0: none) prefetched meanwhile
 * (prefetch_stream.h) in passes of up to PREFETCH_STREAM_MAX_ROWS rows. Zen 4, the C forward of SmolLM2-135M int8
 * decode steps with and without, alternated step by step in one engine (benchmarks/weight_prefetch.py): 1 row 1.08x
 * faster, 4 rows 1.30-1.33x, 8 rows 1.28-1.30x, 16 rows 1.22x, 64 rows 1.07-1.09x. */
static inline void int8_panel_rows_vnni(float *y, int64_t y_stride, const uint8_t *u, int64_t u_stride,
                                        const float *low, const float *step, const int8_t *panels, const float *scale,
                                        const int32_t *rowsum, const float *bias, int64_t n, int64_t k, int64_t row0,
                                        int64_t m, int64_t p, int64_t num_panels, int64_t next_p,
                                        int64_t next_num) {
    const int64_t kq = int8_quads(k), panel_bytes = kq * I8_PANEL * I8_QUAD;
    int64_t r = row0;
    const int64_t end = row0 + m;
    const int prefetch = next_num > 0 && m <= PREFETCH_STREAM_MAX_ROWS;
    prefetch_stream pf = prefetch_stream_over(prefetch ? panels + next_p * panel_bytes : NULL, next_num * panel_bytes,
                                              (m + VNNI_ROWS - 1) / VNNI_ROWS * ((kq + 7) / 8));
#define TM_VNNI_TILE(rows_, panels_)                                                                              \
    int8_vnni_tile(y + r * y_stride, y_stride, u + r * u_stride, u_stride, low + r, step + r, panels, scale, rowsum, \
                   bias, n, kq, p, rows_, panels_, &pf)
#define TM_VNNI_TILES(panels_)                                               \
    do {                                                                     \
        for (; r + VNNI_ROWS <= end; r += VNNI_ROWS) TM_VNNI_TILE(VNNI_ROWS, panels_); \
        switch (end - r) {                                                   \
            case 7: TM_VNNI_TILE(7, panels_); break;                         \
            case 6: TM_VNNI_TILE(6, panels_); break;                         \
            case 5: TM_VNNI_TILE(5, panels_); break;                         \
            case 4: TM_VNNI_TILE(4, panels_); break;                         \
            case 3: TM_VNNI_TILE(3, panels_); break;                         \
            case 2: TM_VNNI_TILE(2, panels_); break;                         \
            case 1: TM_VNNI_TILE(1, panels_); break;                         \
            default: break;                                                  \
        }                                                                    \
    } while (0)
    if (num_panels == 2)
        TM_VNNI_TILES(2);
    else
        TM_VNNI_TILES(1);
#undef TM_VNNI_TILES
#undef TM_VNNI_TILE
}
#else
#define TM_HAVE_VNNI 0
#endif

#endif
