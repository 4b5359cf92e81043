/* W8A8 products y = x W^T against int8 weights packed in panels of I8_PANEL output channels, on rows
 * already quantized per token (int8_quantize.h's quantize_row: u in [0, 255], x ~= low + step * u):
 *
 *   y[m, c] = scale[c] * (step[m] * sum_i q[c, i] * u[m, i] + low[m] * rowsum[c])  (+ bias[c])
 *
 * Layout: panel p holds channels I8_PANEL * p .. + 15 as [kq][16][4] (kq = ceil(k / 4)): for each quad of
 * input channels, each channel's 4 weights side by side; channels past n and inputs past k are zero.
 * scale and rowsum are padded with zeros to a whole number of panels.
 *
 * Tile: I8_TILE_ROWS rows x one panel. Per quad it loads the panel's two 32-byte vectors (8 channels x
 * 4 inputs each) and broadcasts each row's 4 bytes u[4q .. 4q+3]; vpmaddubsw adds the products of each
 * input pair into an int16, vpmaddwd against ones adds the two pairs into an int32 per channel, vpaddd
 * accumulates: 32 multiply-adds for 3 instructions. Five rows fill the 16 AVX2 registers (10
 * accumulators, 2 weight vectors, the broadcast, the ones and the product); six spill.
 *
 * Exactness: |q[2j]| + |q[2j+1]| <= 128 (quant/int8_cpu.py's pair budget) keeps every vpmaddubsw pair sum
 * within 255 * 128 = 32640: it never saturates, and the int32 sums are exact, so a row's result does not
 * depend on its batch. u's bytes past k may hold anything: their weights are zero.
 *
 * Paired tile (7-bit activations, u <= 127; I8_PAIRED_ROWS rows): the vpmaddubsw results of two consecutive
 * quads are added in int16 before one vpmaddwd, so 64 multiply-adds take 3 multiply-port instructions
 * instead of 4. Each int16 lane then holds two pairs, at most 127 * (128 + 128) = 32512: still exact, the
 * same sums as the plain tile bit for bit. The plain tile runs at the multiply ports' limit (about 2 per
 * cycle on Zen 3), which bounds the paired one at 1.33x; measured ~1.15x in the real kernel.
 */
#ifndef TM_INT8_PANELS_H
#define TM_INT8_PANELS_H

#include <stddef.h>
#include <stdint.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define I8_PANEL 16
#define I8_QUAD 4
#define I8_TILE_ROWS 5
#define I8_PAIRED_ROWS 4 /* rows of the paired tile */

static inline int64_t int8_num_panels(int64_t n) { return (n + I8_PANEL - 1) / I8_PANEL; }
static inline int64_t int8_quads(int64_t k) { return (k + I8_QUAD - 1) / I8_QUAD; }

#if defined(__AVX2__)
/* The paired tile's sums for I8_PAIRED_ROWS rows (u <= 127) over kq quads. The loop over quad pairs is
 * inline assembly with a fixed register plan: ymm0-7 the 8 accumulators (row r: lo in 2r, hi in 2r+1),
 * ymm8 the int16 ones, ymm9 / ymm10 / ymm15 the pair's first three weight vectors (the fourth is a memory
 * operand), ymm11 / ymm12 a row's two broadcast quads, ymm13 / ymm14 products. Written with intrinsics,
 * GCC kept 2-3 accumulators on the stack inside the real kernel, and the store-to-load chain through them
 * cost about what the pairing saved (0.85-1.12x the plain tile; this loop: 1.15-1.2x). Per quad pair and
 * row: 4 vpmaddubsw + 2 vpmaddwd for 128 multiply-adds, against 8 in the plain tile. The byte offsets below
 * assume 16-channel panels of quads (acc rows of 64 bytes). An odd last quad runs alone (intrinsics, on the
 * stored sums). */
_Static_assert(I8_PANEL == 16 && I8_QUAD == 4, "the paired tile's assembly assumes 16 x 4-byte panels");
static inline __attribute__((always_inline)) void int8_tile_sums_paired(const uint8_t *u, int64_t u_stride,
                                                                       const int8_t *panel, int64_t kq,
                                                                       int32_t acc[I8_TILE_ROWS][I8_PANEL]) {
    const uint8_t *u_row = u, *u_row3 = u + 3 * u_stride;
    const int8_t *w = panel;
    int64_t pairs = kq / 2;
    __asm__ volatile(
        "vpxor %%ymm0, %%ymm0, %%ymm0\n\t"
        "vpxor %%ymm1, %%ymm1, %%ymm1\n\t"
        "vpxor %%ymm2, %%ymm2, %%ymm2\n\t"
        "vpxor %%ymm3, %%ymm3, %%ymm3\n\t"
        "vpxor %%ymm4, %%ymm4, %%ymm4\n\t"
        "vpxor %%ymm5, %%ymm5, %%ymm5\n\t"
        "vpxor %%ymm6, %%ymm6, %%ymm6\n\t"
        "vpxor %%ymm7, %%ymm7, %%ymm7\n\t"
        "vpcmpeqw %%ymm8, %%ymm8, %%ymm8\n\t"
        "vpsrlw $15, %%ymm8, %%ymm8\n\t" /* int16 ones */
        "test %[pairs], %[pairs]\n\t"
        "jz 2f\n\t"
        ".p2align 5\n"
        "1:\n\t"
        "vmovdqu (%[w]), %%ymm9\n\t"    /* quad 0, channels 0-7 */
        "vmovdqu 64(%[w]), %%ymm10\n\t" /* quad 1, channels 0-7 */
        "vmovdqu 32(%[w]), %%ymm15\n\t" /* quad 0, channels 8-15; quad 1's are at 96 */
/* One row: its two quads broadcast, lo += madd(maddubs(a0, w0) + maddubs(a1, w1), ones), hi likewise. */
#define TM_PAIRED_ROW(A0, A1, LO, HI)             \
        "vpbroadcastd " A0 ", %%ymm11\n\t"       \
        "vpbroadcastd " A1 ", %%ymm12\n\t"       \
        "vpmaddubsw %%ymm9, %%ymm11, %%ymm13\n\t"   \
        "vpmaddubsw %%ymm10, %%ymm12, %%ymm14\n\t"  \
        "vpaddw %%ymm14, %%ymm13, %%ymm13\n\t"      \
        "vpmaddwd %%ymm8, %%ymm13, %%ymm13\n\t"     \
        "vpaddd %%ymm13, " LO ", " LO "\n\t"        \
        "vpmaddubsw %%ymm15, %%ymm11, %%ymm11\n\t"  \
        "vpmaddubsw 96(%[w]), %%ymm12, %%ymm12\n\t" \
        "vpaddw %%ymm12, %%ymm11, %%ymm11\n\t"      \
        "vpmaddwd %%ymm8, %%ymm11, %%ymm11\n\t"     \
        "vpaddd %%ymm11, " HI ", " HI "\n\t"
        TM_PAIRED_ROW("(%[u])", "4(%[u])", "%%ymm0", "%%ymm1")
        TM_PAIRED_ROW("(%[u],%[stride],1)", "4(%[u],%[stride],1)", "%%ymm2", "%%ymm3")
        TM_PAIRED_ROW("(%[u],%[stride],2)", "4(%[u],%[stride],2)", "%%ymm4", "%%ymm5")
        TM_PAIRED_ROW("(%[u3])", "4(%[u3])", "%%ymm6", "%%ymm7")
#undef TM_PAIRED_ROW
        "add $8, %[u]\n\t"
        "add $8, %[u3]\n\t"
        "sub $-128, %[w]\n\t"
        "dec %[pairs]\n\t"
        "jnz 1b\n"
        "2:\n\t"
        "vmovdqu %%ymm0, (%[acc])\n\t"
        "vmovdqu %%ymm1, 32(%[acc])\n\t"
        "vmovdqu %%ymm2, 64(%[acc])\n\t"
        "vmovdqu %%ymm3, 96(%[acc])\n\t"
        "vmovdqu %%ymm4, 128(%[acc])\n\t"
        "vmovdqu %%ymm5, 160(%[acc])\n\t"
        "vmovdqu %%ymm6, 192(%[acc])\n\t"
        "vmovdqu %%ymm7, 224(%[acc])\n\t"
        : [u] "+r"(u_row), [u3] "+r"(u_row3), [w] "+r"(w), [pairs] "+r"(pairs)
        : [stride] "r"(u_stride), [acc] "r"(&acc[0][0])
        : "cc", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
          "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
    if (kq % 2 != 0) { /* w now points at the last quad's weights */
        const __m256i ones = _mm256_set1_epi16(1);
        const __m256i w_lo = _mm256_loadu_si256((const __m256i *)w);
        const __m256i w_hi = _mm256_loadu_si256((const __m256i *)(w + 32));
        for (int r = 0; r < I8_PAIRED_ROWS; ++r) {
            int32_t quad;
            __builtin_memcpy(&quad, u + r * u_stride + (kq - 1) * I8_QUAD, sizeof(quad));
            const __m256i a = _mm256_set1_epi32(quad);
            __m256i *lo = (__m256i *)acc[r], *hi = (__m256i *)(acc[r] + 8);
            const __m256i add_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(a, w_lo), ones);
            const __m256i add_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(a, w_hi), ones);
            _mm256_storeu_si256(lo, _mm256_add_epi32(_mm256_loadu_si256(lo), add_lo));
            _mm256_storeu_si256(hi, _mm256_add_epi32(_mm256_loadu_si256(hi), add_hi));
        }
    }
}

/* The tile's integer sums, acc[r][j] for channel j of the panel: AVX2 or scalar. paired (a constant once
 * inlined): u <= 127, so tiles of I8_PAIRED_ROWS take the paired tile (remainders the plain one: same sums). */
static inline __attribute__((always_inline)) void int8_tile_sums(const uint8_t *u, int64_t u_stride,
                                                                const int8_t *panel, int64_t kq, int rows,
                                                                int32_t acc[I8_TILE_ROWS][I8_PANEL], int paired) {
    if (paired && rows == I8_PAIRED_ROWS) {
        int8_tile_sums_paired(u, u_stride, panel, kq, acc);
        return;
    }
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i lo[I8_TILE_ROWS], hi[I8_TILE_ROWS];
    for (int r = 0; r < I8_TILE_ROWS; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
    for (int64_t q = 0; q < kq; ++q) {
        const __m256i w_lo = _mm256_loadu_si256((const __m256i *)(panel + q * I8_PANEL * I8_QUAD));
        const __m256i w_hi = _mm256_loadu_si256((const __m256i *)(panel + q * I8_PANEL * I8_QUAD + 32));
        for (int r = 0; r < rows; ++r) {
            int32_t quad;
            __builtin_memcpy(&quad, u + r * u_stride + q * I8_QUAD, sizeof(quad));
            const __m256i a = _mm256_set1_epi32(quad);
            lo[r] = _mm256_add_epi32(lo[r], _mm256_madd_epi16(_mm256_maddubs_epi16(a, w_lo), ones));
            hi[r] = _mm256_add_epi32(hi[r], _mm256_madd_epi16(_mm256_maddubs_epi16(a, w_hi), ones));
        }
    }
    for (int r = 0; r < rows; ++r) {
        _mm256_storeu_si256((__m256i *)acc[r], lo[r]);
        _mm256_storeu_si256((__m256i *)(acc[r] + 8), hi[r]);
    }
}
#else
static inline void int8_tile_sums(const uint8_t *u, int64_t u_stride, const int8_t *panel, int64_t kq, int rows,
                                  int32_t acc[I8_TILE_ROWS][I8_PANEL], int paired) {
    (void)paired; /* exact int32 sums either way */
    for (int r = 0; r < rows; ++r)
        for (int j = 0; j < I8_PANEL; ++j) {
            int32_t s = 0;
            for (int64_t q = 0; q < kq; ++q)
                for (int t = 0; t < I8_QUAD; ++t)
                    s += (int32_t)u[r * u_stride + q * I8_QUAD + t] * panel[(q * I8_PANEL + j) * I8_QUAD + t];
            acc[r][j] = s;
        }
}
#endif

/* rows (1 .. I8_TILE_ROWS, a constant once inlined) x the first cols channels of a panel, dequantized. */
static inline __attribute__((always_inline)) void int8_panel_tile(
    float *y, int64_t y_stride, const uint8_t *u, int64_t u_stride, const float *low, const float *step,
    const int8_t *panel, const float *scale, const int32_t *rowsum, const float *bias, int64_t kq, int rows, int cols,
    int paired) {
    int32_t acc[I8_TILE_ROWS][I8_PANEL];
    int8_tile_sums(u, u_stride, panel, kq, rows, acc, paired);
    float add[I8_PANEL] = {0};
    if (bias != NULL)
        for (int j = 0; j < cols; ++j) add[j] = bias[j];
    for (int r = 0; r < rows; ++r) {
        float out[I8_PANEL];
        for (int j = 0; j < I8_PANEL; ++j) /* whole panel (vectorized): scale and rowsum are padded */
            out[j] = scale[j] * (step[r] * (float)acc[r][j] + low[r] * (float)rowsum[j]) + add[j];
        for (int j = 0; j < cols; ++j) y[r * y_stride + j] = out[j];
    }
}

/* Panel p for quantized rows 0 .. num_rows-1 (u row stride u_stride, low / step per row) into y; paired a
 * constant once inlined. */
static inline __attribute__((always_inline)) void int8_panel_rows_with(
    float *y, int64_t y_stride, const uint8_t *u, int64_t u_stride, const float *low, const float *step,
    const int8_t *panels, const float *scale, const int32_t *rowsum, const float *bias, int64_t n, int64_t k,
    int64_t num_rows, int64_t p, int paired) {
    const int64_t kq = int8_quads(k), n0 = p * I8_PANEL;
    const int cols = n - n0 < I8_PANEL ? (int)(n - n0) : I8_PANEL;
    const int8_t *panel = panels + p * kq * I8_PANEL * I8_QUAD;
    const float *b = bias == NULL ? NULL : bias + n0;
    float *yp = y + n0;
    int64_t r = 0;
#define TM_INT8_TILE(rows_)                                                                                      \
    int8_panel_tile(yp + r * y_stride, y_stride, u + r * u_stride, u_stride, low + r, step + r, panel, scale + n0, \
                    rowsum + n0, b, kq, rows_, cols, paired)
    if (paired)
        for (; r + I8_PAIRED_ROWS <= num_rows; r += I8_PAIRED_ROWS) TM_INT8_TILE(I8_PAIRED_ROWS);
    else
        for (; r + I8_TILE_ROWS <= num_rows; r += I8_TILE_ROWS) TM_INT8_TILE(I8_TILE_ROWS);
    switch (num_rows - r) {
        case 4: TM_INT8_TILE(4); break;
        case 3: TM_INT8_TILE(3); break;
        case 2: TM_INT8_TILE(2); break;
        case 1: TM_INT8_TILE(1); break;
        default: break;
    }
#undef TM_INT8_TILE
}

/* int8_panel_rows_with for rows quantized to `levels` (int8_quantize.h): 127 takes the paired tile. */
static inline void int8_panel_rows(float *y, int64_t y_stride, const uint8_t *u, int64_t u_stride, const float *low,
                                   const float *step, const int8_t *panels, const float *scale, const int32_t *rowsum,
                                   const float *bias, int64_t n, int64_t k, int64_t num_rows, int64_t p,
                                   int64_t levels) {
    if (levels <= 127)
        int8_panel_rows_with(y, y_stride, u, u_stride, low, step, panels, scale, rowsum, bias, n, k, num_rows, p, 1);
    else
        int8_panel_rows_with(y, y_stride, u, u_stride, low, step, panels, scale, rowsum, bias, n, k, num_rows, p, 0);
}

#endif
