"""Speculative decoding's plain-Python parts: n-gram lookup, verification, the config, and the scheduler with the
governor (draft slots in the token budget, acceptance, rollback) against a fake runner."""

from __future__ import annotations

import pytest

from tokenmill.config import EngineConfig, SchedulerConfig
from tokenmill.engine.kv_cache_manager import KVCacheManager
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.scheduler_output import SchedulerOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec.config import SpeculativeConfig, parse_speculative_config
from tokenmill.spec.governor import PAUSE_STEPS, SpeculationGovernor
from tokenmill.spec.ngram import ngram_proposal
from tokenmill.spec.verify import DraftRowView, accepted_tokens
from tokenmill.worker.request_states import RequestState, StepRequest
from tokenmill.worker.runner_output import ModelRunnerOutput


# -- n-gram lookup ---------------------------------------------------------------------------------------------
def test_ngram_continues_the_latest_earlier_occurrence_of_the_longest_suffix() -> None:
    tokens = [1, 2, 3, 4, 9, 9, 2, 3, 5, 6, 7, 8, 1, 2, 3]
    # Suffix [1, 2, 3] occurred at 0 (followed by 4, 9, 9); [2, 3] also at 6, but the longer match wins.
    assert ngram_proposal(tokens, 3, 1, 3) == [4, 9, 9]
    assert ngram_proposal(tokens, 3, 1, 2) == [5, 6, 7]  # the latest occurrence of [2, 3]
    assert ngram_proposal(tokens, 10, 1, 3) == [4, 9, 9, 2, 3, 5, 6, 7, 8, 1]


def test_ngram_without_a_match_proposes_nothing() -> None:
    assert ngram_proposal([1, 2, 3, 4], 3, 1, 3) == []
    assert ngram_proposal([5, 6, 5], 3, 2, 3) == []  # [6, 5] never occurred before; min_n = 2
    assert ngram_proposal([5, 6, 5], 3, 1, 3) == [6, 5]
    assert ngram_proposal([7], 3, 1, 3) == []
    assert ngram_proposal([1, 2, 1], 0, 1, 3) == []


def test_ngram_ignores_byte_matches_across_token_boundaries() -> None:
    # As int32 little-endian bytes, 256 is 00 01 00 00 and 1 is 01 00 00 00: [256, 0] contains the bytes of [1] at an
    # offset that is not a token boundary.
    assert ngram_proposal([256, 0, 1], 2, 1, 1) == []
    assert ngram_proposal([256, 0, 1, 4, 1], 2, 1, 1) == [4, 1]


# -- verification ----------------------------------------------------------------------------------------------
def test_accepted_tokens_is_the_target_run_up_to_the_first_mismatch() -> None:
    assert accepted_tokens([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]  # all accepted, plus the target's next
    assert accepted_tokens([5, 6, 7], [5, 9, 7, 8]) == [5, 9]  # the target's token replaces the first wrong draft
    assert accepted_tokens([5], [4, 3]) == [4]


def test_draft_row_view_sees_the_drafts_as_outputs() -> None:
    state = RequestState("r", [1, 2], [1, 2, 3], SamplingParams(), 0, [0])
    view = DraftRowView(state, [4, 5])
    assert view.all_token_ids == [1, 2, 3, 4, 5]
    assert view.output_token_ids == [3, 4, 5]
    assert view.num_output_tokens == 3
    step = StepRequest(state, 2, 1, num_spec_tokens=2)
    step.add_drafts([8, 9])
    assert (step.token_ids, step.num_new_tokens, step.samples, step.num_sampled_rows) == ([3, 8, 9], 3, True, 3)
    with pytest.raises(ValueError, match="speculative slots"):
        step.add_drafts([1])


# -- config --------------------------------------------------------------------------------------------------
def test_speculative_config_parses_vllm_json_and_names_what_is_wrong() -> None:
    spec = parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}')
    assert spec == SpeculativeConfig("ngram", 3, prompt_lookup_max=5)
    assert EngineConfig.from_kwargs(speculative_config={"method": "ngram", "num_speculative_tokens": 2}).speculative.spec
    for bad, message in [
        ("{", "not valid JSON"), ('{"method": "ngram"}', "num_speculative_tokens"),
        ('{"method": "eagle", "num_speculative_tokens": 2}', "method"),
        ('{"method": "ngram", "num_speculative_tokens": 0}', r"\[1, 16\]"),
        ('{"method": "draft_model", "num_speculative_tokens": 2}', "model"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "typo": 1}', "unknown keys"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2}',
         "prompt_lookup_min"),
    ]:
        with pytest.raises(ValueError, match=message):
            EngineConfig.from_kwargs(speculative_config=bad)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig.from_kwargs(speculative_config={"method": "draft_model", "model": "x", "num_speculative_tokens": 2},
                                 tensor_parallel_size=2)


def test_self_draft_is_the_targets_own_checkpoint(tmp_path) -> None:
    def draft(model: str) -> SpeculativeConfig:
        return SpeculativeConfig("draft_model", 2, model=model, quantization="int4")

    assert draft("default").is_self_draft(None)
    assert not draft("default").is_self_draft(str(tmp_path))
    assert not draft(str(tmp_path)).is_self_draft(None)
    assert draft(str(tmp_path)).is_self_draft(str(tmp_path) + "/")
    assert not draft(str(tmp_path / "other")).is_self_draft(str(tmp_path))
    assert not SpeculativeConfig("ngram", 2).is_self_draft(None)


# -- scheduler with the governor ---------------------------------------------------------------------------------
def _scheduler(k: int = 3, num_blocks: int = 64, **spec) -> Scheduler:
    governor = SpeculationGovernor(SpeculativeConfig("ngram", k, **spec))
    return Scheduler(SchedulerConfig(max_num_batched_tokens=64), KVCacheManager(num_blocks, 4), 64, governor)


def _request(req_id: str, max_tokens: int = 16, **params) -> Request:
    return Request(req_id, list(range(10, 18)), SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params))


def _verified(out: SchedulerOutput, accept: dict[str, int]) -> ModelRunnerOutput:
    """A fake runner that drafted every slot and had accept[req_id] of them accepted (tokens 100, 101, ...)."""
    req_ids, sampled, drafted = [], [], []
    for s in out.scheduled:
        req_ids.append(s.req_id)
        drafted.append(s.num_spec_tokens)
        n = min(accept.get(s.req_id, 0), s.num_spec_tokens) + 1 if s.samples else 0
        sampled.append([100 + j for j in range(n)])
    return ModelRunnerOutput(req_ids, sampled, num_draft_tokens=drafted)


def test_draft_slots_are_in_the_budget_and_rejected_ones_roll_back() -> None:
    scheduler = _scheduler(k=3)
    request = _request("a")
    scheduler.add_request(request)
    out = scheduler.schedule()
    assert [s.num_spec_tokens for s in out.scheduled] == [0]  # the prompt: no drafts
    scheduler.update_from_output(out, _verified(out, {}))
    out = scheduler.schedule()
    (s,) = out.scheduled
    assert (s.num_new_tokens, s.num_spec_tokens, s.start_pos) == (4, 3, 8)
    assert len(s.block_ids) == 3  # slots for positions 8..11
    (core_out,) = scheduler.update_from_output(out, _verified(out, {"a": 1}))
    assert core_out.new_token_ids == [100, 101] and (core_out.num_draft_tokens, core_out.num_accepted_tokens) == (3, 1)
    # Positions 8 (the last known token) and 9 (the accepted draft) hold the target's K/V; 10 and 11 rolled back.
    assert request.num_computed_tokens == 10 and request.num_tokens == 11
    assert scheduler.governor.stats.accepted_by_position == [1, 0, 0]
    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    scheduler.update_from_output(scheduler.schedule(), ModelRunnerOutput([], []))
    assert scheduler.kv_cache_manager.num_free_blocks == 64


def test_slots_never_outrun_max_tokens_and_the_governor_adapts() -> None:
    scheduler = _scheduler(k=4, min_acceptance_rate=0.5)
    request = _request("a", max_tokens=16)
    scheduler.add_request(request)
    out = scheduler.schedule()
    scheduler.update_from_output(out, _verified(out, {}))  # 1 output token
    slots = []
    while not request.is_finished:
        out = scheduler.schedule()
        slots.append(out.scheduled[0].num_spec_tokens)
        scheduler.update_from_output(out, _verified(out, {"a": 0}))  # nothing accepted
    # 4, halved below 50% acceptance, then a pause of PAUSE_STEPS after one rejected draft, then a probe.
    assert slots == [4, 2, 1] + [0] * PAUSE_STEPS + [1] + [0] * 3
    assert request.num_output_tokens == 16
    scheduler = _scheduler(k=4)
    request = _request("b", max_tokens=4)
    scheduler.add_request(request)
    slots = []
    while not request.is_finished:
        out = scheduler.schedule()
        slots.append(out.scheduled[0].num_spec_tokens)
        scheduler.update_from_output(out, _verified(out, {"b": 1}))
    assert slots == [0, 2, 0]  # capped by the 4 - outputs - 1 tokens left


def test_large_batches_do_not_speculate_and_low_acceptance_halves() -> None:
    scheduler = _scheduler(k=3, disable_by_batch_size=2)
    for name in "abc":
        scheduler.add_request(_request(name, max_tokens=40))
    out = scheduler.schedule()
    scheduler.update_from_output(out, _verified(out, {}))
    out = scheduler.schedule()
    assert [s.num_spec_tokens for s in out.scheduled] == [0, 0, 0]  # three decoding > 2
    scheduler.update_from_output(out, _verified(out, {}))
    scheduler.finish_requests("c", RequestStatus.FINISHED_ABORTED)
    out = scheduler.schedule()
    assert [s.num_spec_tokens for s in out.scheduled] == [3, 3]
    scheduler.update_from_output(out, _verified(out, {"a": 0, "b": 3}))
    out = scheduler.schedule()
    assert [s.num_spec_tokens for s in out.scheduled] == [1, 3]  # a: acceptance 0 < 0.3 halves 3 to 1
    scheduler.update_from_output(out, _verified(out, {"a": 1, "b": 3}))
    out = scheduler.schedule()
    assert [s.num_spec_tokens for s in out.scheduled] == [2, 3]  # a: all accepted: one more
    scheduler.finish_requests(["a", "b"], RequestStatus.FINISHED_ABORTED)
    scheduler.update_from_output(out, ModelRunnerOutput([], []))
    assert scheduler.kv_cache_manager.num_free_blocks == 64
