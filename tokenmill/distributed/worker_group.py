"""Tensor-parallel ranks as processes: rank 0 is the engine's own worker (in the engine process, as vLLM's
uniprocess executor for one rank); ranks 1 .. N - 1 are spawned processes that each load the checkpoint, build their
share of the model (worker/worker.py with their Communicator) and run every step rank 0 broadcasts to them.

Over several machines (--nnodes M, torchrun's meaning) each node holds N / M consecutive ranks: node 0 the engine
(rank 0) and its local ranks (WorkerGroup), every other node only its ranks (run_node: the first in the node's
process, the rest spawned), all meeting at --master-addr:--master-port over gloo (set GLOO_SOCKET_IFNAME to the
interface the nodes reach each other on).

Per step rank 0 broadcasts the step's plain-data message (worker/step_input.py) and then runs it itself; the ranks
meet in the model's collectives, and only rank 0 gets the logits and samples (the others learn the sampled tokens
from the next step's message). A broadcast of None tells the ranks to exit.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket

import torch

from tokenmill.config import EngineConfig
from tokenmill.distributed.communicator import Communicator, close_communicator, init_communicator
from tokenmill.worker.step_input import StepInput

logger = logging.getLogger("tokenmill")


class WorkerGroupDied(RuntimeError):
    """A tensor-parallel rank died, hung past the collective timeout, or a step failed part-way: the ranks'
    collectives can no longer be matched, so the engine stops (its requests end with an error)."""


# A collective that waits longer than this for a rank fails (the rank died or hangs) instead of blocking forever.
COLLECTIVE_TIMEOUT_S = 120.0


def _free_port(addr: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def _ranks_per_node(config: EngineConfig) -> int:
    return config.parallel.tensor_parallel_size // config.parallel.nnodes


def _local_ranks(config: EngineConfig) -> range:
    """The global ranks this node holds."""
    per_node = _ranks_per_node(config)
    return range(config.parallel.node_rank * per_node, (config.parallel.node_rank + 1) * per_node)


def _spawn_ranks(config: EngineConfig, ranks: range, port: int) -> list[multiprocessing.Process]:
    ctx = multiprocessing.get_context("spawn")
    processes = [ctx.Process(target=_run_rank, args=(config, rank, port), name=f"tokenmill-tp{rank}", daemon=True)
                 for rank in ranks]
    for process in processes:
        process.start()
    return processes


def _stop(processes: list[multiprocessing.Process], timeout_s: float) -> None:
    """Waits up to timeout_s for each process to exit, then kills it."""
    for process in processes:
        process.join(timeout_s)
        if process.is_alive():
            process.kill()
            process.join()


def threads_per_rank(config: EngineConfig) -> int:
    """Intra-op threads of each rank: --num-threads, else the cores shared out over the ranks (at least one)."""
    if config.parallel.num_threads is not None:
        return config.parallel.num_threads
    return max(1, (os.cpu_count() or 1) // _ranks_per_node(config))


def _backend(config: EngineConfig) -> str:
    from tokenmill.worker.device import resolve_device

    return "nccl" if resolve_device(config.model.device).type == "cuda" else "gloo"


def rank_device(config: EngineConfig, rank: int) -> torch.device | None:
    """A rank's GPU under NCCL: the node's GPU of its local rank (one GPU per rank); None on the CPU."""
    if _backend(config) != "nccl":
        return None
    local_rank = rank % _ranks_per_node(config)
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"tensor-parallel rank {rank} needs GPU {local_rank} of this node, which has "
                         f"{torch.cuda.device_count()}: NCCL needs one GPU per rank")
    return torch.device("cuda", local_rank)


def die_with_parent() -> None:
    """For a process the engine spawned: it ignores SIGINT and SIGTERM, which a terminal's Ctrl-C or a supervisor
    sends to the whole process group, so that the engine alone handles them (drains, then stops its children); and on
    Linux it gets SIGKILL when its parent dies, however that dies (no orphan)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the rank still exits when its collectives fail


def _run_rank(config: EngineConfig, rank: int, port: int, spawned: bool = True) -> None:
    """A rank's life other than rank 0's: join the group, build its worker, run steps until rank 0 broadcasts None."""
    from tokenmill.engine.llm_engine import load_engine_model
    from tokenmill.worker.worker import Worker

    if spawned:
        die_with_parent()
    torch.set_num_threads(threads_per_rank(config))
    comm = init_communicator(rank, config.parallel.tensor_parallel_size, config.parallel.master_addr, port,
                             _backend(config), COLLECTIVE_TIMEOUT_S, rank_device(config, rank))
    try:
        worker = Worker(config, load_engine_model(config), tp=comm)
        while True:
            step: StepInput | None = comm.broadcast_object()
            if step is None:
                return
            worker.execute(step)
    finally:
        close_communicator()


class WorkerGroup:
    """Starts ranks 1 .. N - 1 and opens rank 0's Communicator (`comm`) for the engine's own worker."""

    def __init__(self, config: EngineConfig) -> None:
        world_size, parallel = config.parallel.tensor_parallel_size, config.parallel
        port = parallel.master_port if parallel.master_port is not None else _free_port(parallel.master_addr)
        rank_device(config, _local_ranks(config)[-1])  # enough GPUs for every local rank, before any starts
        self.processes = _spawn_ranks(config, _local_ranks(config)[1:], port)
        self._engine_threads = torch.get_num_threads()  # process-wide: given back at close()
        torch.set_num_threads(threads_per_rank(config))
        try:
            self.comm: Communicator = init_communicator(0, world_size, parallel.master_addr, port, _backend(config),
                                                        COLLECTIVE_TIMEOUT_S, rank_device(config, 0))
        except BaseException:
            _stop(self.processes, 0.0)
            torch.set_num_threads(self._engine_threads)
            raise
        self.closed = False
        logger.info("tensor parallelism: %d ranks on %d node(s) (%s), %d threads each", world_size, parallel.nnodes,
                    _backend(config), threads_per_rank(config))

    def send(self, step: StepInput) -> None:
        """Hands the step to ranks 1 .. N - 1 (rank 0 runs it next, in the caller); WorkerGroupDied when a rank's
        process is gone."""
        self.check_alive()
        self.comm.broadcast_object(step)

    def check_alive(self) -> None:
        dead = [p for p in self.processes if not p.is_alive()]
        if dead:
            raise WorkerGroupDied(", ".join(f"tensor-parallel rank {p.name} exited with {p.exitcode}" for p in dead))

    def close(self, timeout_s: float = 30.0) -> None:
        """Stops the ranks (they exit after the broadcast) and closes the group; kills a rank that does not exit."""
        if self.closed:
            return
        self.closed = True
        try:
            if all(p.is_alive() for p in self.processes):
                self.comm.broadcast_object(None)
        except RuntimeError as exc:  # a rank hung or died meanwhile: it is killed below
            logger.warning("tensor-parallel ranks could not be told to stop (%s); killing them", exc)
        finally:
            _stop(self.processes, timeout_s)
            close_communicator()
            torch.set_num_threads(self._engine_threads)


def run_node(config: EngineConfig) -> int:
    """A node other than node 0 (--node-rank > 0): runs its ranks until node 0's engine stops them. Returns the exit
    status: 0 when stopped by the engine, 1 when a rank failed (the engine is gone, or a collective timed out)."""
    ranks = _local_ranks(config)
    port = config.parallel.master_port
    assert port is not None  # ParallelConfig requires it with nnodes > 1
    logger.info("node %d of %d: tensor-parallel ranks %d-%d, waiting for node 0 at %s:%d", config.parallel.node_rank,
                config.parallel.nnodes, ranks[0], ranks[-1], config.parallel.master_addr, port)
    processes = _spawn_ranks(config, ranks[1:], port)
    status = 0
    try:
        _run_rank(config, ranks[0], port, spawned=False)
    except Exception:
        logger.exception("tensor-parallel rank %d failed", ranks[0])
        status = 1
    finally:
        _stop(processes, COLLECTIVE_TIMEOUT_S)
    return 1 if status or any(p.exitcode for p in processes) else 0
