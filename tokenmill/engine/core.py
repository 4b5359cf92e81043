"""EngineCore: the schedule -> execute -> update loop over the worker (worker/worker.py: the model, its plan and
KV cache) and the scheduler. What crosses to the worker each step is plain data (worker/step_input.py), built by
the WorkerMirror from the scheduler's output. Under tensor parallelism the engine's worker is rank 0 of a
WorkerGroup (distributed/worker_group.py): each step goes to the other ranks first, then runs here."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from tokenmill.config import EngineConfig
from tokenmill.distributed.communicator import SINGLE
from tokenmill.distributed.worker_group import WorkerGroup, WorkerGroupDied
from tokenmill.engine.input_processor import generation_eos_ids
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.scheduler_output import EngineCoreOutput
from tokenmill.engine.step_timer import NULL_TIMER, AnyStepTimer
from tokenmill.engine.worker_mirror import WorkerMirror
from tokenmill.loader import LoadedModel
from tokenmill.spec.governor import SpeculationGovernor
from tokenmill.structured.manager import StructuredOutputManager
from tokenmill.worker.runner_output import ModelRunnerOutput
from tokenmill.worker.worker import Worker

logger = logging.getLogger("tokenmill")


@dataclass(frozen=True)
class StepStats:
    """What the last EngineCore.step() ran (for metrics and step logs)."""

    num_scheduled_reqs: int = 0
    num_scheduled_tokens: int = 0
    num_preempted_reqs: int = 0


class EngineCore:
    def __init__(self, config: EngineConfig, loaded: LoadedModel, step_timer: AnyStepTimer = NULL_TIMER) -> None:
        self.config = config
        self.timer = step_timer
        if config.parallel.node_rank != 0:
            raise ValueError("node_rank > 0 runs tensor-parallel ranks only (`tokenmill serve --node-rank R`), "
                             "not an engine")
        if config.parallel.data_parallel_size > 1:
            raise ValueError("data_parallel_size > 1 runs replicas behind the server (`tokenmill serve "
                             "--data-parallel-size D`); one engine is one replica")
        # The model's lifecycle (weights, quantization, execution plan, KV cache, runner) is the worker's; under
        # tensor parallelism the engine's worker is rank 0 of the group.
        self.workers = WorkerGroup(config) if config.parallel.tensor_parallel_size > 1 else None
        try:
            self.worker = Worker(config, loaded, step_timer, self.workers.comm if self.workers else SINGLE)
        except BaseException:
            self.close()
            raise
        self.device, self.dtype = self.worker.device, self.worker.dtype
        self.max_model_len = self.worker.max_model_len
        self.model, self.plan, self.runner = self.worker.model, self.worker.plan, self.worker.runner
        self.capacity = self.worker.capacity
        self.kv_cache_manager = KVCacheManager(self.worker.num_blocks, self.worker.block_size,
                                               config.cache.enable_prefix_caching)
        spec = config.speculative.spec
        self.governor = SpeculationGovernor(spec) if spec is not None else None
        self.scheduler = Scheduler(config.scheduler, self.kv_cache_manager, self.max_model_len, self.governor)
        self.mirror = WorkerMirror()
        self.last_step = StepStats()
        # Masks as wide as the logits (the model's vocabulary, which may exceed the tokenizer's); a grammar may end
        # with any token that ends generation.
        stop_ids = generation_eos_ids(loaded)
        if getattr(loaded.tokenizer, "eos_token_id", None) is not None:
            stop_ids.add(loaded.tokenizer.eos_token_id)
        self.structured = StructuredOutputManager(loaded.tokenizer, int(loaded.hf_config.vocab_size), stop_ids)

    def close(self) -> None:
        """Stops the other tensor-parallel ranks, if any, and the grammar compile thread (idempotent)."""
        if self.workers is not None:
            self.workers.close()
        if getattr(self, "structured", None) is not None:
            self.structured.close()

    def add_request(self, request: Request) -> None:
        request.max_model_len = self.max_model_len
        self.structured.add_request(request)  # structured output: its grammar starts compiling
        self.scheduler.add_request(request)

    def abort_requests(self, req_ids: Iterable[str]) -> None:
        self.scheduler.finish_requests(list(req_ids), RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        with self.timer.section("schedule"):
            failed = self.structured.failed_requests()  # grammars that did not compile
            if failed:
                self.scheduler.finish_requests(failed, RequestStatus.FINISHED_ERROR)
            scheduler_output = self.scheduler.schedule()
            if scheduler_output.is_empty and self.structured.num_compiling:
                self.structured.wait_for_compiles(0.01)  # nothing runnable until a grammar is ready: don't spin
        self.last_step = StepStats(
            len(scheduler_output.scheduled), scheduler_output.num_scheduled_tokens,
            len(scheduler_output.preempted_req_ids),
        )
        step_input = self.mirror.step_input(scheduler_output)
        grammar = self.structured.grammar_bitmask(scheduler_output.scheduled)
        if grammar is not None:
            step_input = dataclasses.replace(step_input, grammar=grammar)
        try:
            if self.workers is not None:
                self.workers.send(step_input)
            runner_output = self.worker.execute(step_input)
        except Exception as exc:
            if self.workers is not None:
                # The ranks may be part-way through different collectives: nothing can run on this group again.
                raise WorkerGroupDied(f"a tensor-parallel step failed: {exc}") from exc
            # A failing step fails its own requests ("error"), never the engine.
            failed = [s.req_id for s in scheduler_output.scheduled]
            logger.exception("model execution failed; finishing %d request(s) with an error", len(failed))
            self.scheduler.finish_requests(failed, RequestStatus.FINISHED_ERROR)
            runner_output = ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        with self.timer.section("update"):
            return self.scheduler.update_from_output(scheduler_output, runner_output)
