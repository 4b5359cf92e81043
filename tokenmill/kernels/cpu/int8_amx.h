/* AMX-INT8 for int8_panels.h's products (int8_gemm.c, step_forward.c): the panels' [kq][16][4] layout is the
 * VNNI order tdpbusd reads (a B tile: 16 quads x 16 channels x 4 bytes), and quantized rows u are A tiles
 * (16 rows x 64 inputs), so 16-row blocks multiply on the tiles, two row blocks x two panels a pass, with
 * the int32 sums exact: bit for bit those of the AVX2 tiles (u8 x s8 products, no int16 step to saturate),
 * and the same epilogue as int8_panel_tile. Rows past the last whole block take the AVX2 tiles.
 * Measured on the AMX Xeon, one thread, against the AVX2 tiles: 64 x 576 x 960 4.0x, 256 x 1536 x 576 7.1x,
 * 2048 x 576 x 3072 4.0x (same outputs).
 * Fewer than 16 rows (decode batches) run as one partial block of that many tile rows, as bf16_panels.h's.
 * Needs k's quads in whole tiles (int8_amx_fits) and the tile configuration loaded (bf16_panels.h's
 * bf16_amx_load_config_rows: 64 bytes per tile row; C 0-3, A 4-5, B 6-7). */
#ifndef TM_INT8_AMX_H
#define TM_INT8_AMX_H

#include "bf16_panels.h"
#include "int8_panels.h"
#include "int8_vnni.h"

#if TM_HAVE_AMX && defined(__AMX_INT8__)
#define TM_HAVE_AMX_INT8 1

static inline int int8_amx_fits(int64_t k) { return int8_quads(k) % 16 == 0; }

/* y rows of acc [rows][16] (int32 sums) for channels of panel p: int8_panel_tile's epilogue. */
static inline void int8_store_block(float *y, int64_t y_stride, const int32_t *acc, const float *low,
                                    const float *step, const float *scale, const int32_t *rowsum, const float *bias,
                                    int64_t n, int64_t p, int rows) {
    const int64_t n0 = p * I8_PANEL;
    const int cols = n - n0 < I8_PANEL ? (int)(n - n0) : I8_PANEL;
    float add[I8_PANEL] = {0};
    if (bias != NULL)
        for (int j = 0; j < cols; ++j) add[j] = bias[n0 + j];
    if (cols == I8_PANEL) {  /* whole panel: the same operations, written out in AVX-512 (the loop below spent
                              * more time than the tiles' products) */
        const __m512 sc = _mm512_loadu_ps(scale + n0), ad = _mm512_loadu_ps(add);
        const __m512 rs = _mm512_cvtepi32_ps(_mm512_loadu_si512(rowsum + n0));
        for (int r = 0; r < rows; ++r) {
            const __m512 a = _mm512_cvtepi32_ps(_mm512_loadu_si512(acc + r * I8_PANEL));
            const __m512 t = _mm512_fmadd_ps(_mm512_set1_ps(step[r]), a, _mm512_mul_ps(_mm512_set1_ps(low[r]), rs));
            _mm512_storeu_ps(y + r * y_stride + n0, _mm512_fmadd_ps(sc, t, ad));
        }
        return;
    }
    for (int r = 0; r < rows; ++r) {
        float out[I8_PANEL];
        for (int j = 0; j < I8_PANEL; ++j)
            out[j] = scale[n0 + j] * (step[r] * (float)acc[r * I8_PANEL + j] + low[r] * (float)rowsum[n0 + j]) + add[j];
        for (int j = 0; j < cols; ++j) y[r * y_stride + n0 + j] = out[j];
    }
}

/* Rows r0 .. r0 + rows - 1 of panel p (acc0) and, when acc1 != NULL, panel p + 1 (acc1) to y. */
static inline void int8_store_pair(float *y, int64_t y_stride, const int32_t *acc0, const int32_t *acc1,
                                   const float *low, const float *step, const float *scale, const int32_t *rowsum,
                                   const float *bias, int64_t n, int64_t p, int64_t r0, int rows) {
    int8_store_block(y + r0 * y_stride, y_stride, acc0, low + r0, step + r0, scale, rowsum, bias, n, p, rows);
    if (acc1 != NULL)
        int8_store_block(y + r0 * y_stride, y_stride, acc1, low + r0, step + r0, scale, rowsum, bias, n, p + 1, rows);
}

/* One block of block_rows (<= 16) rows row0 .. of panels p and (two_panels) p + 1, the tiles configured for
 * block_rows (bf16_amx_load_config_rows): a decode batch's rows, or an odd last 16-row block. */
static inline void int8_panel_block_amx_partial(float *y, int64_t y_stride, const uint8_t *u, int64_t u_stride,
                                                const float *low, const float *step, const int8_t *panels,
                                                const float *scale, const int32_t *rowsum, const float *bias,
                                                int64_t n, int64_t k, int64_t row0, int block_rows, int64_t p,
                                                int two_panels) {
    const int64_t kq = int8_quads(k), panel_bytes = kq * I8_PANEL * I8_QUAD;
    const int8_t *w0 = panels + p * panel_bytes, *w1 = two_panels ? w0 + panel_bytes : w0;
    const uint8_t *x0 = u + row0 * u_stride;
    int32_t acc[2][16 * I8_PANEL];
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t kb = 0; kb < kq * I8_QUAD; kb += 64) {
        _tile_loadd(6, w0 + kb * I8_PANEL, 64);
        _tile_loadd(7, w1 + kb * I8_PANEL, 64);
        _tile_loadd(4, x0 + kb, u_stride);
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
    }
    _tile_stored(0, acc[0], 64);
    _tile_stored(1, acc[1], 64);
    int8_store_pair(y, y_stride, acc[0], two_panels ? acc[1] : NULL, low, step, scale, rowsum, bias, n, p, row0,
                    block_rows);
}

/* Rows row0 .. row0 + 16 * blocks - 1 of panels p and (two_panels) p + 1: two row blocks x two panels a pass. */
static inline void int8_panel_blocks_amx(float *y, int64_t y_stride, const uint8_t *u, int64_t u_stride,
                                         const float *low, const float *step, const int8_t *panels,
                                         const float *scale, const int32_t *rowsum, const float *bias, int64_t n,
                                         int64_t k, int64_t row0, int64_t blocks, int64_t p, int two_panels) {
    const int64_t kq = int8_quads(k), panel_bytes = kq * I8_PANEL * I8_QUAD;
    const int8_t *w0 = panels + p * panel_bytes, *w1 = two_panels ? w0 + panel_bytes : w0;
    int32_t acc[4][16 * I8_PANEL];
    for (int64_t b = 0; b < blocks; b += 2) {
        const int64_t r0 = row0 + 16 * b;
        if (b + 1 == blocks) { /* an odd last block: on its own, not paired with a copy of itself */
            int8_panel_block_amx_partial(y, y_stride, u, u_stride, low, step, panels, scale, rowsum, bias, n, k, r0,
                                         16, p, two_panels);
            break;
        }
        const uint8_t *x0 = u + r0 * u_stride, *x1 = x0 + 16 * u_stride;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t kb = 0; kb < kq * I8_QUAD; kb += 64) {
            _tile_loadd(6, w0 + kb * I8_PANEL, 64);
            _tile_loadd(7, w1 + kb * I8_PANEL, 64);
            /* bf16_panels.h's switch: the activations with the streaming hint, the pair's weights kept in L1 */
            BF16_X_TILE_LOAD(4, x0 + kb, u_stride);
            BF16_X_TILE_LOAD(5, x1 + kb, u_stride);
            _tile_dpbusd(0, 4, 6);
            _tile_dpbusd(1, 4, 7);
            _tile_dpbusd(2, 5, 6);
            _tile_dpbusd(3, 5, 7);
        }
        _tile_stored(0, acc[0], 64);
        _tile_stored(1, acc[1], 64);
        _tile_stored(2, acc[2], 64);
        _tile_stored(3, acc[3], 64);
        int8_store_pair(y, y_stride, acc[0], two_panels ? acc[1] : NULL, low, step, scale, rowsum, bias, n, p, r0, 16);
        int8_store_pair(y, y_stride, acc[2], two_panels ? acc[3] : NULL, low, step, scale, rowsum, bias, n, p, r0 + 16,
                        16);
    }
}
#else
#define TM_HAVE_AMX_INT8 0
static inline int int8_amx_fits(int64_t k) { (void)k; return 0; }
#endif

/* The tile rows an int8 product of m rows and k inputs runs with (bf16_amx_rows; 0 where k's quads do not fill
 * whole tiles or there is no AMX-INT8). */
static inline int int8_amx_rows(int64_t m, int64_t k) {
#if TM_HAVE_AMX_INT8
    return int8_amx_fits(k) ? bf16_amx_rows(m) : 0;
#else
    (void)m, (void)k;
    return 0;
#endif
}

/* How many of np panels the pair after pair q (panels 2q + 2, 2q + 3) has: 0, 1 or 2. */
static inline int64_t next_pair_panels(int64_t np, int64_t q) {
    const int64_t left = np - 2 * q - 2;
    return left <= 0 ? 0 : left < 2 ? left : 2;
}

/* Rows row0 .. row0 + m - 1 of panels p .. p + num - 1 (num 1 or 2) with tiles of amx_rows rows (int8_amx_rows of
 * the whole product; the caller loaded that configuration): 16-row blocks on the tiles, or all m rows as one
 * partial block when amx_rows == m < 16; the rest through the VNNI tiles (int8_vnni.h) where the CPU has them,
 * else int8_panel_rows. next_p, next_num: the panels (next_num 0-2, from next_p) this thread likely takes next,
 * whose weights the VNNI tiles prefetch meanwhile. */
static inline void int8_panel_rows_amx(float *y, int64_t y_stride, const uint8_t *u, int64_t u_stride,
                                       const float *low, const float *step, const int8_t *panels, const float *scale,
                                       const int32_t *rowsum, const float *bias, int64_t n, int64_t k, int64_t row0,
                                       int64_t m, int64_t p, int64_t num, int64_t levels, int amx_rows,
                                       int64_t next_p, int64_t next_num) {
    int64_t done = 0;
#if TM_HAVE_AMX_INT8
    if (amx_rows == 16 && m >= 16) {
        int8_panel_blocks_amx(y, y_stride, u, u_stride, low, step, panels, scale, rowsum, bias, n, k, row0, m / 16, p,
                              num == 2);
        done = m / 16 * 16;
    } else if (amx_rows > 0 && amx_rows < 16 && m == amx_rows) {
        int8_panel_block_amx_partial(y, y_stride, u, u_stride, low, step, panels, scale, rowsum, bias, n, k, row0,
                                     (int)m, p, num == 2);
        done = m;
    }
#else
    (void)amx_rows;
#endif
#if TM_HAVE_VNNI
    if (done < m) {
        (void)levels; /* exact int32 sums at either level */
        int8_panel_rows_vnni(y, y_stride, u, u_stride, low, step, panels, scale, rowsum, bias, n, k, row0 + done,
                             m - done, p, num, next_p, next_num);
        return;
    }
#else
    (void)next_p, (void)next_num;
#endif
    if (done < m)
        for (int64_t q = p; q < p + num; ++q)
            int8_panel_rows(y + (row0 + done) * y_stride, y_stride, u + (row0 + done) * u_stride, u_stride,
                            low + row0 + done, step + row0 + done, panels, scale, rowsum, bias, n, k, m - done, q,
                            levels);
}

#endif
