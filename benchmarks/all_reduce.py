"""The tensor-parallel ranks' all-reduce on this machine: gloo (torch.distributed) against the shared-memory one
(distributed/shm_all_reduce.py), float32 sums of the sizes a step sums (rows x hidden: a decode batch of 1 and 64, a
2048-token prefill step, for the default model's hidden size 576), between two spawned processes with one thread
each; median microseconds per call over interleaved rounds, and the ratio.

    .venv/bin/python benchmarks/all_reduce.py [--world 2] [--calls 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import torch
import torch.distributed as dist

from tokenmill.bench.results import write_json_report
from tokenmill.bench.server_process import free_port
from tokenmill.distributed.shm_all_reduce import ShmAllReduce
from tokenmill.worker.capabilities import detect_capabilities

HIDDEN = 576
ROWS = (1, 64, 2048)


def _rank(rank: int, world: int, port: int, calls: int, rounds: int, out: multiprocessing.Queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    shm = ShmAllReduce(rank, world, max(ROWS) * HIDDEN, 60.0)
    results: dict[str, list[float]] = {}
    for _ in range(rounds):
        for rows in ROWS:
            x = torch.randn(rows, HIDDEN)
            for name, reduce in (("gloo", dist.all_reduce), ("shm", shm.all_reduce_)):
                dist.barrier()
                start = time.perf_counter()
                for _ in range(calls):
                    reduce(x)
                results.setdefault(f"{name} {rows}", []).append((time.perf_counter() - start) / calls * 1e6)
    if rank == 0:
        out.put({k: statistics.median(v) for k, v in results.items()})
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    print(f"machine: {detect_capabilities().summary()}")
    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, args.world, port, args.calls, args.rounds, out))
             for r in range(args.world)]
    for p in procs:
        p.start()
    medians = out.get(timeout=600)
    for p in procs:
        p.join()
    print(f"{args.world} ranks, float32 [rows, {HIDDEN}], median us per all-reduce:")
    for rows in ROWS:
        gloo, shm = medians[f"gloo {rows}"], medians[f"shm {rows}"]
        print(f"  rows {rows:5d}: gloo {gloo:9.1f}  shared memory {shm:9.1f}  ({gloo / shm:.1f}x faster)")
    path = write_json_report({"args": vars(args), "median_us": medians}, "all-reduce", args.output_json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
