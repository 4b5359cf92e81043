"""compile=True (torch.compile of the dense layer parts) keeps greedy output identical to HF and to eager.

Only tiny checkpoints: each compiled model costs a few seconds of inductor compile (less with a warm
on-disk cache).
"""

from __future__ import annotations

import pytest
import torch

from tests.models.utils import check_logprobs_close, check_outputs_equal, hf_greedy
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
    llm = LLM(model=str(path), block_size=8, kv_cache_memory=16 << 20, max_num_batched_tokens=48, compile=True)
    graphs_after_startup = _num_graphs()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=NUM_LOGPROBS)
    outputs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    # Batch-1 decode: 1-token steps.
    single = llm.generate(prompts[3], params, use_tqdm=False)[0].outputs[0]
    assert _num_graphs() == graphs_after_startup, "a serving step compiled a new graph"

    check_outputs_equal(
        outputs_0=[(ids, text) for ids, text, _ in expected],
        outputs_1=[(o.token_ids, o.text) for o in outputs], name_0="hf", name_1="tokenmill --compile",
    )
    assert single.token_ids == outputs[3].token_ids
    ours = [(o.token_ids, [{t: lp.logprob for t, lp in pos.items()} for pos in o.logprobs]) for o in outputs]
    check_logprobs_close(
        outputs_0=[(ids, top) for ids, _, top in expected], outputs_1=ours, name_0="hf", name_1="tokenmill --compile",
    )
    for (_, _, top), (_, our_top) in zip(expected, ours):
        for ref_pos, our_pos in zip(top, our_top):
            for token_id, value in ref_pos.items():
                if token_id in our_pos:
                    assert our_pos[token_id] == pytest.approx(value, abs=1e-4)

    eager = LLM(model=str(path), block_size=8, kv_cache_memory=16 << 20, max_num_batched_tokens=48)
    eager_ids = [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]
    assert eager_ids == [o.token_ids for o in outputs]


def test_compile_is_rejected_with_the_triton_backend(tiny_checkpoint) -> None:
    from types import SimpleNamespace

    from tokenmill.worker.compile import compile_model

    model = LLM(model=str(tiny_checkpoint("llama")), kv_cache_memory=4 << 20).engine.core.model
    model.layers[0].self_attn.attn.backend = SimpleNamespace(name="triton")  # only the name is checked
    with pytest.raises(ValueError, match="torch attention backend"):
        compile_model(model)


def test_compile_with_quantization_is_a_config_error() -> None:
    from tokenmill.config import EngineConfig

    with pytest.raises(ValueError, match="compile does not work with quantization"):
        EngineConfig.from_kwargs(compile=True, quantization="int8")
