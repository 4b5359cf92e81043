"""The whole engine on the triton backend (fused rotary + KV write, fused add + RMSNorm, paged
attention kernels) gives HF's greedy tokens on a tiny random Llama, in Triton's interpreter on the
CPU (float32) or compiled on a GPU. Mixed steps (decodes next to chunked prefills) and prefix-cache
hits run through the same kernels."""

from __future__ import annotations

import torch

from tests.models.utils import hf_greedy
from tokenmill import LLM, SamplingParams

MAX_TOKENS = 6


def test_triton_engine_matches_hf(tiny_checkpoint, device) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_checkpoint("llama")
    gen = torch.Generator().manual_seed(21)
    shared = torch.randint(3, 40000, (32,), generator=gen).tolist()
    prompts = [torch.randint(3, 40000, (n,), generator=gen).tolist() for n in (1, 9, 40)]
    prompts += [shared + [5, 6, 7], shared + [8]]
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = [ids for ids, _, _ in hf_greedy(hf_model, AutoTokenizer.from_pretrained(path), prompts, MAX_TOKENS)]

    llm = LLM(model=str(path), device=device.type, dtype="float32", attention_backend="triton",
              block_size=16, kv_cache_memory=8 << 20, max_num_batched_tokens=24, enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    first = llm.generate(prompts[:4], params, use_tqdm=False)
    last = llm.generate(prompts[4:], params, use_tqdm=False)  # hits the 32-token prefix cached by prompt 3
    assert [o.outputs[0].token_ids for o in first + last] == expected
    assert last[0].num_cached_tokens == 32
