"""The scheduler: which requests compute which tokens this step. Plain Python, no torch.

No phases, only a token budget: each step grants running requests (then waiting ones) the tokens
they still need (num_tokens - num_computed_tokens), within max_num_batched_tokens. A decode is one
token, a long prompt is split over steps (chunked prefill), a prefix-cache hit starts a request at
its hit length. With speculative decoding a decoding request also gets slots for the worker's drafts (as many as
the governor grants, spec/governor.py), in the same budget; after verification its computed count stops at its last
accepted token. When KV blocks run out, the lowest-priority running request is preempted: its
blocks are freed and it goes back to the front of the waiting queue, to be recomputed later.

Every request added ends with exactly one final EngineCoreOutput (finish_reason set):
- requests that stop or reach their length in update_from_output get it in that same call;
- requests finished by finish_requests() (abort, stop string, error) get theirs queued and returned
  by the next update_from_output() call. has_unfinished_requests() stays True while such outputs are
  queued, so an engine loop that steps while it is True (schedule -> execute -> update_from_output,
  even when the schedule is empty) delivers them.
Finished requests are forgotten: later finish_requests() on them are ignored.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from tokenmill.config import SchedulerConfig
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler_output import EngineCoreOutput, ScheduledRequest, SchedulerOutput
from tokenmill.spec.governor import SpeculationGovernor
from tokenmill.worker.runner_output import ModelRunnerOutput


def _priority_key(request: Request) -> tuple[int, float]:
    return (request.priority, request.arrival_time)


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, kv_cache_manager: KVCacheManager, max_model_len: int,
                 governor: SpeculationGovernor | None = None) -> None:
        self.config = scheduler_config
        self.governor = governor  # speculative decoding: slots for drafts per decoding request (spec/governor.py)
        self.kv_cache_manager = kv_cache_manager
        self.max_model_len = max_model_len
        self.block_size = kv_cache_manager.block_size
        self.requests: dict[str, Request] = {}  # unfinished requests, waiting or running
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions_total = 0
        self._finished_req_ids: list[str] = []  # since the last schedule()
        self._final_outputs: list[EngineCoreOutput] = []  # of finish_requests(), for the next update

    # -- requests ------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queues a request; raises ValueError saying what to fix when it could never run."""
        n = request.num_prompt_tokens
        if request.req_id in self.requests:
            raise ValueError(f"request id {request.req_id!r} is already in use; request ids must be unique")
        if n == 0:
            raise ValueError("prompt is empty: it must have at least one token")
        if n >= self.max_model_len:
            raise ValueError(
                f"prompt has {n} tokens but the context length (max_model_len) is {self.max_model_len}; "
                "shorten the prompt so that at least one token can be generated"
            )
        kv = self.kv_cache_manager
        cache_tokens = kv.num_blocks * self.block_size
        if n > cache_tokens:
            raise ValueError(
                f"prompt has {n} tokens but the whole KV cache holds only {cache_tokens} tokens "
                f"({kv.num_blocks} blocks of {self.block_size}); shorten the prompt or give the KV cache more memory"
            )
        if not self.config.enable_chunked_prefill and n > self.config.max_num_batched_tokens:
            raise ValueError(
                f"prompt has {n} tokens but max_num_batched_tokens is {self.config.max_num_batched_tokens} and "
                "chunked prefill is disabled; enable chunked prefill or raise max_num_batched_tokens"
            )
        # A sequence can never outgrow the KV cache: it stops with "length" when it would.
        limit = min(self.max_model_len, cache_tokens)
        request.max_model_len = limit if request.max_model_len is None else min(request.max_model_len, limit)
        request.status = RequestStatus.WAITING
        self.requests[request.req_id] = request
        self.waiting.append(request)

    def finish_requests(self, req_ids: str | Iterable[str], status: RequestStatus) -> None:
        """Finishes waiting or running requests (abort, stop string, error) and frees their blocks.
        Each gets its final output from the next update_from_output(). Unknown or already finished
        ids are ignored."""
        if not status.is_finished:
            raise ValueError(f"finish_requests needs a finished status, got {status.name}")
        for req_id in [req_ids] if isinstance(req_ids, str) else req_ids:
            request = self.requests.get(req_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._release(request)
            self._final_outputs.append(self._make_output(request, []))

    def get_request(self, req_id: str) -> Request | None:
        return self.requests.get(req_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._final_outputs)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # -- scheduling ----------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_req_ids=self._finished_req_ids)
        self._finished_req_ids = []
        scheduled: dict[str, ScheduledRequest] = {}
        budget = self._schedule_running(self.config.max_num_batched_tokens, scheduled, out)
        if not out.preempted_req_ids:  # out of blocks: admit nobody new this step
            self._schedule_waiting(budget, scheduled)
        out.scheduled = list(scheduled.values())
        return out

    def _schedule_running(self, budget: int, scheduled: dict[str, ScheduledRequest], out: SchedulerOutput) -> int:
        kv = self.kv_cache_manager
        num_decoding = 0 if self.governor is None else sum(
            1 for r in self.running if r.num_tokens - r.num_computed_tokens == 1)
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:
                i += 1
                continue
            num_spec = self._num_spec_tokens(request, num_new, budget, num_decoding)
            num_new += num_spec
            block_ids = kv.allocate_slots(request, num_new)
            while block_ids is None:
                victim = self._pick_victim()
                if self.running.index(victim) < i:
                    i -= 1
                self._preempt(victim)
                out.preempted_req_ids.append(victim.req_id)
                dropped = scheduled.pop(victim.req_id, None)
                if dropped is not None:
                    budget += dropped.num_new_tokens
                if victim is request:
                    break
                block_ids = kv.allocate_slots(request, num_new)
            if block_ids is None:
                # The request preempted itself: everything else running has higher priority.
                # (Under fcfs it was the last one; under priority later ones may still fit.)
                continue
            scheduled[request.req_id] = ScheduledRequest(request, request.num_computed_tokens, num_new, block_ids,
                                                         num_spec)
            budget -= num_new
            i += 1
        return budget

    def _num_spec_tokens(self, request: Request, num_new: int, budget: int, num_decoding: int) -> int:
        """Slots for speculative drafts after a decoding request's one known token: what the governor grants, cut to
        the step's budget, the tokens the request may still produce past the one it surely gets, and the context."""
        if self.governor is None or num_new != 1 or request.num_tokens - request.num_computed_tokens != 1:
            return 0
        num_spec = self.governor.num_spec_tokens(request, num_decoding)
        return max(0, min(num_spec, budget - 1, request.max_tokens - request.num_output_tokens - 1,
                          request.max_model_len - request.num_tokens))

    def _schedule_waiting(self, budget: int, scheduled: dict[str, ScheduledRequest]) -> None:
        kv = self.kv_cache_manager
        if self.config.policy == "priority":
            self.waiting = deque(sorted(self.waiting, key=_priority_key))
        # n > 1: while one sample of a prompt computes the prompt, its siblings wait, then hit its blocks.
        prefilling_groups = {
            r.group_id for r in self.running if r.group_id is not None and r.num_computed_tokens < r.num_prompt_tokens
        }
        skipped: list[Request] = []
        while self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0:
            request = self.waiting[0]
            if request.grammar is not None and not request.grammar.is_ready():  # still compiling: keeps its place
                skipped.append(self.waiting.popleft())
                continue
            if request.group_id in prefilling_groups and self._can_share_prompt(request):
                skipped.append(self.waiting.popleft())
                continue
            hit_blocks, num_hit = self._computed_blocks(request)
            num_new = request.num_tokens - num_hit
            if not self.config.enable_chunked_prefill and budget < num_new <= self.config.max_num_batched_tokens:
                break  # the prompt must fit one step (a resumed sequence longer than any step is still split)
            num_new = min(num_new, budget)
            block_ids = kv.allocate_slots(request, num_new, hit_blocks)
            if block_ids is None:
                break
            self.waiting.popleft()
            self._admit(request, num_hit)
            scheduled[request.req_id] = ScheduledRequest(request, num_hit, num_new, block_ids)
            budget -= num_new
            if request.group_id is not None and request.num_computed_tokens < request.num_prompt_tokens:
                prefilling_groups.add(request.group_id)
        self.waiting.extendleft(reversed(skipped))

    def _can_share_prompt(self, request: Request) -> bool:
        """Whether waiting for a sibling's prompt blocks can save this request any computation."""
        return (
            self.kv_cache_manager.enable_prefix_caching
            and request.num_prompt_tokens > self.block_size
            and request.sampling_params.prompt_logprobs is None
        )

    def _computed_blocks(self, request: Request) -> tuple[list[int], int]:
        # Prompt logprobs need every prompt position computed, so no prefix hits until they are all in.
        wants_prompt_logprobs = request.sampling_params.prompt_logprobs is not None
        if wants_prompt_logprobs and len(request.prompt_logprobs) < request.num_prompt_tokens:
            return [], 0
        return self.kv_cache_manager.get_computed_blocks(request)

    def _admit(self, request: Request, num_hit: int) -> None:
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = num_hit
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_hit
        if request.metrics.first_scheduled_time is None:
            request.metrics.first_scheduled_time = time.monotonic()
        self.running.append(request)

    def _pick_victim(self) -> Request:
        if self.config.policy == "priority":
            return max(self.running, key=_priority_key)
        return self.running[-1]

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv_cache_manager.free(request)  # its computed full blocks stay cached: resuming may hit them
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(request)

    # -- results -------------------------------------------------------------------------------------
    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Applies a step's results: advances progress, appends sampled tokens, checks stop
        conditions and frees finished requests. Returns one output per request that got new tokens
        or finished (including those finished by finish_requests() since the last call)."""
        outputs, self._final_outputs = self._final_outputs, []
        index = {req_id: i for i, req_id in enumerate(runner_output.req_ids)}
        now = time.monotonic()
        for sched in scheduler_output.scheduled:
            request = sched.request
            if request.is_finished:  # finished by finish_requests() while the step ran
                continue
            request.num_computed_tokens += sched.num_new_tokens - sched.num_spec_tokens
            i = index.get(request.req_id)
            if i is None:
                continue
            self._record_prompt_logprobs(request, sched.start_pos, runner_output.prompt_logprobs.get(request.req_id))
            sampled = runner_output.sampled_token_ids[i]
            logprobs = runner_output.logprobs[i] if runner_output.logprobs else None
            first_tokens = request.num_output_tokens == 0
            new_token_ids = []
            for j, token_id in enumerate(sampled):
                request.append_output_token_ids([token_id])
                new_token_ids.append(token_id)
                if request.grammar is not None:  # structured output: the matcher follows every token
                    request.grammar.accept(token_id)
                if logprobs is not None:
                    request.logprobs.append(logprobs[j])
                    if token_id in logprobs[j]:
                        request.cumulative_logprob += logprobs[j][token_id].logprob
                if self._check_stop(request, token_id):
                    break
            num_drafted = num_accepted = 0
            if sched.num_spec_tokens:
                num_drafted, num_accepted = self._apply_verification(request, sched, runner_output, i)
            if new_token_ids:
                if request.metrics.first_token_time is None:
                    request.metrics.first_token_time = now
                request.metrics.last_token_time = now
            if request.is_finished:
                self.running.remove(request)
                self._release(request)
            if new_token_ids or request.is_finished:
                output = self._make_output(request, new_token_ids)
                if logprobs is not None:
                    output.new_logprobs = request.logprobs[len(request.logprobs) - len(new_token_ids):]
                if first_tokens and new_token_ids and request.prompt_logprobs:
                    output.new_prompt_logprobs = list(request.prompt_logprobs)
                output.num_draft_tokens, output.num_accepted_tokens = num_drafted, num_accepted
                outputs.append(output)
        return outputs

    def _apply_verification(self, request: Request, sched: ScheduledRequest, runner_output: ModelRunnerOutput,
                            i: int) -> tuple[int, int]:
        """A step that had draft slots: of d drafts verified, the first a = len(sampled) - 1 were accepted, and their
        K/V (written by this step) is the target's: they count as computed. The rest of the slots are rolled back:
        their K/V is overwritten by later steps and never reaches the prefix cache (which registers computed blocks
        only). Their blocks stay in the request's table (a table only grows: the worker mirrors it by appends) for
        the tokens it computes next, and go back to the pool with the rest when it finishes."""
        num_drafted = runner_output.num_draft_tokens[i] if runner_output.num_draft_tokens else 0
        num_accepted = max(0, len(runner_output.sampled_token_ids[i]) - 1)
        request.num_computed_tokens = min(request.num_computed_tokens + num_accepted, request.num_tokens)
        if self.governor is not None:
            self.governor.record(request, num_drafted, num_accepted)
        return num_drafted, num_accepted

    @staticmethod
    def _record_prompt_logprobs(request: Request, start_pos: int, entries: list | None) -> None:
        # After positions [0, e) are computed the list holds e + 1 entries (position 0's None, then what
        # each computed row predicts), so a chunk from start_pos > 0 continues it iff the length is
        # start_pos + 1. Anything else repeats entries (recomputation after preemption): dropped.
        expected = start_pos + 1 if start_pos else 0
        if entries and len(request.prompt_logprobs) == expected:
            room = request.num_prompt_tokens - len(request.prompt_logprobs)
            request.prompt_logprobs.extend(entries[:room])

    def _check_stop(self, request: Request, token_id: int) -> bool:
        """Sets a finished status if the token just appended ends the request."""
        params = request.sampling_params
        if request.grammar is not None and request.grammar.terminated:  # the output is complete (structured/)
            request.status = RequestStatus.FINISHED_STOPPED
            return True
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and (token_id == request.eos_token_id or token_id in params.all_stop_token_ids):
                request.status = RequestStatus.FINISHED_STOPPED
                return True
            if token_id in params.stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = token_id
                return True
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= request.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    def _release(self, request: Request) -> None:
        """Frees a finished request's blocks (full ones stay cached) and forgets it."""
        self.kv_cache_manager.free(request)
        del self.requests[request.req_id]
        self._finished_req_ids.append(request.req_id)
        request.metrics.finished_time = time.monotonic()

    @staticmethod
    def _make_output(request: Request, new_token_ids: list[int]) -> EngineCoreOutput:
        return EngineCoreOutput(
            request.req_id, new_token_ids, finish_reason=request.finish_reason, stop_reason=request.stop_reason,
            num_cached_tokens=max(request.num_cached_tokens, 0),
            first_scheduled_time=request.metrics.first_scheduled_time, num_preemptions=request.num_preemptions,
        )
