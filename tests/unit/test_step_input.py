"""The engine -> worker step contract (worker/step_input.py): the engine's WorkerMirror and the worker's
RequestStates stay equal to the scheduler's requests through chunked prefill, decode, preemption, aborts and
finishes, with every message crossing as pickled plain data."""

from __future__ import annotations

import pickle
import random

import pytest

from tests.unit.test_scheduler import fake_run, make_request
from tokenmill.config import SchedulerConfig
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.worker_mirror import WorkerMirror
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.request_states import RequestStates
from tokenmill.worker.step_input import CachedRequestData, NewRequestData, ScheduledWork, StepInput


def _crossed(step: StepInput) -> StepInput:
    """The message as a worker in another process gets it; it must not carry engine objects."""
    raw = pickle.dumps(step)
    assert b"tokenmill.engine" not in raw, "the step message refers to engine objects"
    return pickle.loads(raw)


def _check_mirror(out, work) -> None:
    """Every scheduled request's worker state equals the scheduler's request, and the work matches."""
    assert [w.req_id for w in work] == [s.req_id for s in out.scheduled]
    for w, s in zip(work, out.scheduled, strict=True):
        request = s.request
        assert w.state.all_token_ids == request.all_token_ids
        assert w.state.prompt_token_ids == request.prompt_token_ids
        assert w.state.block_ids == s.block_ids
        assert (w.start_pos, w.num_new_tokens, w.samples) == (s.start_pos, s.num_new_tokens, s.samples)
        assert w.token_ids == s.token_ids
        assert w.state.sampling_params == request.sampling_params


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_worker_state_follows_the_scheduler(seed: int) -> None:
    """Random arrivals and aborts with a KV cache small enough to preempt, chunked prefill and prefix hits."""
    rng = random.Random(seed)
    kv = KVCacheManager(12, 4, True)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=6), kv, 64)
    mirror, states = WorkerMirror(), RequestStates()
    shared = list(range(100, 108))  # a shared prefix: prefix hits
    made, preemptions = 0, 0
    for step_no in range(400):
        if made < 24 and rng.random() < 0.3:
            request = make_request(f"r{made}", rng.randint(3, 20), start=rng.randint(0, 50),
                                   max_tokens=rng.randint(1, 12))
            if rng.random() < 0.3:
                request.prompt_token_ids[:8] = shared
                request.all_token_ids[:8] = shared
            scheduler.add_request(request)
            made += 1
        if scheduler.requests and rng.random() < 0.05:
            scheduler.finish_requests([rng.choice(list(scheduler.requests))], RequestStatus.FINISHED_ABORTED)
        out = scheduler.schedule()
        preemptions += len(out.preempted_req_ids)
        work = states.apply(_crossed(mirror.step_input(out)))
        _check_mirror(out, work)
        scheduler.update_from_output(out, fake_run(out, token=rng.randint(0, 50)))
        if made == 24 and not scheduler.has_unfinished_requests():
            break
    assert not scheduler.has_unfinished_requests(), "the run did not drain"
    assert preemptions > 0, "the run never preempted: the test lost its point"
    states.apply(_crossed(mirror.step_input(scheduler.schedule())))  # the last finishes reach the worker
    assert len(states) == mirror.num_held == 0


def test_decode_steps_send_only_the_new_token() -> None:
    kv = KVCacheManager(16, 4, False)
    scheduler = Scheduler(SchedulerConfig(), kv, 64)
    mirror, states = WorkerMirror(), RequestStates()
    scheduler.add_request(make_request("a", 6, max_tokens=8))
    prefill = scheduler.schedule()
    first = mirror.step_input(prefill)
    assert [n.req_id for n in first.new_requests] == ["a"] and not first.cached.req_ids
    states.apply(first)
    scheduler.update_from_output(prefill, fake_run(prefill, token=9))
    out = scheduler.schedule()
    second = mirror.step_input(out)
    assert not second.new_requests
    assert second.cached == CachedRequestData(["a"], [[9]], [[]])  # 7 tokens fit the 2 blocks held
    assert states.apply(second)[0].token_ids == [9]
    scheduler.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert mirror.step_input(scheduler.schedule()).dropped_req_ids == ["a"]


def test_bad_messages_are_refused() -> None:
    states = RequestStates()
    new = NewRequestData("a", [1, 2], [], SamplingParams(), None, [0])
    states.apply(StepInput([ScheduledWork("a", 0, 2)], [new]))
    with pytest.raises(ValueError, match="twice"):
        states.apply(StepInput([], [new]))
    with pytest.raises(ValueError, match="not held"):
        states.apply(StepInput([], [], CachedRequestData(["b"], [[3]], [[]])))
    with pytest.raises(ValueError, match="not held"):
        states.apply(StepInput([ScheduledWork("c", 0, 1)]))
    states.apply(StepInput(dropped_req_ids=["a"]))
    assert len(states) == 0
