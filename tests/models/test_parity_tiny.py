"""Greedy parity and top-5 logprobs against HF transformers on tiny random Llama, Qwen2, Mistral."""

from __future__ import annotations

import pytest
import torch

from tests.models.utils import check_logprobs_close, check_outputs_equal, hf_greedy
from tokenmill import LLM, SamplingParams

MAX_TOKENS = 16
NUM_LOGPROBS = 5


def _prompts(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in (1, 5, 17, 33, 64, 100)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_tiny_model_matches_hf(arch: str, tiny_checkpoint) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_checkpoint(arch)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = _prompts(hf_model.config.vocab_size)
    expected = hf_greedy(hf_model, tokenizer, prompts, MAX_TOKENS, NUM_LOGPROBS)

    llm = LLM(model=str(path), block_size=8, kv_cache_memory=16 << 20)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=NUM_LOGPROBS)
    outputs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]

    check_outputs_equal(
        outputs_0=[(ids, text) for ids, text, _ in expected],
        outputs_1=[(o.token_ids, o.text) for o in outputs], name_0="hf", name_1="tokenmill",
    )
    ours = [(o.token_ids, [{t: lp.logprob for t, lp in pos.items()} for pos in o.logprobs]) for o in outputs]
    check_logprobs_close(
        outputs_0=[(ids, top) for ids, _, top in expected], outputs_1=ours, name_0="hf", name_1="tokenmill",
    )
    # Logprob values agree too, position by position while the sequences agree.
    for (ids, _, top), (_, our_top) in zip(expected, ours):
        for ref_pos, our_pos in zip(top, our_top):
            for token_id, value in ref_pos.items():
                if token_id in our_pos:
                    assert our_pos[token_id] == pytest.approx(value, abs=1e-4)
