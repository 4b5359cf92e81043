"""A worker that gets every step as pickled plain data (as a worker process would) produces the same tokens and
logprobs as the in-process one, with sampling, penalties, preemption and prefix hits in the mix."""

from __future__ import annotations

import pickle

from tokenmill import LLM, SamplingParams

PROMPTS = ["The quick brown fox", "Once upon a time there was", "The quick brown fox jumps", "1, 2, 3, 4,"]
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=3),
    SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=30, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, repetition_penalty=1.3, presence_penalty=0.5),
    SamplingParams(temperature=1.0, top_k=5, seed=11, max_tokens=30, ignore_eos=True, prompt_logprobs=2),
]


def _run(llm: LLM) -> list:
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs, o.prompt_logprobs) for o in outs]


def test_pickled_step_messages_give_the_same_outputs(tiny_checkpoint) -> None:
    # 6 blocks of 16 tokens for 4 requests of ~35 tokens: the scheduler preempts.
    kwargs = {"model": str(tiny_checkpoint("llama")), "max_model_len": 64, "num_blocks": 6,
              "max_num_batched_tokens": 32}
    expected = _run(LLM(**kwargs))
    llm = LLM(**kwargs)
    worker = llm.engine.core.worker
    execute = worker.execute
    sizes: list[int] = []

    def crossing(step):
        raw = pickle.dumps(step)
        assert b"tokenmill.engine" not in raw
        sizes.append(len(raw))
        return execute(pickle.loads(raw))

    worker.execute = crossing
    assert _run(llm) == expected
    assert sizes and llm.engine.core.scheduler.num_preemptions_total > 0
    # The worker drops finished requests with the next step's message: one more request leaves only itself.
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=1), use_tqdm=False)
    assert len(worker.requests) == 1
