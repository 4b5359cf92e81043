"""Structured output on a tiny random checkpoint: the grammar, not the model, makes the output valid.

- greedy constrained output equals a reference loop (the HF model + an xgrammar matcher masking each step),
  with constrained and unconstrained requests in one batch, under chunked prefill and prefix hits;
- property test: over generated schemas (objects, arrays, enums, nesting, bounded numbers), every output that
  finishes with "stop" parses and validates, greedy and sampled, beside unconstrained requests;
- offline errors are ValueErrors; a grammar that ends stops the request even under ignore_eos.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenmill import LLM, SamplingParams, StructuredOutputsParams
from tokenmill.structured.grammar import tokenizer_info

SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                   "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 1, "maxItems": 3},
                   "ok": {"type": "boolean"}},
    "required": ["id", "tags", "ok"],
}


@pytest.fixture(scope="module")
def setup(tiny_checkpoint: Any) -> tuple[str, list[list[int]]]:
    path = tiny_checkpoint("llama")
    gen = torch.Generator().manual_seed(5)
    shared = torch.randint(3, 40000, (40,), generator=gen).tolist()  # 5 full blocks of 8
    prompts = [shared + torch.randint(3, 40000, (n,), generator=gen).tolist() for n in (3, 21)]
    prompts.append(torch.randint(3, 40000, (30,), generator=gen).tolist())
    return str(path), prompts


@pytest.fixture(scope="module")
def llm(setup: tuple[str, list[list[int]]]) -> LLM:
    return LLM(dtype="float32", model=setup[0], block_size=8, kv_cache_memory=16 << 20, max_num_batched_tokens=16)


@torch.inference_mode()
def _reference(path: str, prompt: list[int], params: StructuredOutputsParams, max_tokens: int) -> list[int]:
    """Greedy decoding by the HF model, each step's logits masked by an xgrammar matcher."""
    import xgrammar as xgr
    from transformers import AutoModelForCausalLM

    from tokenmill.loader import load_model
    from tokenmill.structured.grammar import grammar_of_key

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    loaded = load_model(path)
    info = tokenizer_info(loaded.tokenizer, model.config.vocab_size, [2])
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_grammar(grammar_of_key(params.key)))
    bitmask = xgr.allocate_token_bitmask(1, model.config.vocab_size)
    out = model(torch.tensor([prompt]), use_cache=True)
    ids: list[int] = []
    while len(ids) < max_tokens and not matcher.is_terminated():
        logits = out.logits[0, -1:].float().clone()
        matcher.fill_next_token_bitmask(bitmask)
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        token = int(logits.argmax())
        assert matcher.accept_token(token)
        ids.append(token)
        out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return ids


def test_greedy_equals_masked_reference_in_a_mixed_batch(setup: tuple[str, list[list[int]]], llm: LLM) -> None:
    path, prompts = setup
    constraint = StructuredOutputsParams(json=SCHEMA)
    constrained = SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=constraint)
    plain = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    # The first request fills the prefix cache; the batch after it hits it (40 tokens) and is chunked (16 a step).
    first = llm.generate([prompts[0]], constrained, use_tqdm=False)[0]
    batch = llm.generate(prompts[1:] + [prompts[0]], [constrained, plain, plain], use_tqdm=False)
    assert batch[0].num_cached_tokens == 40
    assert batch[1].outputs[0].finish_reason == "length" and len(batch[1].outputs[0].token_ids) == 10
    for prompt, output in ((prompts[0], first), (prompts[1], batch[0])):
        completion = output.outputs[0]
        assert completion.token_ids == _reference(path, prompt, constraint, 40)
        if completion.finish_reason == "stop":
            jsonschema.validate(json.loads(completion.text), SCHEMA)
    kv = llm.engine.core.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks


def test_a_finished_grammar_stops_even_under_ignore_eos(llm: LLM, setup: tuple[str, list[list[int]]]) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(choice=["alpha", "beta"]))
    (output,) = llm.generate([setup[1][2]], params, use_tqdm=False)
    assert output.outputs[0].finish_reason == "stop" and output.outputs[0].text in ("alpha", "beta")


def test_offline_errors_are_value_errors(llm: LLM) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="structured_outputs.json: invalid JSON schema"):
        llm.generate(["hi"], SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "nonsense"})),
                     use_tqdm=False)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=1, structured_outputs=StructuredOutputsParams(regex="a+"))


# -- property test over generated schemas -------------------------------------------------------------------------
_LEAVES = st.one_of(
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-50, 50), st.integers(0, 200)),
    st.builds(lambda lo, span: {"type": "number", "minimum": lo, "maximum": lo + span},
              st.integers(-10, 10), st.integers(1, 100)),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
    st.builds(lambda values: {"enum": values}, st.lists(st.sampled_from(["a", "b", "c", 1, 2, None]), min_size=1,
                                                        max_size=3, unique=True)),
    st.just({"type": "boolean"}),
)


def _objects(children: st.SearchStrategy) -> st.SearchStrategy:
    names = st.lists(st.sampled_from(["k", "v", "id", "x", "name"]), min_size=1, max_size=3, unique=True)
    return names.flatmap(lambda keys: st.tuples(*[children] * len(keys)).map(
        lambda values: {"type": "object", "properties": dict(zip(keys, values)), "required": list(keys)}))


def _arrays(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.builds(lambda item, lo, extra: {"type": "array", "items": item, "minItems": lo, "maxItems": lo + extra},
                     children, st.integers(0, 2), st.integers(0, 2))


SCHEMAS = st.recursive(_LEAVES, lambda children: st.one_of(_objects(children), _arrays(children)), max_leaves=5)


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(schemas=st.lists(SCHEMAS, min_size=2, max_size=2))
def test_generated_schemas_always_validate(llm: LLM, setup: tuple[str, list[list[int]]],
                                           schemas: list[dict[str, Any]]) -> None:
    prompts = setup[1]
    params = [
        SamplingParams(temperature=0.0, max_tokens=48, structured_outputs=StructuredOutputsParams(json=schemas[0])),
        SamplingParams(temperature=1.0, seed=7, max_tokens=48,
                       structured_outputs=StructuredOutputsParams(json=schemas[1])),
        SamplingParams(temperature=0.8, max_tokens=6, ignore_eos=True),  # unconstrained beside them
    ]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for schema, output in zip(schemas, outputs[:2]):
        completion = output.outputs[0]
        if completion.finish_reason == "stop":
            jsonschema.validate(json.loads(completion.text), schema)
        else:
            assert completion.finish_reason == "length" and len(completion.token_ids) == 48
    assert len(outputs[2].outputs[0].token_ids) == 6


def test_most_generated_outputs_finish(llm: LLM, setup: tuple[str, list[list[int]]]) -> None:
    """The property test's schemas are small enough that most outputs end within max_tokens."""
    schemas = [SCHEMA, {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 2},
               {"type": "object", "properties": {"x": {"enum": ["a", None]}}, "required": ["x"]}]
    params = [SamplingParams(temperature=t, seed=1, max_tokens=48, structured_outputs=StructuredOutputsParams(json=s))
              for s in schemas for t in (0.0, 1.0)]
    outputs = llm.generate([setup[1][2]] * len(params), params, use_tqdm=False)
    finished = [o.outputs[0] for o in outputs if o.outputs[0].finish_reason == "stop"]
    assert len(finished) >= len(params) // 2
    for p, o in zip(params, outputs):
        if o.outputs[0].finish_reason == "stop":
            jsonschema.validate(json.loads(o.outputs[0].text), p.structured_outputs.json)
