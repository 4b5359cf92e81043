"""Models with random weights and the timed workloads of benchmarks/gpu/check.py.

Every model is built from an HF LlamaConfig: the HF model (random init, on the target device) is the
reference and the baseline, and tokenmill's engine loads its state dict, so both run the same weights.
Timings synchronize the device around the timed region and run warm (kernels compiled, graphs
captured, one untimed round first).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.core import EngineCore
from tokenmill.engine.request import Request
from tokenmill.loader import LoadedModel
from tokenmill.sampling_params import SamplingParams

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
)
# Tiny shapes for parity (head dims 64 and 128, GQA) and for the CPU dry run.
TINY_64 = dict(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1,
               eos_token_id=2)
TINY_128 = dict(TINY_64, hidden_size=512, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_hf_model(shape: dict[str, Any], dtype: torch.dtype, device: torch.device, init_std: float | None = None):
    """An HF LlamaForCausalLM with random weights, built directly on `device`. init_std widens the
    init (tiny parity models: logits far from ties)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**shape)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(1234)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if init_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, init_std)
    model.generation_config.pad_token_id = 0
    return model.eval()


def build_engine(hf_model: Any, **engine_args: Any) -> EngineCore:
    loaded = LoadedModel(hf_config=hf_model.config, state_dict=dict(hf_model.state_dict()), tokenizer=None,
                         generation_config={}, source="random weights")
    return EngineCore(EngineConfig.from_kwargs(**engine_args), loaded)


def random_prompts(num: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab_size - 10, (num, length), generator=gen).tolist()


def _add(core: EngineCore, prefix: str, prompts: list[list[int]], max_tokens: int) -> list[str]:
    ids = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        core.add_request(Request(f"{prefix}{i}", prompt, params))
        ids.append(f"{prefix}{i}")
    return ids


def _step(core: EngineCore) -> list[Any]:
    outputs = core.step()
    failed = [o.req_id for o in outputs if o.finish_reason == "error"]
    if failed:
        raise RuntimeError(f"engine step failed for {failed[:3]} (see the log above)")
    return outputs


def _drain(core: EngineCore) -> None:
    for _ in range(10_000):
        if not core.has_unfinished_requests():
            return
        _step(core)
    raise RuntimeError("engine did not drain")


def engine_greedy(core: EngineCore, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    ids = _add(core, "g", prompts, max_tokens)
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    while core.has_unfinished_requests():
        for out in _step(core):
            tokens[out.req_id].extend(out.new_token_ids)
    return [tokens[i] for i in ids]


@torch.inference_mode()
def hf_greedy(model: Any, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    device = next(model.parameters()).device
    results = []
    for prompt in prompts:
        out = model(torch.tensor([prompt], device=device), use_cache=True)
        ids: list[int] = []
        for _ in range(max_tokens):
            ids.append(int(out.logits[0, -1].float().argmax()))
            out = model(torch.tensor([[ids[-1]]], device=device), past_key_values=out.past_key_values, use_cache=True)
        results.append(ids)
    return results


def decode_benchmark(core: EngineCore, batch: int, prompt_len: int, steps: int, seed: int,
                     graph_replays: int = 20) -> dict[str, Any]:
    """Times `steps` pure-decode steps of `batch` requests (after their prefills and 2 warm steps)."""
    device = core.device
    vocab = core.model.config.vocab_size
    ids = _add(core, f"d{batch}-", random_prompts(batch, prompt_len, vocab, seed), steps + 8)
    started: set[str] = set()
    while len(started) < batch:
        started.update(o.req_id for o in _step(core) if o.new_token_ids)
    for _ in range(2):
        _step(core)
    sync(device)
    start = time.perf_counter()
    produced = 0
    for _ in range(steps):
        produced += sum(len(o.new_token_ids) for o in _step(core))
    sync(device)
    seconds = time.perf_counter() - start
    if produced != batch * steps:
        raise RuntimeError(f"decode steps produced {produced} tokens, expected {batch * steps}")
    result = dict(batch=batch, steps=steps, prompt_len=prompt_len, seconds=seconds, tok_s=produced / seconds,
                  step_ms=seconds / steps * 1e3, mean_context=prompt_len + 3 + steps / 2)
    graphs = getattr(core.runner, "cuda_graphs", None)
    if graphs is not None and batch in graphs.graphs:
        # The model forward alone: the graph's inputs still hold the last step (same KV rewritten).
        result["graph_forward_ms"] = _replay_ms(graphs.graphs[batch], graph_replays)
    core.abort_requests(ids)
    _drain(core)
    return result


def _replay_ms(graph: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


def prefill_benchmark(core: EngineCore, num_prompts: int, prompt_len: int, seed: int, repeats: int = 3) -> dict:
    """Times one engine step that prefills num_prompts prompts at once (and samples their first token)."""
    vocab = core.model.config.vocab_size
    times = []
    for r in range(repeats + 1):  # round 0 warms up
        ids = _add(core, f"p{r}-", random_prompts(num_prompts, prompt_len, vocab, seed + r), 1)
        sync(core.device)
        start = time.perf_counter()
        outputs = _step(core)
        sync(core.device)
        if r:
            times.append(time.perf_counter() - start)
        if sum(o.finished for o in outputs) != num_prompts:
            raise RuntimeError("the prefill did not fit one step; raise max_num_batched_tokens")
        _drain(core)
        del ids
    seconds = statistics.median(times)
    return dict(num_prompts=num_prompts, prompt_len=prompt_len, seconds=seconds,
                tok_s=num_prompts * prompt_len / seconds)


@torch.inference_mode()
def hf_decode_benchmark(model: Any, batch: int, prompt_len: int, new_tokens: int, seed: int) -> dict[str, Any]:
    """HF generate on a static batch (equal lengths, no padding): decode rate from the time of
    new_tokens tokens minus the time of 1 token (the prefill)."""
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    ids = torch.tensor(random_prompts(batch, prompt_len, vocab, seed), device=device)
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        sync(device)
        start = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync(device)
        return time.perf_counter() - start

    run(2)  # warm-up
    first = statistics.median(run(1) for _ in range(3))
    total = statistics.median(run(new_tokens) for _ in range(2))
    decode_seconds = total - first
    ok = decode_seconds > 0  # else too few tokens to see past the noise
    return dict(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, seconds=total, prefill_seconds=first,
                tok_s=batch * (new_tokens - 1) / decode_seconds if ok else None,
                step_ms=decode_seconds / (new_tokens - 1) * 1e3 if ok else None)


def model_costs(shape: dict[str, Any], weight_bytes_per_param: float, kv_bytes_per_elem: int) -> dict[str, float]:
    """Parameters, bytes and FLOPs per token of a Llama shape (lm_head kept in bf16 under FP8)."""
    hidden, layers = shape["hidden_size"], shape["num_hidden_layers"]
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = hidden // heads
    per_layer = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden + 3 * hidden * shape[
        "intermediate_size"]
    linear = layers * per_layer
    lm_head = shape["vocab_size"] * hidden
    return dict(
        linear_params=linear, lm_head_params=lm_head,
        weight_bytes=linear * weight_bytes_per_param + lm_head * 2 + (2 * layers + 1) * hidden * 2,
        kv_bytes_per_token=2 * layers * kv_heads * head_dim * kv_bytes_per_elem,
        attn_flops_per_query_key=4 * layers * heads * head_dim,
    )
