"""A data-parallel replica: one whole engine (its own scheduler, KV cache and model, with its tensor-parallel ranks
if any) in its own process, driven by the front end (engine/data_parallel.py) over two pipes.

Front end -> replica: the EngineLoop's commands (AddRequest, AbortRequest, STOP), pickled.
Replica -> front end, as tuples:
    ("ready", ReplicaInfo)            once, after the engine is built
    ("start_failed", message)         instead of "ready" when it could not be built (the process then exits 1)
    ("accepted", ticket, error)       error None or the ValueError the engine raised
    ("delivered", outputs, stats)     after each step and each abort, and on going idle with fresh stats (no
                                      outputs): RequestOutputs and EngineStats
    ("failed", req_ids, error)        the requests a failed step took down
    ("died", message)                 the loop stopped for good (the process then exits 1)
and the front end's receiver adds ("exited",) when the pipe reads EOF (the process is gone, however it ended).
The process dies with the front end (PR_SET_PDEATHSIG), and a STOP or the front end's end of the pipe closing
stops it.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.distributed.worker_group import die_with_parent
from tokenmill.engine.engine_loop import STOP, AbortRequest, AddRequest, Command, EngineStats
from tokenmill.outputs import RequestOutput

logger = logging.getLogger("tokenmill")


@dataclass(frozen=True)
class ReplicaInfo:
    max_model_len: int
    num_blocks: int
    block_size: int


def replica_config(config: EngineConfig, num_threads: int) -> EngineConfig:
    """What one replica's engine is built from: the same engine, alone, with its share of the cores and of the KV
    cache's memory (--kv-cache-memory and --kv-cache-memory-fraction are for the whole server; an explicit
    --num-blocks is each replica's)."""
    replicas = config.parallel.data_parallel_size
    parallel = dataclasses.replace(config.parallel, data_parallel_size=1, num_threads=num_threads)
    memory = config.cache.kv_cache_memory
    cache = dataclasses.replace(config.cache, kv_cache_memory=None if memory is None else max(1, memory // replicas),
                                kv_cache_memory_fraction=config.cache.kv_cache_memory_fraction / replicas)
    return dataclasses.replace(config, parallel=parallel, cache=cache)


class _PipeListener:
    def __init__(self, events: Connection) -> None:
        self.events = events

    def accepted(self, ticket: int, error: ValueError | None) -> None:
        self.events.send(("accepted", ticket, error))

    def delivered(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        self.events.send(("delivered", outputs, stats))

    def failed(self, req_ids: list[str], error: BaseException) -> None:
        self.events.send(("failed", req_ids, error))


def run_replica(config: EngineConfig, index: int, commands: Connection, events: Connection, cpus: list[int] | None,
                log_level: int, log_steps: bool, fault: str | None = None) -> None:
    """The replica process's life (spawned); fault: a test hook (engine_loop.inject_fault), None in service."""
    import torch

    from tokenmill.engine.engine_loop import EngineLoop, inject_fault
    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.logger import init_logger

    die_with_parent()
    init_logger(log_level)
    if cpus:
        os.sched_setaffinity(0, cpus)
    torch.set_num_threads(config.parallel.num_threads or 1)
    try:
        engine = LLMEngine(config)
    except BaseException as exc:
        logger.exception("data-parallel replica %d could not start", index)
        events.send(("start_failed", f"{type(exc).__name__}: {exc}"))
        sys.exit(1)
    inject_fault(engine, fault)
    core = engine.core
    events.send(("ready", ReplicaInfo(engine.max_model_len, core.kv_cache_manager.num_blocks,
                                      core.kv_cache_manager.block_size)))

    def next_command(block: bool) -> Command | None:
        if not block and not commands.poll():
            return None
        try:
            return commands.recv()
        except EOFError:  # the front end is gone
            return STOP

    try:
        EngineLoop(engine, next_command, _PipeListener(events), log_steps=log_steps).run()
    except BaseException as exc:
        logger.exception("data-parallel replica %d died", index)
        try:
            events.send(("died", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        engine.close()
        sys.exit(1)
    engine.close()


class ReplicaProcess:
    """The front end's handle on one replica: its process, a sender thread (so the event loop never blocks on a
    full pipe) and, once started, a receiver thread passing every message to on_message(index, message)."""

    def __init__(self, config: EngineConfig, index: int, cpus: list[int] | None, log_steps: bool,
                 fault: str | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        command_reader, self._commands = ctx.Pipe(duplex=False)
        self._events, event_writer = ctx.Pipe(duplex=False)
        self.index = index
        # Not a daemon: a replica with tensor-parallel ranks starts processes of its own.
        self.process = ctx.Process(
            target=run_replica, name=f"tokenmill-dp{index}",
            args=(config, index, command_reader, event_writer, cpus, logger.getEffectiveLevel(), log_steps, fault))
        self.process.start()
        command_reader.close()  # the child's ends: once it exits, its end of the event pipe reads EOF here
        event_writer.close()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name=f"tokenmill-dp{index}-send", daemon=True)
        self._sender.start()
        self._receiver: threading.Thread | None = None

    def wait_ready(self, timeout_s: float) -> ReplicaInfo:
        """Blocks until the replica's engine is built; RuntimeError when it failed or took longer than timeout_s."""
        if not self._events.poll(timeout_s):
            raise RuntimeError(f"data-parallel replica {self.index} did not start within {timeout_s:.0f} s")
        try:
            message = self._events.recv()
        except EOFError:
            raise RuntimeError(f"data-parallel replica {self.index} exited while starting "
                               f"(exit code {self.process.exitcode})") from None
        if message[0] != "ready":
            raise RuntimeError(f"data-parallel replica {self.index} could not start: {message[1]}")
        return message[1]

    def start(self, on_message: Callable[[int, tuple[Any, ...]], None]) -> None:
        self._receiver = threading.Thread(target=self._receive_loop, args=(on_message,),
                                          name=f"tokenmill-dp{self.index}-recv", daemon=True)
        self._receiver.start()

    def send(self, command: AddRequest | AbortRequest | str) -> None:
        self._outbox.put(command)

    def _send_loop(self) -> None:
        while True:
            command = self._outbox.get()
            try:
                self._commands.send(command)
            except OSError:
                return  # the replica is gone; its receiver reports it
            if command == STOP:
                return

    def _receive_loop(self, on_message: Callable[[int, tuple[Any, ...]], None]) -> None:
        while True:
            try:
                message = self._events.recv()
            except (EOFError, OSError):
                on_message(self.index, ("exited",))
                return
            on_message(self.index, message)

    def join_receiver(self) -> None:
        if self._receiver is not None:
            self._receiver.join()

    def stop(self, timeout_s: float) -> None:
        """Asks the replica to stop (after the commands already sent), waits up to timeout_s, then kills it."""
        self.send(STOP)
        self.process.join(timeout_s)
        if self.process.is_alive():
            logger.warning("data-parallel replica %d did not stop within %.0f s; killing it", self.index, timeout_s)
            self.process.kill()
            self.process.join()
        self._sender.join(1.0)
