/* bfloat16 products against weights packed in 16-channel panels of input pairs, the layout both of the
 * CPU's bf16 units read:
 *
 *   panels [num_panels(n), k_pad / 2, 16, 2] uint16: element (p, kp, j, i) = W[16 p + j, 2 kp + i],
 *   zero past channel n and past input k; k_pad = k rounded up to BF16_K_BLOCK (32).
 *
 * One 64-byte row of a panel (16 channels x one input pair) is what AVX512-BF16's vdpbf16ps multiplies
 * against a broadcast pair of activations, and 16 such rows (32 inputs) are one AMX B tile (16 x 64
 * bytes, the VNNI layout tdpbf16ps reads), so one packing serves:
 *   - bf16_panel_rows_dp: up to BF16_DP_ROWS rows x 16 channels with vdpbf16ps (decode batches, tails);
 *   - bf16_panel_blocks_amx: 16-row blocks through AMX tiles (prompt rows), where the CPU has AMX-BF16 and
 *     the kernel granted this process the tile state (bf16_amx_ready); a product of BF16_AMX_MIN_ROWS to 15
 *     rows (a decode batch) runs as one block of that many tile rows (bf16_amx_rows): the weight tiles then
 *     feed every row at once, where vdpbf16ps issues one instruction per row and 32 inputs;
 *   - a portable loop elsewhere (same products in float32, the compiler's vectors).
 * Activations x are bf16, zero past k, in one of two layouts (x_stride):
 *   - rows [m, x_stride] (x_stride >= k_pad);
 *   - BF16_TILED: AMX tile blocks, 16-row blocks of k_pad / 32 tiles [16 rows][32 inputs], each tile one contiguous
 *     KB (bf16_x_index), where a tile load of rows reads 16 lines 1 KB or more apart. Measured on the AMX Xeon: with
 *     the weights in L1, tile loads from L2 ran the products 1.25-1.85x faster (K = 576 and 1536, 256-704 rows); in
 *     the C forward's prompt steps, 2-4% (256-1024 rows). Products on the tiles start their blocks at multiples of
 *     16 rows, as the kernels here always do.
 * Products accumulate in float32. Results go where a bf16_out says: float32 or bf16 rows (y_bf16), plus an optional
 * float32 bias; the largest value per row (greedy); or, for a fused gate/up projection, silu(gate) * up as bf16 rows
 * (the down projection's input), each pass taking a gate panel and the up panel of the same channels.
 */
#ifndef TM_BF16_PANELS_H
#define TM_BF16_PANELS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "exp2_16.h"
#include "prefetch_stream.h"

#if defined(__AVX512BF16__) || defined(__AMX_BF16__)
#include <immintrin.h>
#endif
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define TM_HAVE_AMX 1
#else
#define TM_HAVE_AMX 0
#endif

#define BF16_PANEL 16
#define BF16_K_BLOCK 32
#define BF16_DP_ROWS 8
/* Fewest rows a product runs on AMX tiles (fewer: vdpbf16ps rows). Measured on the AMX Xeon (SmolLM2-135M bf16
 * decode steps): the C forward's projections took 9.95 ms at 1 row, 11.8 at 2, 16.5 at 5 and 19.0 at 8 through
 * vdpbf16ps rows, 10.9 at 16 rows on the tiles. */
#define BF16_AMX_MIN_ROWS 1

static inline int64_t bf16_num_panels(int64_t n) { return (n + BF16_PANEL - 1) / BF16_PANEL; }
static inline int64_t bf16_k_pad(int64_t k) { return (k + BF16_K_BLOCK - 1) / BF16_K_BLOCK * BF16_K_BLOCK; }

/* x_stride of activations in AMX tile blocks (see the top of this file). */
#define BF16_TILED 0

/* Index of activation (row, col) in x of x_stride (rows, or BF16_TILED blocks of k_pad columns). */
static inline int64_t bf16_x_index(int64_t x_stride, int64_t k_pad, int64_t row, int64_t col) {
    if (x_stride != BF16_TILED) return row * x_stride + col;
    return (row / 16) * 16 * k_pad + col / BF16_K_BLOCK * (16 * BF16_K_BLOCK) + row % 16 * BF16_K_BLOCK +
           col % BF16_K_BLOCK;
}

/* Bytes between the rows of an activation tile in x of x_stride. */
static inline int64_t bf16_tile_stride(int64_t x_stride) {
    return x_stride == BF16_TILED ? BF16_K_BLOCK * 2 : x_stride * 2;
}

/* Row `row` of k float32 values as bf16 activations (zero in columns k .. k_pad - 1) into x of x_stride. */
static inline void bf16_store_x_row(uint16_t *x, int64_t x_stride, int64_t k_pad, int64_t row, const float *src,
                                    int64_t k) {
    for (int64_t c = 0; c < k_pad; c += BF16_K_BLOCK) {
        uint16_t *dst = x + bf16_x_index(x_stride, k_pad, row, c);
        const int64_t width = k - c < BF16_K_BLOCK ? (k > c ? k - c : 0) : BF16_K_BLOCK;
        if (width > 0) f32_row_to_bf16(dst, src + c, width);
        for (int64_t i = width; i < BF16_K_BLOCK; ++i) dst[i] = 0;
    }
}

/* Where a product's float32 sums go. Greedy (best != NULL): each row's largest value (+ bias) and its channel, kept
 * in best / best_id [rows] (the calling thread's own; the lowest channel among equal values, as argmax).
 * Plain (h == NULL): channel block p to y [rows, n] (float32, or bf16 when y_bf16), + bias; with accumulate (float32
 * y only), added to what y holds (y += sums + bias: a residual stream that takes a projection's output). Fused gate/up
 * (h != NULL): the pair's first panel p holds gate channels 16p .. 16p + 15 and its second (p + pair_step) the up
 * channels of the same index; h's (r, 16p + j) (bf16_x_index of h_stride) = bf16(silu(gate) * up).
 * A pair is panels p and p + pair_step (1: adjacent panels; a gate/up weight [gate; up] of I channels each: I / 16).
 * pair_panels (NULL: unused): the pair's weights are not read from the packed panels but from here, its first panel
 * then its second (a caller that builds each pair's panels just before its pass: int4_bf16.h's dequantized ones). */
typedef struct {
    void *y;
    int y_bf16;
    int64_t n;
    const float *bias;
    uint16_t *h;
    int64_t h_stride; /* h's x_stride: rows, or BF16_TILED blocks of h_k_pad columns */
    int64_t h_k_pad;
    int64_t pair_step;
    float *best;
    int64_t *best_id;
    int accumulate; /* plain float32 y: y += sums + bias */
    const uint16_t *pair_panels;
} bf16_out;

static inline bf16_out bf16_plain_out(void *y, int y_bf16, int64_t n, const float *bias) {
    const bf16_out o = {y, y_bf16, n, bias, NULL, 0, 0, 1, NULL, NULL, 0, NULL};
    return o;
}

/* The weights of the pair at panel p that a pass multiplies: its first panel (second 0) or its second (1). */
static inline const uint16_t *bf16_pair_weights(const bf16_out *o, const uint16_t *panels, int64_t k_pad, int64_t p,
                                                int second) {
    const int64_t panel_elems = (k_pad / 2) * 2 * BF16_PANEL;
    if (o->pair_panels != NULL) return o->pair_panels + (second ? panel_elems : 0);
    return panels + (p + (second ? o->pair_step : 0)) * panel_elems;
}

/* acc [rows, 16] of channel block p written to y (row stride n), + bias, only channels < n; accumulate (float32 y):
 * added to y's values, as y + (acc + bias). */
static inline void bf16_store_block(void *y, int y_bf16, int64_t n, int64_t row0, int64_t rows, int64_t p,
                                    const float *acc, int64_t acc_stride, const float *bias, int accumulate) {
    const int64_t c0 = p * BF16_PANEL, width = n - c0 < BF16_PANEL ? n - c0 : BF16_PANEL;
#if defined(__AVX512BF16__)
    if (width == BF16_PANEL) {  /* a whole block: one vector per row (rounding as f32_to_bf16, denormals to 0) */
        const __m512 b = bias != NULL ? _mm512_loadu_ps(bias + c0) : _mm512_setzero_ps();
        for (int64_t r = 0; r < rows; ++r) {
            const __m512 v = _mm512_add_ps(_mm512_loadu_ps(acc + r * acc_stride), b);
            if (y_bf16) {
                _mm256_storeu_si256((__m256i *)((uint16_t *)y + (row0 + r) * n + c0), (__m256i)_mm512_cvtneps_pbh(v));
            } else {
                float *dst = (float *)y + (row0 + r) * n + c0;
                _mm512_storeu_ps(dst, accumulate ? _mm512_add_ps(_mm512_loadu_ps(dst), v) : v);
            }
        }
        return;
    }
#endif
    for (int64_t r = 0; r < rows; ++r) {
        float row[BF16_PANEL];
        for (int64_t j = 0; j < width; ++j) row[j] = acc[r * acc_stride + j] + (bias != NULL ? bias[c0 + j] : 0.0f);
        if (y_bf16) {
            f32_row_to_bf16((uint16_t *)y + (row0 + r) * n + c0, row, width);
            continue;
        }
        float *dst = (float *)y + (row0 + r) * n + c0;
        if (accumulate)
            for (int64_t j = 0; j < width; ++j) dst[j] += row[j];
        else
            memcpy(dst, row, (size_t)width * sizeof(float));
    }
}

/* h rows row0 .. row0 + rows - 1, channels 16p .. 16p + 15 = bf16(silu(gate) * up), gate / up: acc rows of 16;
 * h of h_stride (rows, or BF16_TILED blocks of h_k_pad columns). */
static inline void bf16_store_silu_mul(uint16_t *h, int64_t h_stride, int64_t h_k_pad, int64_t row0, int64_t rows,
                                       int64_t p, const float *gate, const float *up, int64_t acc_stride) {
#if defined(__AVX512BF16__)
    /* 16 channels per vector: silu(g) = g / (1 + 2^(-g log2 e)) with exp2_16 (relative error ~2e-7, below bf16's
     * rounding), one vcvtneps2bf16 per row (rounding as f32_to_bf16, denormals to 0). glibc's vectorized expf
     * ran 8 lanes here and the scalar-shaped bf16 rounding after it: ~10% of a 256-token prompt's forward. */
    const __m512 minus_log2e = _mm512_set1_ps(-1.4426950408889634f), one = _mm512_set1_ps(1.0f);
    for (int64_t r = 0; r < rows; ++r) {
        const __m512 g = _mm512_loadu_ps(gate + r * acc_stride), u = _mm512_loadu_ps(up + r * acc_stride);
        const __m512 e = exp2_16(_mm512_mul_ps(g, minus_log2e));
        const __m512 v = _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), u);
        _mm256_storeu_si256((__m256i *)(h + bf16_x_index(h_stride, h_k_pad, row0 + r, p * BF16_PANEL)),
                            (__m256i)_mm512_cvtneps_pbh(v));
    }
#else
    for (int64_t r = 0; r < rows; ++r) {
        float v[BF16_PANEL];
        const float *g = gate + r * acc_stride, *u = up + r * acc_stride;
#pragma omp simd
        for (int j = 0; j < BF16_PANEL; ++j) v[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
        f32_row_to_bf16(h + bf16_x_index(h_stride, h_k_pad, row0 + r, p * BF16_PANEL), v, BF16_PANEL);
    }
#endif
}

/* 1 when value v at channel c replaces the running (best, id): larger, or equal at a lower channel; a NaN wins
 * over numbers (torch's max keeps NaN). */
static inline int bf16_beats(float v, int64_t c, float best, int64_t id) {
    if (v != v) return best == best || c < id;
    return v > best || (v == best && c < id);
}

/* The running argmax of rows row0 .. + rows - 1 over channel block p's sums acc [rows, 16] (+ bias), channels < n. */
static inline void bf16_argmax_block(float *best, int64_t *best_id, int64_t n, int64_t row0, int64_t rows, int64_t p,
                                     const float *acc, int64_t acc_stride, const float *bias) {
    const int64_t c0 = p * BF16_PANEL, width = n - c0 < BF16_PANEL ? n - c0 : BF16_PANEL;
    for (int64_t r = 0; r < rows; ++r) {
        float b = best[row0 + r];
        int64_t id = best_id[row0 + r];
#if defined(__AVX512F__)
        { /* the block's largest value first: most blocks hold nothing that beats the row's running best */
            const __mmask16 live = (__mmask16)((1u << width) - 1u);
            __m512 v = _mm512_maskz_loadu_ps(live, acc + r * acc_stride);
            if (bias != NULL) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(live, bias + c0));
            const __mmask16 nan = _mm512_mask_cmp_ps_mask(live, v, v, _CMP_UNORD_Q);
            const float top = _mm512_mask_reduce_max_ps(live, v);
            if (nan == 0 && top < b) continue;
        }
#endif
        for (int64_t j = 0; j < width; ++j) {
            const float v = acc[r * acc_stride + j] + (bias != NULL ? bias[c0 + j] : 0.0f);
            if (bf16_beats(v, c0 + j, b, id)) b = v, id = c0 + j;
        }
        best[row0 + r] = b, best_id[row0 + r] = id;
    }
}

/* The sums of rows row0 .. + rows - 1 for the pair starting at panel p: acc0 (panel p) and, when acc1 != NULL,
 * acc1 (panel p + o->pair_step), rows acc_stride floats apart. */
static inline void bf16_emit(const bf16_out *o, int64_t row0, int64_t rows, int64_t p, const float *acc0,
                             const float *acc1, int64_t acc_stride) {
    if (o->best != NULL) {
        bf16_argmax_block(o->best, o->best_id, o->n, row0, rows, p, acc0, acc_stride, o->bias);
        if (acc1 != NULL)
            bf16_argmax_block(o->best, o->best_id, o->n, row0, rows, p + o->pair_step, acc1, acc_stride, o->bias);
        return;
    }
    if (o->h != NULL) {
        bf16_store_silu_mul(o->h, o->h_stride, o->h_k_pad, row0, rows, p, acc0, acc1, acc_stride);
        return;
    }
    bf16_store_block(o->y, o->y_bf16, o->n, row0, rows, p, acc0, acc_stride, o->bias, o->accumulate);
    if (acc1 != NULL)
        bf16_store_block(o->y, o->y_bf16, o->n, row0, rows, p + o->pair_step, acc1, acc_stride, o->bias, o->accumulate);
}

/* A pass's sums on the AMX path waiting to be written (deferred emit): a pass stores its tiles here only after
 * issuing the next pass's tile products, and writes the previous pass's sums (bf16_flush) while the tile unit runs
 * them, so that the vector work of bf16_emit (bias, conversion, silu, argmax) overlaps the products instead of
 * following them. Measured on the AMX Xeon (K = 576, N = 3072, 2 threads): 2.1 -> 2.75 TF/s at 2048 rows.
 * Each thread keeps one (zeroed: nothing pending) and calls bf16_flush before the barrier that publishes its
 * outputs. Emits of different passes write disjoint outputs (argmax: order-free), so deferring reorders nothing. */
typedef struct {
    float acc[4][16 * BF16_PANEL]; /* per row block i: acc[2i] (panel p), acc[2i + 1] (the pair's second panel) */
    const bf16_out *o;
    int64_t row0, rows, p;         /* rows: of each block (16 when blocks == 2) */
    int blocks;                    /* 0: nothing pending; row block i starts at row0 + 16 i */
    int two_panels;
} __attribute__((aligned(64))) bf16_pending;

static inline void bf16_flush(bf16_pending *pd) {
    for (int i = 0; i < pd->blocks; ++i)
        bf16_emit(pd->o, pd->row0 + 16 * i, pd->rows, pd->p, pd->acc[2 * i], pd->two_panels ? pd->acc[2 * i + 1] : NULL,
                  BF16_PANEL);
    pd->blocks = 0;
}

#if !defined(__AVX512BF16__)
/* acc [rows, 16] = rows row0 .. row0 + rows - 1 (rows <= BF16_DP_ROWS) of the channel block whose panel is w over
 * the first k_len inputs: the portable loop (CPUs without AVX512-BF16; bf16_rows_dp2 below elsewhere). */
static inline void bf16_rows_dp(float *acc, const uint16_t *x, int64_t x_stride, const uint16_t *w,
                                int64_t k_pad, int64_t k_len, int64_t row0, int64_t rows) {
    memset(acc, 0, (size_t)rows * BF16_PANEL * sizeof(float));
    for (int64_t kp = 0; kp < k_len / 2; ++kp) {
        const uint16_t *wk = w + kp * 2 * BF16_PANEL;
        float w0[BF16_PANEL], w1[BF16_PANEL];
        for (int j = 0; j < BF16_PANEL; ++j) {
            w0[j] = bf16_to_f32(wk[2 * j]);
            w1[j] = bf16_to_f32(wk[2 * j + 1]);
        }
        for (int64_t r = 0; r < rows; ++r) {
            const int64_t i = bf16_x_index(x_stride, k_pad, row0 + r, 2 * kp);
            const float x0 = bf16_to_f32(x[i]), x1 = bf16_to_f32(x[i + 1]);
#pragma omp simd
            for (int j = 0; j < BF16_PANEL; ++j) acc[r * BF16_PANEL + j] += x0 * w0[j] + x1 * w1[j];
        }
    }
}
#endif

#if TM_HAVE_AMX || defined(__AVX512BF16__)
/* Software prefetch of the next pair's weights (into L2) spread over a pass's k steps: AMX tile loads that miss
 * to memory stall the tile unit one after another, and the hardware prefetcher starts late on each new pair; the
 * vdpbf16ps rows likewise from BF16_DP_PREFETCH_MIN_ROWS rows (bf16_panel_rows_dp). */
typedef struct {
    prefetch_stream first, second; /* the next pair's two panels (second empty: one panel), stepped together */
} bf16_prefetch;

/* The prefetch of the pair at panel next_p (-1: none) over `steps` steps: panel next_p and, where the weight has it
 * (o->n's panels), next_p + o->pair_step. */
static inline bf16_prefetch bf16_prefetch_pair(const bf16_out *o, const uint16_t *panels, int64_t k_pad,
                                               int64_t next_p, int64_t steps) {
    const int64_t panel_elems = (k_pad / 2) * 2 * BF16_PANEL, bytes = panel_elems * 2;
    /* pair_panels: built per pass, in cache */
    const uint16_t *w0 = next_p < 0 || o->pair_panels != NULL ? NULL : panels + next_p * panel_elems;
    const int two_panels = next_p + o->pair_step < bf16_num_panels(o->n);
    const uint16_t *w1 = w0 != NULL && two_panels ? w0 + o->pair_step * panel_elems : NULL;
    bf16_prefetch pf = {prefetch_stream_over(w0, bytes, steps), prefetch_stream_over(w1, bytes, steps)};
    return pf;
}

static inline void bf16_prefetch_step(bf16_prefetch *pf) {
    prefetch_stream_step(&pf->first);
    prefetch_stream_step(&pf->second);
}
#endif

#if TM_HAVE_AMX
/* The AMX tile configuration (64 bytes, palette 1) every thread loads before its tiles: tiles 0-3 hold four
 * 16 x 16 float32 accumulators (2 row blocks x 2 channel blocks), 4-5 two 16-row x 32-input activation
 * blocks, 6-7 two weight blocks (16 input pairs x 16 channels). */
typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} bf16_tile_config;

/* block_rows (1..16): the rows of the accumulator and activation tiles (0-5); the weight tiles keep 16. */
static inline void bf16_amx_load_config_rows(int block_rows) {
    bf16_tile_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.rows[t] = (uint8_t)(t < 6 ? block_rows : 16);
        cfg.colsb[t] = 64;
    }
    /* GCC 12 does not see _tile_loadconfig read cfg and may drop the stores above when block_rows is a
     * constant (then ldtilecfg faults on an all-zero configuration): this barrier keeps them. */
    __asm__ __volatile__("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
}

static inline void bf16_amx_load_config(void) { bf16_amx_load_config_rows(16); }

/* One block of block_rows (<= 16) rows row0 .. of the pair at panel p (both panels when two_panels), with tiles
 * configured for block_rows (bf16_amx_load_config_rows), or for 16 rows when x holds 16 readable rows from row0
 * (the results of the rows past block_rows are dropped). */
static inline void bf16_panel_block_amx_partial(const bf16_out *o, const uint16_t *x, int64_t x_stride,
                                                const uint16_t *panels, int64_t k_pad, int64_t k_len, int64_t row0,
                                                int64_t block_rows, int64_t p, int two_panels, int64_t next_p,
                                                bf16_pending *pd) {
    bf16_prefetch pf = bf16_prefetch_pair(o, panels, k_pad, next_p, k_len / BF16_K_BLOCK);
    const uint16_t *w0 = bf16_pair_weights(o, panels, k_pad, p, 0);
    const uint16_t *w1 = two_panels ? bf16_pair_weights(o, panels, k_pad, p, 1) : w0;
    const int64_t xs = bf16_tile_stride(x_stride); /* bytes */
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t kb = 0; kb < k_len; kb += BF16_K_BLOCK) {
        bf16_prefetch_step(&pf);
        _tile_loadd(6, w0 + kb * BF16_PANEL, 64);
        _tile_loadd(7, w1 + kb * BF16_PANEL, 64);
        _tile_loadd(4, x + bf16_x_index(x_stride, k_pad, row0, kb), xs);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
    }
    bf16_flush(pd); /* while the tiles compute */
    _tile_stored(0, pd->acc[0], 64);
    _tile_stored(1, pd->acc[1], 64);
    pd->o = o, pd->row0 = row0, pd->rows = block_rows, pd->p = p, pd->blocks = 1, pd->two_panels = two_panels;
}

/* How bf16_panel_blocks_amx (and int8_amx.h's int8_panel_blocks_amx) loads its activation tiles. The pair's weight
 * tiles are read again by every pass over the chunk's row blocks and the activation tiles once per pass: loaded
 * with the streaming hint (tileloaddt1) the activations pass through without evicting the pair's weights from L1,
 * so each k step reads two tiles from L2 instead of four. Measured on the AMX Xeon (benchmarks/kernel_build_ab.py
 * --variant-cflags=-DBF16_STREAM_X_TILES=0 --rows 1,64 --rounds 6): the C forward of 2048-row prompt steps 346 ->
 * 326 ms, of 64-row decode steps 33.3 -> 32.5 ms, 1 row unchanged. The int8 passes, measured with a switch of their
 * own then (--quantization int8, 6 rounds, twice): prompt steps 370 -> 363 and 356 -> 350 ms, 64-row decode within
 * noise. BF16_STREAM_X_TILES=0: plain loads (tileloadd) in both. */
#ifndef BF16_STREAM_X_TILES
#define BF16_STREAM_X_TILES 1
#endif
#if BF16_STREAM_X_TILES
#define BF16_X_TILE_LOAD(tile, src, stride) _tile_stream_loadd(tile, src, stride)
#else
#define BF16_X_TILE_LOAD(tile, src, stride) _tile_loadd(tile, src, stride)
#endif

/* Rows row0 .. row0 + 16 * blocks - 1 of the pair at panel p (both panels when two_panels): each pass takes two
 * 16-row blocks and both panels, so every activation tile feeds two products and every weight tile two. */
static inline void bf16_panel_blocks_amx(const bf16_out *o, const uint16_t *x, int64_t x_stride,
                                         const uint16_t *panels, int64_t k_pad, int64_t k_len, int64_t row0,
                                         int64_t blocks, int64_t p, int two_panels, int64_t next_p, bf16_pending *pd) {
    bf16_prefetch pf = bf16_prefetch_pair(o, panels, k_pad, next_p, blocks / 2 * (k_len / BF16_K_BLOCK));
    const uint16_t *w0 = bf16_pair_weights(o, panels, k_pad, p, 0);
    const uint16_t *w1 = two_panels ? bf16_pair_weights(o, panels, k_pad, p, 1) : w0;
    const int64_t xs = bf16_tile_stride(x_stride); /* bytes */
    for (int64_t b = 0; b < blocks; b += 2) {
        if (b + 1 == blocks) { /* an odd last block: on its own, not paired with a copy of itself */
            bf16_panel_block_amx_partial(o, x, x_stride, panels, k_pad, k_len, row0 + 16 * b, 16, p, two_panels,
                                         pf.first.offset < pf.first.bytes ? next_p : -1, pd);
            break;
        }
        const uint16_t *x0 = x + bf16_x_index(x_stride, k_pad, row0 + 16 * b, 0);
        const uint16_t *x1 = x + bf16_x_index(x_stride, k_pad, row0 + 16 * b + 16, 0);
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t kb = 0; kb < k_len; kb += BF16_K_BLOCK) {
            bf16_prefetch_step(&pf);
            _tile_loadd(6, w0 + kb * BF16_PANEL, 64);
            _tile_loadd(7, w1 + kb * BF16_PANEL, 64);
            BF16_X_TILE_LOAD(4, x0 + bf16_x_index(x_stride, k_pad, 0, kb), xs);
            BF16_X_TILE_LOAD(5, x1 + bf16_x_index(x_stride, k_pad, 0, kb), xs);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
        }
        bf16_flush(pd); /* while the tiles compute */
        _tile_stored(0, pd->acc[0], 64);
        _tile_stored(1, pd->acc[1], 64);
        _tile_stored(2, pd->acc[2], 64);
        _tile_stored(3, pd->acc[3], 64);
        pd->o = o, pd->row0 = row0 + 16 * b, pd->rows = 16, pd->p = p, pd->blocks = 2, pd->two_panels = two_panels;
    }
}
#endif

/* 1 when this process may use AMX tiles here: built with AMX-BF16 and the kernel granted the tile state
 * (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, once per process; torch asks the same for oneDNN). */
static inline int bf16_amx_ready(void) {
#if TM_HAVE_AMX
    static int state = -1;
    if (state < 0) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return state;
#else
    return 0;
#endif
}

/* The tile rows a product of m rows runs with: 16 (blocks of 16 rows, the rest vdpbf16ps rows) from 16 rows, m
 * itself from BF16_AMX_MIN_ROWS (one partial block), 0 below that or without AMX (vdpbf16ps or portable rows).
 * Every thread that multiplies loads bf16_amx_load_config_rows(this) first when it is not 0. */
static inline int bf16_amx_rows(int64_t m) {
    if (!bf16_amx_ready() || m < BF16_AMX_MIN_ROWS) return 0;
    return m >= 16 ? 16 : (int)m;
}

#if defined(__AVX512BF16__)
/* acc0 / acc1 [rows, 16] = rows row0 .. row0 + rows - 1 (rows <= BF16_DP_ROWS, a constant once inlined) of the
 * channel blocks whose panels are w0 and (two_panels, a constant) w1: one weight load per panel and one broadcast per
 * row feed every vdpbf16ps of an input pair, the accumulators held in registers (a one-panel tile with a variable row
 * count, before, loaded each row's pair twice and kept its sums in memory: 1.6-1.7x slower on the Zen 4). pf: the
 * pass's prefetch of the next pair (bf16_prefetch), a step per 32-input block. */
static inline __attribute__((always_inline)) void bf16_rows_dp2(float *acc0, float *acc1, const uint16_t *x,
                                                               int64_t x_stride, const uint16_t *w0,
                                                               const uint16_t *w1, int64_t k_pad, int64_t k_len,
                                                               int64_t row0, int rows, int two_panels,
                                                               bf16_prefetch *pf) {
    __m512 a0[BF16_DP_ROWS], a1[BF16_DP_ROWS];
    for (int r = 0; r < rows; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
    for (int64_t kb = 0; kb < k_len; kb += BF16_K_BLOCK) {
        const uint16_t *xr[BF16_DP_ROWS]; /* each row's 32 inputs of this block are contiguous in both layouts */
        for (int r = 0; r < rows; ++r) xr[r] = x + bf16_x_index(x_stride, k_pad, row0 + r, kb);
        bf16_prefetch_step(pf);
        for (int64_t i = 0; i < BF16_K_BLOCK / 2; ++i) {
            const int64_t kp = kb / 2 + i;
            const __m512bh b0 = (__m512bh)_mm512_loadu_si512((const void *)(w0 + kp * 2 * BF16_PANEL));
            const __m512bh b1 =
                two_panels ? (__m512bh)_mm512_loadu_si512((const void *)(w1 + kp * 2 * BF16_PANEL)) : b0;
            for (int r = 0; r < rows; ++r) {
                int32_t pair;
                memcpy(&pair, xr[r] + 2 * i, sizeof(pair));
                const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
                a0[r] = _mm512_dpbf16_ps(a0[r], a, b0);
                if (two_panels) a1[r] = _mm512_dpbf16_ps(a1[r], a, b1);
            }
        }
    }
    for (int r = 0; r < rows; ++r) {
        _mm512_storeu_ps(acc0 + r * BF16_PANEL, a0[r]);
        if (two_panels) _mm512_storeu_ps(acc1 + r * BF16_PANEL, a1[r]);
    }
}

/* Passes of vdpbf16ps rows over at least this many rows (and at most PREFETCH_STREAM_MAX_ROWS) prefetch the next
 * pair's weights (bf16_prefetch) while they compute; fewer do not. Zen 4 (AVX512-BF16, no AMX), the C forward of
 * SmolLM2-135M bf16 decode steps with and without, alternated step by step in one engine
 * (benchmarks/weight_prefetch.py, two runs; below 5 rows with a build of -DBF16_DP_PREFETCH_MIN_ROWS=1): 5 rows
 * 1.02-1.24x faster, 6 rows 1.05-1.17x, 7 rows 1.21x, 8 rows 1.09-1.11x, 16 rows 1.16x, 64 rows 1.02-1.04x (from 5
 * rows a tile computes long enough per pair for the next pair's first lines to miss to memory when only the hardware
 * prefetchers fetch them); 4 rows 0.97-1.05x, 2 rows 0.93x, 1 row 0.89-0.91x (bound by streaming the weights, which
 * the hardware prefetchers do best alone). */
#ifndef BF16_DP_PREFETCH_MIN_ROWS
#define BF16_DP_PREFETCH_MIN_ROWS 5
#endif

/* Rows row0 .. row0 + m - 1 of panels p and (num 2) p + o->pair_step, BF16_DP_ROWS at a time (bf16_rows_dp2), the
 * weights of the pair at next_p (-1: none) prefetched meanwhile at BF16_DP_PREFETCH_MIN_ROWS to
 * PREFETCH_STREAM_MAX_ROWS rows. */
static inline void bf16_panel_rows_dp(const bf16_out *o, const uint16_t *x, int64_t x_stride, const uint16_t *panels,
                                      int64_t k_pad, int64_t k_len, int64_t row0, int64_t m, int64_t p, int64_t num,
                                      int64_t next_p) {
    _Static_assert(BF16_DP_ROWS == 8, "the switch below covers 1 .. 8 rows");
    const uint16_t *w0 = bf16_pair_weights(o, panels, k_pad, p, 0), *w1 = bf16_pair_weights(o, panels, k_pad, p, 1);
    float acc[2][BF16_DP_ROWS * BF16_PANEL];
    const int prefetch = m >= BF16_DP_PREFETCH_MIN_ROWS && m <= PREFETCH_STREAM_MAX_ROWS;
    bf16_prefetch pf = bf16_prefetch_pair(o, panels, k_pad, prefetch ? next_p : -1,
                                          (m + BF16_DP_ROWS - 1) / BF16_DP_ROWS * (k_len / BF16_K_BLOCK));
    for (int64_t r = 0; r < m; r += BF16_DP_ROWS) {
        const int64_t rows = m - r < BF16_DP_ROWS ? m - r : BF16_DP_ROWS;
#define TM_DP2(rows_, two_) \
    bf16_rows_dp2(acc[0], acc[1], x, x_stride, w0, w1, k_pad, k_len, row0 + r, rows_, two_, &pf)
#define TM_DP2_ROWS(two_)                   \
    switch (rows) {                         \
        case 8: TM_DP2(8, two_); break;     \
        case 7: TM_DP2(7, two_); break;     \
        case 6: TM_DP2(6, two_); break;     \
        case 5: TM_DP2(5, two_); break;     \
        case 4: TM_DP2(4, two_); break;     \
        case 3: TM_DP2(3, two_); break;     \
        case 2: TM_DP2(2, two_); break;     \
        default: TM_DP2(1, two_); break;    \
    }
        if (num == 2) {
            TM_DP2_ROWS(1)
        } else {
            TM_DP2_ROWS(0)
        }
#undef TM_DP2_ROWS
#undef TM_DP2
        bf16_emit(o, row0 + r, rows, p, acc[0], num == 2 ? acc[1] : NULL, BF16_PANEL);
    }
}
#endif

/* Rows row0 .. row0 + m - 1 of the pair at panel p (num 2: panels p and p + o->pair_step; 1: p alone) with tiles of
 * amx_rows rows (bf16_amx_rows of the whole product; the thread loaded that configuration): 16-row blocks through
 * AMX and the rest BF16_DP_ROWS at a time, or all m rows as one partial block when amx_rows == m < 16. rows_padded:
 * x is readable up to the next whole 16-row block (whatever those rows hold: only the first rows' results are
 * kept), so the last m % 16 rows run as one more 16-row block on the tiles instead of vdpbf16ps rows (at 14 rows
 * those cost as much as ~128 rows on the tiles). next_p: the first panel of the pair this thread likely takes next
 * (its weights are prefetched on the AMX path), or -1. pd: the thread's deferred emit (bf16_pending), which may
 * still hold the last AMX pass's sums on return: the caller flushes it before anyone reads the outputs. k_len
 * (a multiple of BF16_K_BLOCK, at most k_pad, the panels' and x's padded width): the products take the first k_len
 * inputs only (the rest are known zero in these rows: a tensor-parallel rank's o_proj, step_forward.c). */
static inline void bf16_panel_rows(const bf16_out *o, const uint16_t *x, int64_t x_stride, const uint16_t *panels,
                                   int64_t k_pad, int64_t k_len, int64_t row0, int64_t m, int64_t p, int64_t num,
                                   int amx_rows, int64_t next_p, int rows_padded, bf16_pending *pd) {
    int64_t done = 0;
#if TM_HAVE_AMX
    if (amx_rows == 16 && (m >= 16 || rows_padded)) {
        if (m >= 16)
            bf16_panel_blocks_amx(o, x, x_stride, panels, k_pad, k_len, row0, m / 16, p, num == 2, next_p, pd);
        done = m / 16 * 16;
        if (rows_padded && done < m) { /* a 16-row block of which the first m - done rows are kept */
            bf16_panel_block_amx_partial(o, x, x_stride, panels, k_pad, k_len, row0 + done, m - done, p, num == 2,
                                         next_p, pd);
            done = m;
        }
    } else if (amx_rows > 0 && amx_rows < 16 && m == amx_rows) {
        bf16_panel_block_amx_partial(o, x, x_stride, panels, k_pad, k_len, row0, m, p, num == 2, next_p, pd);
        done = m;
    }
#else
    (void)amx_rows, (void)rows_padded, (void)pd;
#endif
#if defined(__AVX512BF16__)
    if (done < m) bf16_panel_rows_dp(o, x, x_stride, panels, k_pad, k_len, row0 + done, m - done, p, num, next_p);
#else
    for (int64_t r = done; r < m; r += BF16_DP_ROWS) {
        const int64_t rows = m - r < BF16_DP_ROWS ? m - r : BF16_DP_ROWS;
        float acc[2][BF16_DP_ROWS * BF16_PANEL];
        bf16_rows_dp(acc[0], x, x_stride, bf16_pair_weights(o, panels, k_pad, p, 0), k_pad, k_len, row0 + r, rows);
        if (num == 2)
            bf16_rows_dp(acc[1], x, x_stride, bf16_pair_weights(o, panels, k_pad, p, 1), k_pad, k_len, row0 + r, rows);
        bf16_emit(o, row0 + r, rows, p, acc[0], num == 2 ? acc[1] : NULL, BF16_PANEL);
    }
#endif
}

#endif
