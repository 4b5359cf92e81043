/* All-reduce (sum) of float32 vectors between the tensor-parallel ranks of one machine, through a shared memory
 * segment every rank maps (distributed/shm_all_reduce.py), with no system call on the way: the latency of a
 * cache-line handshake instead of gloo's socket round trips.
 *
 * Segment: `world` control lines (64 bytes each, rank r's holding the sequence number of its last arrival, then its
 * process id, which a rank waiting on it checks: a rank that died fails the call at once), then two
 * buffer sets (by the parity of the sequence number), each of `world` slots of `capacity` floats.
 * One all-reduce, number seq (1, 2, ... the same on every rank, every rank making the same calls in the same order,
 * all-reduces, all-gathers and broadcasts counted together):
 *   1. copy x into this rank's slot of set seq % 2, then publish seq in this rank's control line (release);
 *   2. wait until every rank has published seq (acquire);
 *   3. x = the slots summed in rank order (so every rank gets the same bits).
 * An all-gather is the same with 3. copying the slots; a broadcast has rank 0 write and the others read slot 0. The
 * buffer-reuse rule (set seq % 2 is written only once every rank is done with call seq - 2): shm_all_reduce.h.
 */
#include "shm_all_reduce.h"

/* Bytes of the segment for world ranks and capacity floats per slot. */
int64_t tm_shm_segment_bytes(int world, int64_t capacity) { return shm_segment_bytes(world, capacity); }

/* Returns 0; 1 when n > capacity (nothing done); 2 when some rank did not arrive within timeout_s, 3 when a rank's
 * process is gone (x unchanged). */
int tm_shm_all_reduce(char *segment, int rank, int world, int64_t capacity, float *x, int64_t n, uint64_t seq,
                      double timeout_s) {
    return shm_all_reduce(segment, rank, world, capacity, x, n, seq, timeout_s);
}

/* out[r * n ...] = rank r's x (n floats), on every rank; returns as tm_shm_all_reduce. */
int tm_shm_all_gather(char *segment, int rank, int world, int64_t capacity, const float *x, int64_t n, float *out,
                      uint64_t seq, double timeout_s) {
    return shm_all_gather(segment, rank, world, capacity, x, n, out, seq, timeout_s);
}

/* Rank 0's bytes on every rank (shm_all_reduce.h's shm_broadcast); returns as tm_shm_all_reduce. */
int tm_shm_broadcast(char *segment, int rank, int world, int64_t capacity, char *data, int64_t *nbytes, uint64_t seq,
                     double timeout_s) {
    return shm_broadcast(segment, rank, world, capacity, data, nbytes, seq, timeout_s);
}
