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


_AVX2_RUN = """
import pickle, sys
from tokenmill import LLM, SamplingParams
from tokenmill.kernels.cpu.build import load_kernel_library
prompts = pickle.loads(bytes.fromhex(sys.argv[2]))
llm = LLM(dtype="float32", model=sys.argv[1], block_size=8, kv_cache_memory=16 << 20, kernels="c")
assert load_kernel_library("step_forward") is not None and load_kernel_library("f32_gemm") is not None
params = SamplingParams(temperature=0.0, max_tokens=int(sys.argv[3]), ignore_eos=True, logprobs=int(sys.argv[4]))
outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
rows = [(o.token_ids, o.text, [{t: lp.logprob for t, lp in pos.items()} for pos in o.logprobs]) for o in outs]
sys.stdout.write("RESULT " + pickle.dumps(rows).hex())
"""


def test_avx2_kernels_keep_hf_parity(tiny_checkpoint, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The C kernels built for AVX2 alone (-march=x86-64-v3: the f32 tiles, the whole-step forward and attention of
    CPUs without AVX-512, like the Zen 3 seen) run on this AVX-512 CPU and keep float32 parity with HF, so every CI
    machine executes those paths too. In a process of its own: the kernel flags are read at build time."""
    import os
    import pickle
    import subprocess
    import sys
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenmill.worker.capabilities import detect_capabilities

    if not detect_capabilities().has("avx512f"):
        pytest.skip("no AVX-512 here: the native build is the AVX2 one already")
    path = tiny_checkpoint("llama")
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = _prompts(hf_model.config.vocab_size)
    expected = hf_greedy(hf_model, AutoTokenizer.from_pretrained(path), prompts, MAX_TOKENS, NUM_LOGPROBS)
    env = dict(os.environ, TOKENMILL_KERNEL_CFLAGS="-march=x86-64-v3", XDG_CACHE_HOME=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", _AVX2_RUN, str(path), pickle.dumps(prompts).hex(), str(MAX_TOKENS),
                          str(NUM_LOGPROBS)], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = pickle.loads(bytes.fromhex(run.stdout.rsplit("RESULT ", 1)[1]))
    outputs = [SimpleNamespace(token_ids=ids, text=text,
                               logprobs=[{t: SimpleNamespace(logprob=v) for t, v in pos.items()} for pos in top])
               for ids, text, top in rows]
    check_matches_hf(expected, outputs, "tokenmill avx2")
