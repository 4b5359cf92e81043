/* Per-row pieces of a Llama decoder layer, shared by layer_ops.c and step_forward.c. float32, rows
 * contiguous. */
#ifndef TM_ROW_OPS_H
#define TM_ROW_OPS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* dst = src / sqrt(mean(src^2) + eps) * weight over one row of `hidden`; dst may alias src. */
static inline void rms_norm_row(float *dst, const float *src, const float *weight, float eps, int64_t hidden) {
    float sum_sq = 0.0f;
#pragma omp simd reduction(+ : sum_sq)
    for (int64_t i = 0; i < hidden; ++i) sum_sq += src[i] * src[i];
    const float inv_rms = 1.0f / sqrtf(sum_sq / (float)hidden + eps);
#pragma omp simd
    for (int64_t i = 0; i < hidden; ++i) dst[i] = weight[i] * (src[i] * inv_rms);
}

/* dst[j] = silu(gate[j]) * up[j] for j < width. */
static inline void silu_mul_row(float *dst, const float *gate, const float *up, int64_t width) {
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) dst[j] = gate[j] / (1.0f + expf(-gate[j])) * up[j];
}

/* Rotary embedding (neox layout: pairs (i, i + D/2)) of one head: dst = x * cos + rotate_half(x) * sin.
 * dst may alias x. */
static inline void rotate_head(float *dst, const float *x, const float *cos, const float *sin, int64_t head_dim) {
    const int64_t half = head_dim / 2;
    float tmp[half];
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) tmp[i] = x[i] * cos[i] - x[i + half] * sin[i];
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) dst[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
    memcpy(dst, tmp, (size_t)half * sizeof(float));
}

#endif
