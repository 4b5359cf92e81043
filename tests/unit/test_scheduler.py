"""Scheduler with a fake runner (no model): batching, chunking, preemption, prefix hits, stops, aborts."""

from __future__ import annotations

from collections import defaultdict

import pytest

from tokenmill.config import SchedulerConfig
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.scheduler_output import EngineCoreOutput, SchedulerOutput
from tokenmill.outputs import Logprob
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.runner_output import ModelRunnerOutput

TOKEN = 7  # what the fake runner samples unless told otherwise


@pytest.fixture
def make_scheduler():
    """Builds schedulers; after each test no request may be left and every KV block must be free."""
    made: list[Scheduler] = []

    def make(num_blocks=64, block_size=4, max_model_len=64, prefix_caching=True, **config) -> Scheduler:
        kv = KVCacheManager(num_blocks, block_size, prefix_caching)
        scheduler = Scheduler(SchedulerConfig(**config), kv, max_model_len)
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        assert not scheduler.has_unfinished_requests()
        assert scheduler.num_running == scheduler.num_waiting == 0
        kv = scheduler.kv_cache_manager
        assert kv.num_free_blocks == kv.num_blocks, "KV blocks leaked"


def make_request(req_id, num_prompt=8, *, start=0, priority=0, arrival=None, group=None, eos=None, **params):
    params.setdefault("max_tokens", 4)
    kwargs = {} if arrival is None else {"arrival_time": arrival}
    return Request(
        req_id, list(range(start, start + num_prompt)), SamplingParams(**params), eos_token_id=eos,
        priority=priority, group_id=group, **kwargs,
    )


def fake_run(out: SchedulerOutput, token=TOKEN, logprobs=False) -> ModelRunnerOutput:
    """Samples `token` for every request that reaches the end of its known tokens."""
    req_ids = [s.req_id for s in out.scheduled]
    sampled = [[token] if s.samples else [] for s in out.scheduled]
    lps = None
    if logprobs:
        lps = [[{token: Logprob(-0.5, rank=1)}] if s.samples else None for s in out.scheduled]
    return ModelRunnerOutput(req_ids, sampled, logprobs=lps)


def step(scheduler: Scheduler, **run_kw) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
    out = scheduler.schedule()
    assert out.num_scheduled_tokens <= scheduler.config.max_num_batched_tokens
    return out, scheduler.update_from_output(out, fake_run(out, **run_kw))


def run_to_end(scheduler: Scheduler, max_steps=500, **run_kw) -> dict[str, list[EngineCoreOutput]]:
    """Steps until nothing is left; checks each request got exactly one final output, and last."""
    outputs: dict[str, list[EngineCoreOutput]] = defaultdict(list)
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            break
        for o in step(scheduler, **run_kw)[1]:
            outputs[o.req_id].append(o)
    assert not scheduler.has_unfinished_requests(), "requests never finished"
    for req_id, outs in outputs.items():
        assert [o.finished for o in outs].count(True) == 1 and outs[-1].finished, req_id
    return outputs


def tokens_of(outs: list[EngineCoreOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def scheduled_tokens(out: SchedulerOutput) -> dict[str, int]:
    return {s.req_id: s.num_new_tokens for s in out.scheduled}


# -- batching ------------------------------------------------------------------------------------------
def test_continuous_batching_decode_and_prefill_in_one_step(make_scheduler):
    s = make_scheduler()
    a = make_request("a", 8)
    s.add_request(a)
    out, results = step(s)
    assert scheduled_tokens(out) == {"a": 8} and out.scheduled[0].start_pos == 0
    assert [(o.req_id, o.new_token_ids) for o in results] == [("a", [TOKEN])]
    assert a.metrics.first_scheduled_time is not None and a.metrics.first_token_time is not None
    s.add_request(make_request("b", 5, start=100))
    out, results = step(s)
    assert scheduled_tokens(out) == {"a": 1, "b": 5}
    assert [s_.start_pos for s_ in out.scheduled] == [8, 0]
    assert a.num_computed_tokens == 9 and a.output_token_ids == [TOKEN, TOKEN]
    outputs = run_to_end(s)
    assert outputs["a"][-1].finish_reason == "length" and a.num_output_tokens == 4
    assert len(tokens_of(outputs["b"])) == 3  # plus the one from the step above


def test_chunked_prefill_under_tiny_budget(make_scheduler):
    s = make_scheduler(max_num_batched_tokens=4)
    a = make_request("a", 10, max_tokens=2)
    s.add_request(a)
    chunks = []
    for _ in range(3):
        out = s.schedule()
        chunks.append((out.scheduled[0].start_pos, out.scheduled[0].num_new_tokens, out.scheduled[0].samples))
        s.update_from_output(out, fake_run(out))
        assert a.num_computed_tokens == chunks[-1][0] + chunks[-1][1]
    assert chunks == [(0, 4, False), (4, 4, False), (8, 2, True)]
    assert a.output_token_ids == [TOKEN]
    # A second request shares the budget with a's decode: 1 + 3.
    s.add_request(make_request("b", 6, start=50, max_tokens=1))
    out, _ = step(s)
    assert scheduled_tokens(out) == {"a": 1, "b": 3}
    outputs = run_to_end(s)
    assert outputs["b"][-1].finish_reason == "length"


def test_chunked_prefill_disabled_prompt_waits_for_room(make_scheduler):
    s = make_scheduler(max_num_batched_tokens=8, enable_chunked_prefill=False)
    s.add_request(make_request("a", 6, max_tokens=2))
    s.add_request(make_request("b", 5, start=50, max_tokens=2))
    out, _ = step(s)
    assert scheduled_tokens(out) == {"a": 6}  # b does not fit the 2 tokens left, and is not split
    out, _ = step(s)
    assert scheduled_tokens(out) == {"a": 1, "b": 5}
    run_to_end(s)
    with pytest.raises(ValueError, match="prompt has 9 tokens but max_num_batched_tokens is 8"):
        s.add_request(make_request("c", 9))


def test_max_num_seqs(make_scheduler):
    s = make_scheduler(max_num_seqs=2)
    for name in "abc":
        s.add_request(make_request(name, 4, max_tokens=2))
    out, _ = step(s)
    assert set(scheduled_tokens(out)) == {"a", "b"} and s.num_waiting == 1
    out, _ = step(s)  # a and b finish this step
    assert set(scheduled_tokens(out)) == {"a", "b"}
    out, _ = step(s)
    assert scheduled_tokens(out) == {"c": 4} and sorted(out.finished_req_ids) == ["a", "b"]
    run_to_end(s)


def test_priority_policy_admits_lower_value_first(make_scheduler):
    s = make_scheduler(max_num_seqs=1, policy="priority")
    s.add_request(make_request("low", 4, priority=5, max_tokens=1, arrival=1.0))
    s.add_request(make_request("high", 4, priority=0, max_tokens=1, arrival=2.0))
    out, _ = step(s)
    assert scheduled_tokens(out) == {"high": 4}
    run_to_end(s)


# -- preemption ----------------------------------------------------------------------------------------
def _preemption_run(s: Scheduler, requests: list[Request]) -> tuple[list[str], dict[str, list[EngineCoreOutput]]]:
    for r in requests:
        s.add_request(r)
    preempted: list[str] = []
    outputs: dict[str, list[EngineCoreOutput]] = defaultdict(list)
    while s.has_unfinished_requests():
        out, results = step(s)
        preempted += out.preempted_req_ids
        assert not set(out.preempted_req_ids) & set(scheduled_tokens(out))
        for o in results:
            outputs[o.req_id].append(o)
    return preempted, outputs


def test_preemption_fcfs_preempts_latest_arrival_and_recomputes_it(make_scheduler):
    # 6 blocks of 4; each request grows from 8 to 16 tokens (4 blocks): both cannot fit.
    s = make_scheduler(num_blocks=6)
    a, b = make_request("a", 8, max_tokens=8), make_request("b", 8, start=100, max_tokens=8)
    preempted, outputs = _preemption_run(s, [a, b])
    assert preempted and set(preempted) == {"b"}
    assert b.num_preemptions == len(preempted) and s.num_preemptions_total == len(preempted)
    assert a.num_preemptions == 0
    for r in (a, b):  # nothing dropped: both complete
        assert tokens_of(outputs[r.req_id]) == [TOKEN] * 8 and outputs[r.req_id][-1].finish_reason == "length"
        assert [o.finished for o in outputs[r.req_id]].count(True) == 1


def test_preemption_recomputes_prompt_and_outputs(make_scheduler):
    s = make_scheduler(num_blocks=6, prefix_caching=False)
    a, b = make_request("a", 8, max_tokens=8), make_request("b", 8, start=100, max_tokens=8)
    s.add_request(a)
    s.add_request(b)
    while not b.num_preemptions:
        out, _ = step(s)
    assert out.preempted_req_ids == ["b"] and b.status == RequestStatus.PREEMPTED
    assert b.num_computed_tokens == 0 and s.kv_cache_manager.get_block_ids("b") == []
    num_known = b.num_tokens
    while "b" not in scheduled_tokens(out):
        out, _ = step(s)
    resumed = next(x for x in out.scheduled if x.req_id == "b")
    assert (resumed.start_pos, resumed.num_new_tokens) == (0, num_known)  # prompt + outputs so far
    run_to_end(s)
    assert b.num_output_tokens == 8


def test_preemption_priority_preempts_lowest_priority(make_scheduler):
    s = make_scheduler(num_blocks=6, policy="priority")
    # "a" arrives first but has the lower priority (larger value): it is the one preempted.
    a = make_request("a", 8, max_tokens=8, priority=1, arrival=1.0)
    b = make_request("b", 8, start=100, max_tokens=8, priority=0, arrival=2.0)
    preempted, outputs = _preemption_run(s, [a, b])
    assert preempted and set(preempted) == {"a"} and b.num_preemptions == 0
    for r in (a, b):
        assert tokens_of(outputs[r.req_id]) == [TOKEN] * 8 and outputs[r.req_id][-1].finish_reason == "length"


def test_many_requests_small_cache_none_dropped(make_scheduler):
    s = make_scheduler(num_blocks=8, max_num_batched_tokens=16)
    reqs = [make_request(f"r{i}", 5 + i % 4, start=10 * i, max_tokens=6 + i % 5) for i in range(12)]
    for r in reqs:
        s.add_request(r)
    outputs = run_to_end(s)
    for r in reqs:
        assert len(tokens_of(outputs[r.req_id])) == r.sampling_params.max_tokens
    assert s.num_preemptions_total > 0


# -- prefix caching ------------------------------------------------------------------------------------
def test_prefix_hit_skips_computation(make_scheduler):
    s = make_scheduler()
    a = make_request("a", 12, max_tokens=2)
    s.add_request(a)
    run_to_end(s)
    b = make_request("b", 15, max_tokens=1)  # same first 12 tokens, then 3 more
    s.add_request(b)
    out, results = step(s)
    assert (out.scheduled[0].start_pos, out.scheduled[0].num_new_tokens) == (12, 3)
    assert b.num_cached_tokens == 12 and results[0].num_cached_tokens == 12
    kv = s.kv_cache_manager
    assert kv.prefix_cache_hits == 12 and kv.prefix_cache_queries == 12 + 15
    run_to_end(s)


def test_prefix_hit_never_whole_prompt(make_scheduler):
    s = make_scheduler()
    s.add_request(make_request("a", 8, max_tokens=1))
    run_to_end(s)
    b = make_request("b", 8, max_tokens=1)
    s.add_request(b)
    out = s.schedule()
    assert (out.scheduled[0].start_pos, out.scheduled[0].num_new_tokens) == (4, 4)
    assert out.scheduled[0].samples
    s.update_from_output(out, fake_run(out))
    run_to_end(s)


def test_n_samples_share_prompt_blocks(make_scheduler):
    s = make_scheduler()
    # Two samples of one 10-token prompt, then an unrelated request that must not be held up.
    s1, s2 = make_request("0_p", 10, group="p"), make_request("1_p", 10, group="p")
    other = make_request("c", 5, start=100)
    for r in (s1, s2, other):
        s.add_request(r)
    out, _ = step(s)
    assert scheduled_tokens(out) == {"0_p": 10, "c": 5}  # 1_p waits for 0_p's prompt
    out, _ = step(s)
    assert scheduled_tokens(out) == {"0_p": 1, "c": 1, "1_p": 2}  # hit the 2 full prompt blocks
    assert s2.num_cached_tokens == 8
    kv = s.kv_cache_manager
    assert kv.get_block_ids("0_p")[:2] == kv.get_block_ids("1_p")[:2]
    outputs = run_to_end(s)
    assert s1.output_token_ids == s2.output_token_ids == [TOKEN] * 4
    assert outputs["1_p"][-1].finish_reason == "length"


def test_prompt_logprobs_disable_prefix_hits_and_are_kept_once(make_scheduler):
    s = make_scheduler()
    s.add_request(make_request("a", 8, max_tokens=1))
    run_to_end(s)
    b = make_request("b", 8, max_tokens=2, prompt_logprobs=1)
    s.add_request(b)
    out = s.schedule()
    assert (out.scheduled[0].start_pos, out.scheduled[0].num_new_tokens) == (0, 8)
    entries = [None] + [{i: Logprob(-1.0)} for i in range(1, 8)]
    runner = fake_run(out)
    runner.prompt_logprobs = {"b": entries}
    results = s.update_from_output(out, runner)
    assert results[0].new_prompt_logprobs == entries and b.prompt_logprobs == entries
    outputs = run_to_end(s)
    assert all(o.new_prompt_logprobs is None for o in outputs["b"])


# -- stop conditions -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("request_kw", "num_tokens", "finish_reason", "stop_reason"),
    [
        ({"eos": TOKEN}, 1, "stop", None),
        ({"eos": TOKEN, "min_tokens": 3}, 3, "stop", None),
        ({"eos": TOKEN, "ignore_eos": True}, 4, "length", None),
        ({"stop_token_ids": [TOKEN]}, 1, "stop", TOKEN),
        ({"stop_token_ids": [TOKEN], "min_tokens": 2}, 2, "stop", TOKEN),
        ({"stop_token_ids": [99]}, 4, "length", None),
        ({"max_tokens": 3}, 3, "length", None),
        ({"max_tokens": None}, 4, "length", None),  # max_model_len 12 - prompt 8
        ({"max_tokens": 100}, 4, "length", None),
    ],
)
def test_stop_conditions(make_scheduler, request_kw, num_tokens, finish_reason, stop_reason):
    s = make_scheduler(max_model_len=12)
    r = make_request("a", 8, **request_kw)
    s.add_request(r)
    outputs = run_to_end(s)["a"]
    assert tokens_of(outputs) == [TOKEN] * num_tokens
    assert (outputs[-1].finish_reason, outputs[-1].stop_reason) == (finish_reason, stop_reason)
    assert r.metrics.finished_time is not None and r.num_tokens <= 12


def test_generation_eos_ids_stop(make_scheduler):
    s = make_scheduler()
    params = SamplingParams(max_tokens=5)
    params.all_stop_token_ids = {TOKEN}
    s.add_request(Request("a", [1, 2, 3], params))
    outputs = run_to_end(s)["a"]
    assert tokens_of(outputs) == [TOKEN] and outputs[-1].finish_reason == "stop"


def test_logprobs_accumulate(make_scheduler):
    s = make_scheduler()
    r = make_request("a", 4, max_tokens=3, logprobs=0)
    s.add_request(r)
    outputs = run_to_end(s, logprobs=True)["a"]
    assert all(len(o.new_logprobs) == len(o.new_token_ids) for o in outputs)
    assert len(r.logprobs) == 3 and r.cumulative_logprob == pytest.approx(-1.5)


def test_cache_capacity_caps_generation(make_scheduler):
    # 3 blocks of 4 = 12 tokens of KV: the sequence stops with "length" instead of livelocking.
    s = make_scheduler(num_blocks=3, max_model_len=100)
    r = make_request("a", 8, max_tokens=50)
    s.add_request(r)
    outputs = run_to_end(s)["a"]
    assert outputs[-1].finish_reason == "length" and r.num_tokens == 12


# -- finishing from outside ----------------------------------------------------------------------------
def test_abort_waiting_and_running_requests(make_scheduler):
    s = make_scheduler(max_num_seqs=1)
    running, waiting, other = make_request("run", 8), make_request("wait", 8), make_request("other", 4)
    for r in (running, waiting, other):
        s.add_request(r)
    step(s)
    assert running.status == RequestStatus.RUNNING and waiting.status == RequestStatus.WAITING
    s.finish_requests(["run", "wait", "unknown"], RequestStatus.FINISHED_ABORTED)
    s.finish_requests("run", RequestStatus.FINISHED_ABORTED)  # already finished: ignored
    assert s.kv_cache_manager.get_block_ids("run") == []
    assert s.get_request("run") is None and running.finish_reason == "abort"
    out, results = step(s)
    assert sorted(out.finished_req_ids) == ["run", "wait"]
    finals = {o.req_id: o for o in results if o.finished}
    assert finals["run"].finish_reason == finals["wait"].finish_reason == "abort"
    assert finals["run"].new_token_ids == []
    outputs = run_to_end(s)
    assert "run" not in outputs and "wait" not in outputs  # no second final output
    assert outputs["other"][-1].finish_reason == "length"


def test_abort_last_request_still_delivers_final_output(make_scheduler):
    s = make_scheduler()
    s.add_request(make_request("a", 4))
    step(s)
    s.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert s.has_unfinished_requests()  # until the final output is handed out
    out, results = step(s)
    assert out.is_empty and [(o.req_id, o.finish_reason) for o in results] == [("a", "abort")]
    assert not s.has_unfinished_requests()


def test_abort_during_step_and_stop_string_stop(make_scheduler):
    s = make_scheduler()
    a, b = make_request("a", 8), make_request("b", 8, start=50)
    s.add_request(a)
    s.add_request(b)
    step(s)
    out = s.schedule()
    s.finish_requests("a", RequestStatus.FINISHED_ABORTED)  # while the step runs
    results = s.update_from_output(out, fake_run(out))
    assert [(o.req_id, o.finish_reason) for o in results] == [("a", "abort"), ("b", None)]
    assert a.output_token_ids == [TOKEN]  # the aborted step's token is dropped
    b.stop_reason = "END"  # e.g. the detokenizer found a stop string
    s.finish_requests(["b"], RequestStatus.FINISHED_STOPPED)
    outputs = run_to_end(s)
    assert [(o.finish_reason, o.stop_reason) for o in outputs["b"]] == [("stop", "END")]


def test_abort_preempted_request(make_scheduler):
    s = make_scheduler(num_blocks=6)
    a, b = make_request("a", 8, max_tokens=8), make_request("b", 8, start=100, max_tokens=8)
    s.add_request(a)
    s.add_request(b)
    while not b.num_preemptions:
        step(s)
    s.finish_requests("b", RequestStatus.FINISHED_ABORTED)
    outputs = run_to_end(s)
    assert [o.finish_reason for o in outputs["b"]] == ["abort"]
    assert outputs["a"][-1].finish_reason == "length"


# -- bad input -----------------------------------------------------------------------------------------
def test_bad_input_is_rejected_with_what_to_fix(make_scheduler):
    s = make_scheduler(num_blocks=4, max_model_len=64)
    with pytest.raises(ValueError, match="prompt is empty"):
        s.add_request(make_request("e", 0))
    with pytest.raises(ValueError, match=r"prompt has 64 tokens but the context length \(max_model_len\) is 64"):
        s.add_request(make_request("long", 64))
    with pytest.raises(ValueError, match="prompt has 17 tokens but the whole KV cache holds only 16 tokens"):
        s.add_request(make_request("big", 17))
    s.add_request(make_request("a", 4))
    with pytest.raises(ValueError, match="request id 'a' is already in use"):
        s.add_request(make_request("a", 4))
    with pytest.raises(ValueError, match="finished status"):
        s.finish_requests("a", RequestStatus.RUNNING)
    assert s.num_waiting == 1
    run_to_end(s)
