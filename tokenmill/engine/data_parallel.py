"""DataParallelEngine: `--data-parallel-size D` engine replicas, each a whole engine in its own process
(engine/replica.py), behind the one server.

The front end (this process: the HTTP server's event loop) tokenizes and validates every request itself (an
InputProcessor built from the checkpoint's config and tokenizer, no weights), then routes it (engine/prefix_router.py):
to the replica believed to hold the longest cached prefix of its prompt, unless that one is much busier than the
least busy, else to the least busy. Aborts follow the request to its replica. Each replica's results come back on a
receiver thread and are handled on the event loop: outputs to their callers, metrics summed over the replicas.

The cores are shared out: replica i is pinned to its own 1/D of the CPUs this process may use (when there are at
least D) and runs that many threads (shared again among its tensor-parallel ranks, if any).

Invariants (besides EngineClient's): a request's commands all go to the replica it was routed to; a replica that
exits unasked, or that holds requests and sends nothing for longer than the watchdog's bound (it is then killed),
ends every open request with EngineDeadError and marks the engine dead (/health 503, the server exits non-zero, as
when a tensor-parallel rank dies); shutdown() stops every replica process.
"""

from __future__ import annotations

import asyncio
import logging
import os

from tokenmill.config import EngineConfig
from tokenmill.engine.engine_client import EngineClient, EngineDeadError, ProgressClock
from tokenmill.engine.engine_loop import AbortRequest, AddRequest, EngineStats
from tokenmill.engine.input_processor import InputProcessor
from tokenmill.engine.metrics import EngineMetrics
from tokenmill.engine.prefix_router import PrefixRouter
from tokenmill.engine.replica import ReplicaProcess, replica_config
from tokenmill.loader import load_model

logger = logging.getLogger("tokenmill")

START_TIMEOUT_S = 900.0  # building an engine may convert a checkpoint and time an execution plan
STOP_TIMEOUT_S = 30.0
# How many more requests in flight the replica holding a prompt's prefix may have than the least busy one and still
# get it (SGLang's cache-aware router's default absolute threshold).
BALANCE_LIMIT = 32


def share_cpus(num_replicas: int) -> list[list[int] | None]:
    """The CPUs each replica is pinned to: consecutive equal shares of this process's CPUs (None: no pinning, when
    there are fewer CPUs than replicas)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    per = len(cpus) // num_replicas
    if per == 0:
        return [None] * num_replicas
    return [cpus[i * per:(i + 1) * per] for i in range(num_replicas)]


def replica_threads(config: EngineConfig, cpus: list[int] | None) -> int:
    """Intra-op threads of each rank of a replica: --num-threads, else the replica's CPUs shared out over its
    tensor-parallel ranks (all on this machine: data parallelism does not combine with --nnodes)."""
    if config.parallel.num_threads is not None:
        return config.parallel.num_threads
    return max(1, (len(cpus) if cpus else 1) // config.parallel.tensor_parallel_size)


class DataParallelEngine(EngineClient):
    def __init__(self, config: EngineConfig, *, max_queue: int | None = None, metrics: EngineMetrics | None = None,
                 log_steps: bool = False, watchdog_s: float = 0.0, fault: str | None = None) -> None:
        """fault: a test hook for every replica (engine_loop.inject_fault), None in service."""
        num_replicas = config.parallel.data_parallel_size
        # The tokenizer and config first: a GGUF is converted into the cache here, once, before the replicas load it.
        loaded = load_model(config.model.model, weights=False)
        shares = share_cpus(num_replicas)
        self.replicas: list[ReplicaProcess] = []
        try:
            for index, cpus in enumerate(shares):
                config_i = replica_config(config, replica_threads(config, cpus))
                self.replicas.append(ReplicaProcess(config_i, index, cpus, log_steps, fault))
            infos = [replica.wait_ready(START_TIMEOUT_S) for replica in self.replicas]
        except BaseException:
            for replica in self.replicas:
                replica.stop(0.0)
            raise
        super().__init__(InputProcessor(loaded, min(info.max_model_len for info in infos)), max_queue=max_queue,
                         metrics=metrics, watchdog_s=watchdog_s)
        self.router = PrefixRouter(num_replicas, infos[0].block_size, min(info.num_blocks for info in infos),
                                   balance_limit=BALANCE_LIMIT,
                                   by_prefix=config.parallel.data_parallel_routing == "prefix")
        self._replica_of: dict[str, int] = {}  # request in flight -> the replica it was routed to
        self.loads = [0] * num_replicas  # requests in flight per replica
        self.replica_stats = [EngineStats() for _ in range(num_replicas)]
        # Beaten by each replica's receiver thread at every message (not on the event loop, which may lag).
        self.clocks = [ProgressClock(f"data-parallel replica {i}") for i in range(num_replicas)]
        self._started = False
        self._stopping = False
        if metrics is not None:
            metrics.track_replicas(num_replicas)
        logger.info("data parallelism: %d replicas, routed by %s, CPUs %s, %s threads each", num_replicas,
                    config.parallel.data_parallel_routing,
                    [cpus or "any" for cpus in shares], [replica_threads(config, c) for c in shares])

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._started:
            raise RuntimeError("DataParallelEngine already started")
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._started = True
        for replica in self.replicas:
            replica.start(self._on_message)
        self._start_watchdog()

    @property
    def is_alive(self) -> bool:
        return self._started and not self._stopping and self.dead_error is None

    async def shutdown(self) -> None:
        """Stops accepting, aborts in-flight requests (their final outputs are delivered), stops the replicas."""
        self._accepting = False
        self._stop_watchdog()
        self.abort_all()
        self._stopping = True
        for replica in self.replicas:
            await asyncio.to_thread(replica.stop, STOP_TIMEOUT_S)
        for replica in self.replicas:
            await asyncio.to_thread(replica.join_receiver)
        await asyncio.sleep(0)  # the receivers' last deliveries, scheduled before they ended
        self._fail_open_streams(EngineDeadError("the engine was shut down"))

    # -- requests --------------------------------------------------------------------------------
    def _send(self, command: AddRequest | AbortRequest) -> None:
        if isinstance(command, AddRequest):
            index = self.router.route(command.prompt.token_ids, self.loads)
            self._replica_of[command.req_id] = index
            self.loads[index] += 1
            if self.metrics is not None:
                self.metrics.replica_routed[index].inc()
        else:
            index = self._replica_of.get(command.req_id)
            if index is None:
                return  # finished meanwhile
        self.replicas[index].send(command)

    def _finished(self, req_id: str) -> None:
        index = self._replica_of.pop(req_id, None)
        if index is not None:
            self.loads[index] -= 1

    def _progress_clocks(self) -> list[tuple[ProgressClock, bool]]:
        return [(clock, load > 0) for clock, load in zip(self.clocks, self.loads)]

    def _on_stall(self, clock: ProgressClock) -> None:
        replica = self.replicas[self.clocks.index(clock)]
        logger.error("data-parallel replica %d is hung; killing it", replica.index)
        replica.process.kill()  # its receiver then reads EOF ("exited"), ignored: the engine is already dead

    # -- replica messages --------------------------------------------------------------------------
    def _on_message(self, index: int, message: tuple) -> None:
        """A receiver thread's message, handed to the event loop."""
        self.clocks[index].beat()
        try:
            self._loop.call_soon_threadsafe(self._handle, index, message)
        except RuntimeError:
            pass  # the event loop is closed: nobody is left to deliver to

    def _handle(self, index: int, message: tuple) -> None:
        kind = message[0]
        if kind == "accepted":
            self._accept(message[1], message[2])
        elif kind == "delivered":
            outputs, stats = message[1], message[2]
            self._record_replica(index, stats)
            self._record(outputs, self._total_stats(stats))
            self._deliver(outputs)
        elif kind == "failed":
            self._fail_streams(message[1], message[2])
        elif kind in ("died", "exited") and not self._stopping and self.dead_error is None:
            detail = message[1] if kind == "died" else f"exit code {self.replicas[index].process.exitcode}"
            self._engine_died(RuntimeError(f"data-parallel replica {index} stopped ({detail})"))

    def _record_replica(self, index: int, stats: EngineStats) -> None:
        previous = self.replica_stats[index]
        self.replica_stats[index] = stats
        if self.metrics is not None:
            self.metrics.replica_prefix_hits[index].inc(max(stats.prefix_hits - previous.prefix_hits, 0))
            self.metrics.replica_running[index].set(stats.num_running)

    def _total_stats(self, step_of: EngineStats) -> EngineStats:
        """The replicas' state summed (KV usage: the mean), with the step one replica just ran."""
        stats = self.replica_stats
        specs = [s.spec for s in stats if s.spec is not None]
        return EngineStats(step_of.step, sum(s.num_running for s in stats), sum(s.num_waiting for s in stats),
                           sum(s.kv_usage for s in stats) / len(stats), sum(s.prefix_queries for s in stats),
                           sum(s.prefix_hits for s in stats), sum(specs[1:], specs[0].copy()) if specs else None)
