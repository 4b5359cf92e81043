/* 2^x for 16 floats at a time (AVX-512), for the softmax of the attention kernels (attention_tile.h,
 * bf16_attention_amx.h) and the fused MLP's silu (bf16_panels.h). */
#ifndef TM_EXP2_16_H
#define TM_EXP2_16_H

#if defined(__AVX512F__)
#include <immintrin.h>

/* 2^x per lane: 2^n 2^f with n = round(x), |f| <= 1/2, 2^f by a degree-5 polynomial (relative error ~2e-7), scaled
 * by vscalefps; below -126 gives 0, past 127 +inf (the softmax passes x <= 0: scores in base-2 units minus their row
 * maximum; silu any x, where 1 / (1 + inf) = 0 is its limit). */
static inline __m512 exp2_16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-126.0f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.3333558146e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108665e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650696e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718056e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

#endif
