"""Deterministic mode (--batch-invariant): a request's tokens and logprobs are bit-identical whatever else is in the
batch: alone, among 32 random others (prompt and decode rows of other requests in its steps), after a prefix hit,
under chunked prefill and after preemption; float32, int8 and int4 weights."""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5)
# Prompt logprobs too (a request asking for them does not read the prefix cache: no prefix-hit case for them).
WITH_PROMPT = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5, prompt_logprobs=3)


@pytest.fixture(scope="module")
def prompts() -> tuple[list[int], list[list[int]]]:
    gen = torch.Generator().manual_seed(11)
    target = torch.randint(3, 40000, (37,), generator=gen).tolist()
    lengths = torch.randint(2, 70, (32,), generator=gen).tolist()
    others = [torch.randint(3, 40000, (n,), generator=gen).tolist() for n in lengths]
    return target, others


def _llm(path: str, quantization: str, **engine_args) -> LLM:
    engine_args.setdefault("kv_cache_memory", 32 << 20)
    return LLM(model=path, dtype="float32", quantization=quantization, block_size=8, batch_invariant=True,
               **engine_args)


def _fingerprint(output) -> tuple:
    """Everything a request's result holds that the batch could perturb, as exact values."""
    out = output.outputs[0]
    sampled = [sorted((t, lp.logprob, lp.rank) for t, lp in step.items()) for step in out.logprobs]
    prompt = [None if step is None else sorted((t, lp.logprob) for t, lp in step.items())
              for step in output.prompt_logprobs or []]
    return out.token_ids, sampled, prompt


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_same_logprobs_alone_in_a_batch_after_a_prefix_hit_chunked_and_preempted(
        tiny_checkpoint, prompts, quantization: str) -> None:
    path = str(tiny_checkpoint("llama"))
    target, others = prompts
    llm = _llm(path, quantization)
    alone = _fingerprint(llm.generate([target], PARAMS, use_tqdm=False)[0])
    alone_with_prompt = _fingerprint(llm.generate([target], WITH_PROMPT, use_tqdm=False)[0])
    assert alone_with_prompt[:2] == alone[:2]

    batch = others[:16] + [target] + others[16:]
    assert _fingerprint(llm.generate(batch, WITH_PROMPT, use_tqdm=False)[16]) == alone_with_prompt
    assert _fingerprint(llm.generate(batch, PARAMS, use_tqdm=False)[16]) == alone

    # Its first 32 tokens (4 blocks) were cached by the runs above: a prefix hit, then prompt rows after it.
    hit = llm.generate([target], PARAMS, use_tqdm=False)[0]
    assert hit.num_cached_tokens == 32
    assert _fingerprint(hit) == alone
    del llm

    chunked = _llm(path, quantization, max_num_batched_tokens=5, enable_prefix_caching=False)
    assert _fingerprint(chunked.generate(others[:3] + [target], WITH_PROMPT, use_tqdm=False)[3]) == alone_with_prompt
    del chunked

    tight = _llm(path, quantization, kv_cache_memory=None, num_blocks=24, max_num_batched_tokens=64,
                 enable_prefix_caching=False)
    outputs = tight.generate(batch, PARAMS, use_tqdm=False)
    assert tight.engine.core.scheduler.num_preemptions_total > 0
    assert _fingerprint(outputs[16]) == alone


def test_batch_invariant_rejects_what_it_cannot_honour(tiny_checkpoint) -> None:
    path = str(tiny_checkpoint("llama"))
    for bad, message in [({"dtype": "bfloat16"}, "float32"), ({"kernels": "torch"}, "C kernels"),
                         ({"panel_gemm": False}, "C kernels"), ({"device": "cuda"}, "CPU mode")]:
        with pytest.raises(ValueError, match=message):
            LLM(model=path, batch_invariant=True, **bad)
