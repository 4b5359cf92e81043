/* How the CPU GEMM loops split weight panels over the OpenMP threads. */
#ifndef TM_WORK_SPLIT_H
#define TM_WORK_SPLIT_H

/* Panels a thread takes at a time in the GEMM loops (f32_gemm.c, int8_gemm.c, step_forward.c), scheduled
 * dynamically: on a shared or virtual machine one core often runs slower for a while, and with a static
 * split the other one then waits at the barrier (interleaved A/B of int8 products at 64-2048 rows:
 * dynamic 1.05-1.08x). Four panels keep each grab a long sequential run of weights. */
#define PANELS_PER_GRAB 4

#endif
