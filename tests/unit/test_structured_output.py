"""Structured output without a model: params validation, the bitmask's application, the scheduler's hooks with a
fake grammar, the manager with a real xgrammar on the default tokenizer's vocabulary, and the OpenAI field mapping."""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

import pytest
import torch

from tests.unit.test_scheduler import make_request, make_scheduler, run_to_end, step  # noqa: F401
from tokenmill.engine.request import RequestStatus
from tokenmill.entrypoints.openai.inputs import RequestError
from tokenmill.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from tokenmill.entrypoints.openai.structured import chat_constraint, structured_outputs_of, tool_calls_of
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured.bitmask import GrammarBitmask, allowed, apply_token_bitmask
from tokenmill.structured.params import StructuredOutputsParams
from tokenmill.worker.sampler import SamplingMetadata, sample


# -- params ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{}, {"regex": "a", "choice": ["b"]}, {"json": "{not json"}, {"json": [1]},
                                    {"choice": []}, {"choice": [1]}, {"regex": ""}, {"strict": "yes", "regex": "a"}])
def test_params_need_exactly_one_valid_kind(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="structured_outputs"):
        StructuredOutputsParams(**kwargs)


def test_params_key_keeps_property_order_and_sampling_params_validate() -> None:
    a = StructuredOutputsParams(json={"properties": {"b": {}, "a": {}}})
    assert a.key == StructuredOutputsParams(json='{"properties": {"b": {}, "a": {}}}').key
    assert a.key != StructuredOutputsParams(json={"properties": {"a": {}, "b": {}}}).key
    assert StructuredOutputsParams(json_object=True).kind == "json_object"
    with pytest.raises(ValueError, match="structured_outputs must be"):
        SamplingParams(structured_outputs={"regex": "a"})  # type: ignore[arg-type]


# -- bitmask --------------------------------------------------------------------------------------------------------
def test_bitmask_application_matches_xgrammar() -> None:
    xgr = pytest.importorskip("xgrammar")
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 40), dtype=torch.int32, generator=gen)
    logits = torch.randn(5, 1270, generator=gen)
    rows = torch.tensor([4, 0, 2])
    expected = logits[rows].clone()
    xgr.apply_token_bitmask_inplace(expected, bitmask, vocab_size=1270)
    ours = logits.clone()
    apply_token_bitmask(ours, bitmask, rows)
    assert torch.equal(ours[rows], expected) and torch.equal(ours[[1, 3]], logits[[1, 3]])
    ids = torch.randint(0, 1270, (3,), generator=gen)
    assert torch.equal(allowed(bitmask, ids), torch.isfinite(expected.gather(1, ids[:, None]).squeeze(1)))


def test_sampler_masks_only_grammar_rows_and_keeps_raw_logprobs() -> None:
    class Row:
        def __init__(self, req_id: str, **params: Any) -> None:
            self.req_id, self.sampling_params = req_id, SamplingParams(**params)
            self.eos_token_id, self.all_token_ids, self.output_token_ids, self.num_output_tokens = None, [1], [], 0

    logits = torch.zeros(2, 64)
    logits[:, 5] = 10.0  # the unconstrained favourite
    only_token_9 = torch.zeros(1, 2, dtype=torch.int32)
    only_token_9[0, 0] = 1 << 9
    md = SamplingMetadata.from_requests([Row("a", temperature=0.0), Row("b", temperature=0.0)], 64, "cpu")
    assert md.argmax_only
    md.set_grammar(GrammarBitmask(["b"], only_token_9), ["a", "b"])
    assert not md.argmax_only and md.grammar_rows.tolist() == [1]
    assert sample(logits, md).tolist() == [5, 9]
    assert logits[1, 5] == 10.0  # the sampler's input (logprobs' source) is untouched


# -- scheduler hooks ------------------------------------------------------------------------------------------------
class FakeGrammar:
    """A grammar that compiles when told and ends after `length` tokens."""

    def __init__(self, length: int) -> None:
        self.ready, self.length, self.accepted, self.terminated = False, length, [], False

    def is_ready(self) -> bool:
        return self.ready

    def accept(self, token_id: int) -> None:
        self.accepted.append(token_id)
        self.terminated = len(self.accepted) >= self.length


def test_waiting_for_a_grammar_keeps_the_place_then_stops_when_it_ends(make_scheduler) -> None:  # noqa: F811
    s = make_scheduler(max_num_seqs=8)
    constrained = make_request("g", max_tokens=10, ignore_eos=True)
    constrained.grammar = FakeGrammar(length=3)
    s.add_request(constrained)
    s.add_request(make_request("plain", start=100, max_tokens=2))
    out, _ = step(s)
    assert [r.req_id for r in out.scheduled] == ["plain"] and [r.req_id for r in s.waiting] == ["g"]
    constrained.grammar.ready = True
    outputs = run_to_end(s)
    assert constrained.grammar.accepted == [7, 7, 7]
    assert outputs["g"][-1].finish_reason == "stop" and constrained.status == RequestStatus.FINISHED_STOPPED


# -- manager (real xgrammar, default tokenizer) ---------------------------------------------------------------------
def test_manager_compiles_once_fills_masks_and_fails_bad_grammars(default_loaded: Any) -> None:
    pytest.importorskip("xgrammar")
    from tokenmill.engine.request import Request
    from tokenmill.engine.scheduler_output import ScheduledRequest
    from tokenmill.structured.manager import StructuredOutputManager

    tok = default_loaded.tokenizer
    manager = StructuredOutputManager(tok, default_loaded.hf_config.vocab_size, [tok.eos_token_id])
    params = SamplingParams(structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    requests = [Request(f"r{i}", [1, 2, 3], params) for i in range(2)] + [Request("plain", [1], SamplingParams())]
    for r in requests:
        manager.add_request(r)
    assert requests[2].grammar is None and requests[0].grammar.compiled is requests[1].grammar.compiled
    deadline = time.monotonic() + 10
    while not all(r.grammar.is_ready() for r in requests[:2]):
        assert time.monotonic() < deadline
        manager.wait_for_compiles(0.05)
    grammar = manager.grammar_bitmask([ScheduledRequest(r, 0, r.num_tokens, []) for r in requests])
    assert grammar.req_ids == ["r0", "r1"] and grammar.bitmask.shape == (2, (len(tok) + 31) // 32)
    yes = tok.encode("yes", add_special_tokens=False)
    assert allowed(grammar.bitmask, torch.tensor([yes[0]] * 2)).all()
    assert not allowed(grammar.bitmask, torch.tensor([tok.eos_token_id] * 2)).any()
    for token in yes:
        requests[0].grammar.accept(token)
    assert not requests[0].grammar.terminated
    requests[0].grammar.accept(tok.eos_token_id)
    assert requests[0].grammar.terminated
    # A compilation that fails (past the request-time check) fails its request.
    broken = Request("broken", [1], SamplingParams())
    broken.grammar = type(requests[0].grammar)("broken", _failed_future())
    manager._compiling.append(broken)
    assert manager.failed_requests() == ["broken"] and not broken.grammar.is_ready()
    manager.close()


def _failed_future() -> Future:
    future: Future = Future()
    future.set_exception(ValueError("boom"))
    return future


# -- OpenAI request fields -----------------------------------------------------------------------------------------
def test_openai_fields_map_to_one_constraint() -> None:
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": False}}})
    assert structured_outputs_of(chat) == StructuredOutputsParams(json=schema, strict=False)
    completion = CompletionRequest.model_validate({"prompt": "x", "structured_outputs": {"regex": "a+"}})
    assert structured_outputs_of(completion) == StructuredOutputsParams(regex="a+")
    assert structured_outputs_of(CompletionRequest(prompt="x", guided_choice=["a"])).choice == ["a"]
    with pytest.raises(RequestError) as info:
        structured_outputs_of(CompletionRequest(prompt="x", guided_regex="a", guided_choice=["a"]))
    assert info.value.param == "guided_choice"


def test_tool_plans_and_their_calls() -> None:
    pytest.importorskip("xgrammar")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "tools": [tool],
                                                 "tool_choice": "required"})
    plan, constraint = chat_constraint(body)
    assert plan.name is None and constraint.json["type"] == "array"
    (call,) = tool_calls_of(plan, '[{"name": "f", "parameters": {"q": 1}}]')
    assert call.function.name == "f" and call.function.arguments == '{"q": 1}'
    assert tool_calls_of(plan, '[{"name": "f", "param') is None
    named = body.model_copy(update={"tool_choice": {"type": "function", "function": {"name": "f"}}})
    plan, _ = chat_constraint(named)
    assert tool_calls_of(plan, '{"q": 2}')[0].function.arguments == '{"q": 2}'
    assert chat_constraint(body.model_copy(update={"tool_choice": "none"})) == (None, None)


def test_masked_greedy_recomputes_only_rows_whose_raw_argmax_the_mask_forbids() -> None:
    """The runner's greedy fast path under grammar masks (ModelRunner._masked_greedy) gives the argmax of the masked
    logits, computing logits only for the masked rows whose raw argmax is forbidden."""
    from tokenmill.worker.model_runner import ModelRunner
    from tokenmill.worker.sampling_metadata import SamplingMetadata

    vocab, rows = 70, 4
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, 8, generator=gen)
    hidden = torch.randn(6, 8, generator=gen)
    sample_rows = torch.tensor([1, 2, 4, 5])
    computed: list[int] = []

    class FakeModel:
        def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
            computed.append(h.shape[0])
            return h @ weight.T

    raw = FakeModel().compute_logits(hidden[sample_rows]).argmax(-1)
    computed.clear()
    # Rows 0 and 2 are masked: row 0's mask allows its raw argmax, row 2's forbids it (and allows a few others).
    bitmask = torch.zeros(2, 3, dtype=torch.int32)
    for mask_row, row, keep_argmax in ((0, 0, True), (1, 2, False)):
        allowed_ids = [3, 17, 40, 66] + ([int(raw[row])] if keep_argmax else [])
        for t in allowed_ids:
            if t != int(raw[row]) or keep_argmax:
                bitmask[mask_row, t // 32] |= 1 << (t % 32)
    from tokenmill.worker.request_states import RequestState

    greedy = RequestState("r", [1], [1], SamplingParams(temperature=0.0), None, [0])
    md = SamplingMetadata.from_requests([greedy] * rows, vocab, torch.device("cpu"))
    md.grammar_bitmask, md.grammar_rows = bitmask, torch.tensor([0, 2])
    runner = object.__new__(ModelRunner)
    runner.model = FakeModel()
    got = runner._masked_greedy(hidden[sample_rows], raw.clone(), md)
    full = hidden[sample_rows] @ weight.T
    apply_token_bitmask(full, bitmask, torch.tensor([0, 2]))
    assert got.tolist() == full.argmax(-1).tolist()
    assert got[0] == raw[0] and got[2] != raw[2] and got[1] == raw[1]
    assert computed == [1]  # only row 2's logits
