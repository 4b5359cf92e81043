/* Per-token activation quantization for the W8A8 products (int8_panels.h), shared by int8_gemm.c and
 * step_forward.c, with an optional block Hadamard rotation:
 *
 *   u[m, k] = round((x[m, k] - low[m]) / step[m]) in [0, L], low = min of the row, step = (max - min) / L
 *
 * so that x ~= low + step * u, each row over its own range; L = 255 (8 bits), or 127 (7 bits: the faster
 * paired tile of int8_panels.h).
 */
#ifndef TM_INT8_QUANTIZE_H
#define TM_INT8_QUANTIZE_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "vec8.h"

/* Row stride (bytes) of the decoder's quantized-activation buffer: a multiple of the panels' quads. */
#define K_ALIGN 32

/* x[0..b) = H x[0..b) with H the orthonormal Sylvester Hadamard matrix of size b (a power of 2), the
 * same matrix as quant/int8_cpu.py's hadamard(b): butterflies (x[j], x[j + h]) <- (a + c, a - c) for
 * h = 1, 2, 4, ..., then the 1/sqrt(b) normalization. For b % 8 == 0 the stages h < 8 run inside 8-float
 * vectors (a + c * (+-1): the same sums, bitwise) and the others between them. */
static void hadamard_block(float *x, int64_t b) {
    if (b % LANES == 0) {
        typedef int32_t i8v __attribute__((vector_size(32)));
        const v8 sign1 = {1, -1, 1, -1, 1, -1, 1, -1}, sign2 = {1, 1, -1, -1, 1, 1, -1, -1};
        const v8 sign4 = {1, 1, 1, 1, -1, -1, -1, -1};
        for (int64_t i = 0; i < b; i += LANES) {
            v8 v = *(v8 *)(x + i);
            v = __builtin_shuffle(v, (i8v){0, 0, 2, 2, 4, 4, 6, 6}) + __builtin_shuffle(v, (i8v){1, 1, 3, 3, 5, 5, 7, 7}) * sign1;
            v = __builtin_shuffle(v, (i8v){0, 1, 0, 1, 4, 5, 4, 5}) + __builtin_shuffle(v, (i8v){2, 3, 2, 3, 6, 7, 6, 7}) * sign2;
            v = __builtin_shuffle(v, (i8v){0, 1, 2, 3, 0, 1, 2, 3}) + __builtin_shuffle(v, (i8v){4, 5, 6, 7, 4, 5, 6, 7}) * sign4;
            *(v8 *)(x + i) = v;
        }
        for (int64_t h = LANES; h < b; h *= 2)
            for (int64_t i = 0; i < b; i += 2 * h)
                for (int64_t j = i; j < i + h; j += LANES) {
                    const v8 a = *(v8 *)(x + j), c = *(v8 *)(x + j + h);
                    *(v8 *)(x + j) = a + c;
                    *(v8 *)(x + j + h) = a - c;
                }
    } else {
        for (int64_t h = 1; h < b; h *= 2)
            for (int64_t i = 0; i < b; i += 2 * h)
                for (int64_t j = i; j < i + h; ++j) {
                    const float a = x[j], c = x[j + h];
                    x[j] = a + c;
                    x[j + h] = a - c;
                }
    }
    const float norm = 1.0f / sqrtf((float)b);
    for (int64_t j = 0; j < b; ++j) x[j] *= norm;
}

/* u[k] = round((x[k] - low) / step) in [0, levels]; returns low, stores step (1 for a constant row, whose u
 * is 0). rotation_block > 0: x is first rotated block by block (hadamard_block) into scratch [k]. */
static float quantize_row(const float *x, int64_t k, int64_t rotation_block, float *scratch, uint8_t *u,
                          float *step_out, int64_t levels) {
    if (rotation_block > 0) {
        for (int64_t i = 0; i < k; ++i) scratch[i] = x[i];
        for (int64_t i = 0; i < k; i += rotation_block) hadamard_block(scratch + i, rotation_block);
        x = scratch;
    }
    float lo = x[0], hi = x[0];
    for (int64_t i = 1; i < k; ++i) {
        lo = x[i] < lo ? x[i] : lo;
        hi = x[i] > hi ? x[i] : hi;
    }
    const float top = (float)levels;
    const float step = hi > lo ? (hi - lo) / top : 1.0f;
    const float inv = 1.0f / step;
    for (int64_t i = 0; i < k; ++i) {
        const float v = (x[i] - lo) * inv + 0.5f;  /* >= 0.5 */
        u[i] = (uint8_t)(v >= top ? (int32_t)levels : (int32_t)v);
    }
    *step_out = step;
    return lo;
}

#endif
