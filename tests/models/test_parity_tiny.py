"""Greedy parity and top-5 logprobs against HF transformers on tiny random Llama, Qwen2, Mistral."""

from __future__ import annotations

import pytest
import torch

from tests.models.utils import check_matches_hf, hf_greedy
from tokenmill import LLM, SamplingParams

MAX_TOKENS = 16
NUM_LOGPROBS = 5


def _prompts(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in (1, 5, 17, 33, 64, 100)]


@pytest.mark.parametrize("kernels", ["auto", "c", "torch"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_tiny_model_matches_hf(arch: str, kernels: str, tiny_checkpoint) -> None:
    """Every kernel family keeps float32 parity: the plan's choice (auto), and each family forced."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_checkpoint(arch)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = _prompts(hf_model.config.vocab_size)
    expected = hf_greedy(hf_model, tokenizer, prompts, MAX_TOKENS, NUM_LOGPROBS)

    llm = LLM(dtype="float32", model=str(path), block_size=8, kv_cache_memory=16 << 20, kernels=kernels)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=NUM_LOGPROBS)
    outputs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]

    check_matches_hf(expected, outputs, "tokenmill")


def test_bfloat16_follows_hf_bfloat16(tiny_checkpoint) -> None:
    """bfloat16 on the CPU (oneDNN products, the C kernels' float32 residual stream and attention over a
    float16 cache) against HF in bfloat16: greedy sequences part only where each pick is in the other's
    top-5 (bf16's tolerance; the float32 residual stream makes ours the more accurate of the two)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.models.utils import check_logprobs_close

    path = tiny_checkpoint("llama")
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    prompts = _prompts(hf_model.config.vocab_size)
    expected = hf_greedy(hf_model, AutoTokenizer.from_pretrained(path), prompts, MAX_TOKENS, NUM_LOGPROBS)
    llm = LLM(dtype="bfloat16", model=str(path), block_size=8, kv_cache_memory=16 << 20)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=NUM_LOGPROBS)
    outputs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    ours = [(o.token_ids, [{t: lp.logprob for t, lp in pos.items()} for pos in o.logprobs]) for o in outputs]
    check_logprobs_close(outputs_0=[(ids, top) for ids, _, top in expected], outputs_1=ours, name_0="hf bf16",
                         name_1="tokenmill bf16")
    assert sum(o.token_ids[:4] == e[0][:4] for o, e in zip(outputs, expected)) >= len(prompts) - 1
