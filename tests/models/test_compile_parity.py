"""compile=True (torch.compile of the dense layer parts) keeps greedy output identical to HF and to eager.

Only tiny checkpoints: each compiled model costs a few seconds of inductor compile (less with a warm
on-disk cache).
"""

from __future__ import annotations

import pytest
import torch

from tests.models.utils import check_matches_hf, hf_greedy
from tokenmill import LLM, SamplingParams

MAX_TOKENS = 12
NUM_LOGPROBS = 5


def _prompts(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in (1, 5, 17, 33, 64, 100)]


def _num_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v bias
def test_compiled_matches_hf_and_eager(arch: str, tiny_checkpoint) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_checkpoint(arch)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = _prompts(hf_model.config.vocab_size)
    expected = hf_greedy(hf_model, AutoTokenizer.from_pretrained(path), prompts, MAX_TOKENS, NUM_LOGPROBS)

    # Chunks of 48 tokens: steps mix prefill chunks and decode rows at many different token counts.
    llm = LLM(dtype="float32", model=str(path), block_size=8, kv_cache_memory=16 << 20, max_num_batched_tokens=48, compile=True)
    graphs_after_startup = _num_graphs()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=NUM_LOGPROBS)
    outputs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    # Batch-1 decode: 1-token steps.
    single = llm.generate(prompts[3], params, use_tqdm=False)[0].outputs[0]
    assert _num_graphs() == graphs_after_startup, "a serving step compiled a new graph"

    check_matches_hf(expected, outputs, "tokenmill --compile")
    assert single.token_ids == outputs[3].token_ids

    eager = LLM(dtype="float32", model=str(path), block_size=8, kv_cache_memory=16 << 20, max_num_batched_tokens=48)
    eager_ids = [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]
    assert eager_ids == [o.token_ids for o in outputs]


def test_compile_is_rejected_with_the_triton_backend(tiny_checkpoint) -> None:
    from types import SimpleNamespace

    from tokenmill.worker.compile import compile_model

    model = LLM(dtype="float32", model=str(tiny_checkpoint("llama")), kv_cache_memory=4 << 20).engine.core.model
    model.layers[0].self_attn.attn.backend = SimpleNamespace(name="triton")  # only the name is checked
    with pytest.raises(ValueError, match="torch attention backend"):
        compile_model(model)


def test_compile_with_quantization_is_a_config_error() -> None:
    from tokenmill.config import EngineConfig

    with pytest.raises(ValueError, match="compile does not work with quantization"):
        EngineConfig.from_kwargs(compile=True, quantization="int8")
