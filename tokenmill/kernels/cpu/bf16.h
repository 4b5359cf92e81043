/* bfloat16 <-> float32 for the kernels that read or write a bf16 model's activations (layer_ops.c).
 * A bf16 value is the top 16 bits of a float32: loading shifts them up (exact); storing rounds to nearest
 * even, as torch's .to(torch.bfloat16) does (NaN stays NaN). Plain integer code that GCC vectorizes. */
#ifndef TM_BF16_H
#define TM_BF16_H

#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline void bf16_row_to_f32(float *dst, const uint16_t *src, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

static inline void f32_row_to_bf16(uint16_t *dst, const float *src, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

#endif
