/* The shared-memory all-reduce of the tensor-parallel ranks on one machine (shm_all_reduce.c exports it to Python;
 * step_forward.c calls it between a layer's row-parallel projection and its residual add). */
#ifndef TM_SHM_ALL_REDUCE_H
#define TM_SHM_ALL_REDUCE_H

#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define CONTROL_LINE 64

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

static inline double shm_now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Bytes of the segment for world ranks and capacity floats per slot. */
static inline int64_t shm_segment_bytes(int world, int64_t capacity) {
    return (int64_t)world * CONTROL_LINE + 2 * (int64_t)world * capacity * (int64_t)sizeof(float);
}

/* Buffer reuse: call seq writes buffer set seq % 2, which call seq - 2 read. A rank that has published seq - 1 has
 * finished call seq - 2 (its reads included: calls run in order on each rank), so every call that writes first waits
 * until all ranks have published seq - 1 (marked shm_reuse_ok below; after an all-reduce or all-gather this already
 * holds, after a broadcast, whose readers do not wait for each other, it may take a moment). */

/* Whether process pid has ended: gone (ESRCH), or a zombie no one has reaped yet. A rank the engine spawned is its
 * child, and the engine's thread that would reap it may be the one waiting here: kill(pid, 0) succeeds on a zombie,
 * so /proc tells (state Z or X; without /proc: not known to have ended). */
static inline int shm_rank_ended(pid_t pid) {
    if (kill(pid, 0) != 0) return errno == ESRCH;
    char path[48], stat[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (f == NULL) return errno == ENOENT && kill(pid, 0) != 0;
    const size_t n = fread(stat, 1, sizeof stat - 1, f);
    fclose(f);
    stat[n] = '\0';
    const char *end = strrchr(stat, ')'); /* the command name may hold spaces and parentheses */
    return end != NULL && end[1] == ' ' && (end[2] == 'Z' || end[2] == 'X');
}

/* Waits until each rank in [first, last) has published at least seq. Returns 0; 2 past timeout_s; 3 when a waited-for
 * rank's process has ended (shm_rank_ended: checked about every thousand yields). */
static int shm_wait(const char *segment, int first, int last, uint64_t seq, double timeout_s) {
    double deadline = 0.0;
    for (int r = first; r < last; ++r) {
        const uint64_t *line = (const uint64_t *)(segment + r * CONTROL_LINE);
        for (int64_t spins = 0; __atomic_load_n(line, __ATOMIC_ACQUIRE) < seq; ++spins) {
            if (spins < 4096) {
                CPU_RELAX();
                continue;
            }
            sched_yield(); /* a rank that shares a core with this one gets it */
            if (spins % 1024 == 0) {
                const double t = shm_now_s();
                if (deadline == 0.0) deadline = t + timeout_s;
                else if (t > deadline) return 2;
                const int64_t pid = *(const volatile int64_t *)(segment + r * CONTROL_LINE + 8);
                if (pid > 0 && shm_rank_ended((pid_t)pid)) return 3; /* that rank is gone */
            }
        }
    }
    return 0;
}

static inline void shm_publish(char *segment, int rank, uint64_t seq) {
    __atomic_store_n((uint64_t *)(segment + rank * CONTROL_LINE), seq, __ATOMIC_RELEASE);
}

/* Slot `rank` of the buffer set call seq uses. */
static inline float *shm_slot(char *segment, int world, int64_t capacity, uint64_t seq, int rank) {
    return (float *)(segment + (int64_t)world * CONTROL_LINE) + ((int64_t)(seq % 2) * world + rank) * capacity;
}

/* Returns 0; 1 when n > capacity (nothing done); 2 when some rank did not arrive within timeout_s, 3 when a rank's
 * process is gone (x unchanged). */
static int shm_all_reduce(char *segment, int rank, int world, int64_t capacity, float *x, int64_t n, uint64_t seq,
                          double timeout_s) {
    if (n > capacity) return 1;
    if (world < 2) return 0;
    int code = shm_wait(segment, 0, world, seq - 1, timeout_s); /* shm_reuse_ok */
    if (code != 0) return code;
    memcpy(shm_slot(segment, world, capacity, seq, rank), x, (size_t)n * sizeof(float));
    shm_publish(segment, rank, seq);
    if ((code = shm_wait(segment, 0, world, seq, timeout_s)) != 0) return code;
    /* x = ((slot 0 + slot 1) + slot 2) + ...: one pass per slot, each a plain vectorized loop; the same order of
     * additions on every rank. */
    const float *first = shm_slot(segment, world, capacity, seq, 0), *second = first + capacity;
    for (int64_t i = 0; i < n; ++i) x[i] = first[i] + second[i];
    for (int r = 2; r < world; ++r) {
        const float *slot = first + (int64_t)r * capacity;
        for (int64_t i = 0; i < n; ++i) x[i] += slot[i];
    }
    return 0;
}

/* out[r * n .. (r + 1) * n) = rank r's x, on every rank. Returns as shm_all_reduce. */
static int shm_all_gather(char *segment, int rank, int world, int64_t capacity, const float *x, int64_t n, float *out,
                          uint64_t seq, double timeout_s) {
    if (n > capacity) return 1;
    int code = shm_wait(segment, 0, world, seq - 1, timeout_s); /* shm_reuse_ok */
    if (code != 0) return code;
    memcpy(shm_slot(segment, world, capacity, seq, rank), x, (size_t)n * sizeof(float));
    shm_publish(segment, rank, seq);
    if ((code = shm_wait(segment, 0, world, seq, timeout_s)) != 0) return code;
    for (int r = 0; r < world; ++r)
        memcpy(out + (int64_t)r * n, shm_slot(segment, world, capacity, seq, r), (size_t)n * sizeof(float));
    return 0;
}

/* Rank 0's bytes on every rank: rank 0 passes data[*nbytes] (more than its slot holds: the others get *nbytes = -1,
 * "use another channel"); the others a buffer of capacity * 4 - 8 bytes, filled, and *nbytes set. Rank 0 does not
 * wait for the others to read; they write nothing. */
static int shm_broadcast(char *segment, int rank, int world, int64_t capacity, char *data, int64_t *nbytes,
                         uint64_t seq, double timeout_s) {
    char *slot = (char *)shm_slot(segment, world, capacity, seq, 0);
    const int64_t room = capacity * (int64_t)sizeof(float) - 8;
    int code;
    if (rank == 0) {
        if ((code = shm_wait(segment, 1, world, seq - 1, timeout_s)) != 0) return code; /* shm_reuse_ok */
        const int64_t n = *nbytes > room ? -1 : *nbytes;
        memcpy(slot, &n, sizeof(n));
        if (n > 0) memcpy(slot + 8, data, (size_t)n);
        shm_publish(segment, 0, seq);
        return 0;
    }
    if ((code = shm_wait(segment, 0, 1, seq, timeout_s)) != 0) return code;
    memcpy(nbytes, slot, sizeof(*nbytes));
    if (*nbytes > 0) memcpy(data, slot + 8, (size_t)*nbytes);
    shm_publish(segment, rank, seq);
    return 0;
}

#endif
