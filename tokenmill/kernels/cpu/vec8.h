/* The 8-float vector the CPU kernels compute with, and its horizontal sum and maximum. */
#ifndef TM_VEC8_H
#define TM_VEC8_H

/* 8 floats; aligned(4) makes dereferencing an unaligned pointer legal (vmovups on x86). */
typedef float v8 __attribute__((vector_size(32), aligned(4)));
#define LANES 8

static inline float hsum(v8 v) {
    float s = 0.0f;
    for (int i = 0; i < LANES; ++i) s += v[i];
    return s;
}

static inline float hmax(v8 v) {
    float m = v[0];
    for (int i = 1; i < LANES; ++i) m = v[i] > m ? v[i] : m;
    return m;
}

#endif
