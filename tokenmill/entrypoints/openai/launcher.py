"""`tokenmill serve`: build the engine and the app, then run uvicorn with a graceful shutdown.

SIGINT/SIGTERM: stop accepting (new requests get 503, the listening socket closes), give in-flight
requests `drain_timeout` seconds to finish, then abort the rest (each still gets a final response
with finish_reason "abort"), stop the engine thread and exit with status 0. A second SIGINT forces
the exit.

Engine death (its loop raised, a tensor-parallel rank or a data-parallel replica is lost, or the watchdog saw no
progress for --engine-watchdog-s with requests in flight): the open requests have already ended with an error and
/health answers 503; the server keeps answering for DEATH_GRACE_S so probes see why, shuts down, and the process
exits with ENGINE_DIED_EXIT_CODE (70, EX_SOFTWARE) so that a supervisor restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.engine_client import EngineClient

if TYPE_CHECKING:
    from tokenmill.entrypoints.openai.inputs import RequestLimits

logger = logging.getLogger("tokenmill")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
ENGINE_DIED_EXIT_CODE = 70  # EX_SOFTWARE: the engine died or hung; restart the process
DEATH_GRACE_S = 1.0
DEFAULT_WATCHDOG_S = 120.0  # the bound on one engine step with requests in flight, as for a hung tensor-parallel rank
FAULT_ENV = "TOKENMILL_FAULT_INJECT"  # a test hook (engine_loop.inject_fault); unset in service


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: EngineClient, drain_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self.engine_died = False  # the engine died: the server stopped itself, the process exits non-zero
        self.death_grace_s = DEATH_GRACE_S

    async def serve(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        watch = asyncio.create_task(self._watch_engine())
        try:
            await super().serve(sockets)
        finally:
            watch.cancel()

    async def _watch_engine(self, period_s: float = 0.25) -> None:
        """Stops the server death_grace_s after the engine died (its loop raised, a rank or replica lost, a hang
        seen by the watchdog): its requests already ended with an error and /health answers 503 meanwhile; the
        process then exits with ENGINE_DIED_EXIT_CODE and a supervisor restarts it."""
        while not self.should_exit:
            await asyncio.sleep(period_s)
            if self.engine.dead_error is not None:
                logger.error("the engine died (%s): stopping the server", self.engine.dead_error)
                self.engine_died = True
                await asyncio.sleep(self.death_grace_s)
                self.should_exit = True

    def handle_exit(self, sig: int, frame: object) -> None:
        if not self.should_exit and self._loop is not None:
            self._loop.call_soon_threadsafe(self._begin_drain)
        super().handle_exit(sig, frame)

    def _begin_drain(self) -> None:
        self.engine.stop_accepting()
        if self.engine.num_in_flight:
            logger.info("shutting down: %d request(s) in flight get %.1f s to finish, then are aborted",
                        self.engine.num_in_flight, self.drain_timeout)
        asyncio.get_running_loop().call_later(self.drain_timeout, self.engine.abort_all)

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Like uvicorn's, except that the signal is not re-raised after the shutdown: a signal asks
        # for a clean exit, so the process ends with status 0.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in _HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def served_model_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    if args.model is None:
        return DEFAULT_MODEL_NAME
    return Path(args.model).name.removesuffix(".gguf") or args.model


def build_server(args: argparse.Namespace) -> GracefulServer:
    from tokenmill.config import EngineConfig
    from tokenmill.engine.data_parallel import DataParallelEngine
    from tokenmill.engine.engine_loop import inject_fault
    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.engine.metrics import EngineMetrics
    from tokenmill.entrypoints.cli import engine_kwargs
    from tokenmill.entrypoints.openai.server import ServerContext, build_app

    name = served_model_name(args)
    config = EngineConfig.from_kwargs(**engine_kwargs(args))
    fault = os.environ.get(FAULT_ENV) or None
    async_engine: EngineClient
    if config.parallel.data_parallel_size > 1:
        async_engine = DataParallelEngine(config, max_queue=args.max_queue, metrics=EngineMetrics(name),
                                          log_steps=args.log_steps, watchdog_s=args.engine_watchdog_s, fault=fault)
    else:
        engine = LLMEngine(config)
        inject_fault(engine, fault)
        async_engine = AsyncEngine(engine, max_queue=args.max_queue, metrics=EngineMetrics(name),
                                   log_steps=args.log_steps, watchdog_s=args.engine_watchdog_s)
    api_key = args.api_key or os.environ.get("TOKENMILL_API_KEY") or None
    app = build_app(ServerContext(async_engine, name, api_key=api_key, limits=request_limits(args),
                                  frontend_threads=args.frontend_threads))
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
        timeout_graceful_shutdown=int(args.drain_timeout) + 5, timeout_keep_alive=5,
    )
    return GracefulServer(config, async_engine, args.drain_timeout)


def freeze_startup_objects() -> int:
    """Moves every object alive now into the collector's permanent generation; returns how many. Called once
    the server is built: modules, model and tokenizer (~220k objects) live as long as the process, and a full
    collection that scans them stalls the engine thread (it holds the GIL) for ~100 ms, measured mid-run in
    the serving benchmark; frozen, a full collection scans only what requests allocated (~2 ms)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def cmd_serve(args: argparse.Namespace) -> int:
    if getattr(args, "node_rank", None):  # a node other than node 0: tensor-parallel ranks only, no server
        from tokenmill.config import EngineConfig
        from tokenmill.distributed.worker_group import run_node
        from tokenmill.entrypoints.cli import engine_kwargs

        return run_node(EngineConfig.from_kwargs(**engine_kwargs(args)))
    server = build_server(args)
    freeze_startup_objects()
    logger.info("serving %s on http://%s:%d/v1", served_model_name(args), args.host, args.port)
    server.run()
    if server.engine_died:
        # The engine thread may still be stuck inside a kernel: exit now rather than wait on it at interpreter exit.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(ENGINE_DIED_EXIT_CODE)
    return 0


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    from tokenmill.entrypoints.cli import add_engine_args

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    serve.add_argument("--api-key", default=None,
                       help="require `Authorization: Bearer KEY` on /v1, /tokenize, /detokenize "
                            "(default: $TOKENMILL_API_KEY, else no auth)")
    serve.add_argument("--served-model-name", default=None,
                       help="model id clients send and /v1/models lists (default: from the model path)")
    serve.add_argument("--max-queue", type=int, default=1024,
                       help="most requests waiting to be scheduled; beyond it requests get 429 (default: 1024)")
    serve.add_argument("--drain-timeout", type=float, default=5.0,
                       help="on SIGINT/SIGTERM, seconds in-flight requests get before they are aborted "
                            "(default: %(default)s)")
    serve.add_argument("--engine-watchdog-s", type=float, default=DEFAULT_WATCHDOG_S,
                       help="seconds the engine (or a data-parallel replica) may go without finishing a step while "
                            "it holds requests; past that it counts as hung: open requests fail, /health answers "
                            f"503 and the process exits with status {ENGINE_DIED_EXIT_CODE}. Raise it where one "
                            "step (a --max-num-batched-tokens prompt chunk) can take longer; 0 turns it off "
                            f"(default: {DEFAULT_WATCHDOG_S:g})")
    serve.add_argument("--log-steps", action="store_true", help="log every engine step's batch")
    serve.add_argument("--uvicorn-log-level", default="warning",
                       help="uvicorn's log level: critical, error, warning, info, debug, trace (default: %(default)s)")
    add_limit_args(serve)
    add_engine_args(serve)
    serve.set_defaults(func=cmd_serve)


def add_limit_args(serve: argparse.ArgumentParser) -> None:
    """What one request may ask for, and the threads that prepare requests off the event loop."""
    from tokenmill.entrypoints.openai.inputs import RequestLimits

    defaults = RequestLimits()
    group = serve.add_argument_group("request limits")
    group.add_argument("--max-request-bytes", type=int, default=defaults.max_request_bytes,
                       help="largest request body accepted; a larger one gets 413 before it is parsed, whether it "
                            "declares its Content-Length or is sent in chunks (default: %(default)s, 16 MiB)")
    group.add_argument("--max-n", type=int, default=defaults.max_n,
                       help="most choices (n) one request may ask for per prompt; more gets 400 (default: %(default)s)")
    group.add_argument("--max-logprobs", type=int, default=defaults.max_logprobs,
                       help="most top logprobs per position (completions' logprobs, chat's top_logprobs); more gets "
                            "400 (default: %(default)s)")
    group.add_argument("--frontend-threads", type=int, default=2,
                       help="threads that tokenize prompts, render chat templates and format large responses off the "
                            "event loop, so /health and /metrics answer at once whatever requests do "
                            "(default: %(default)s)")


def request_limits(args: argparse.Namespace) -> RequestLimits:
    from tokenmill.entrypoints.openai.inputs import RequestLimits

    return RequestLimits(max_request_bytes=args.max_request_bytes, max_n=args.max_n, max_logprobs=args.max_logprobs)
