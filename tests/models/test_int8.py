"""CPU W8A8 int8: the quantized linear, the smoothing fold, and the engine path end to end."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tokenmill.quant.int8_cpu import Int8DynamicLinear, int8_supported

pytestmark = pytest.mark.skipif(not int8_supported(), reason="torch without the fbgemm/x86 quantized engine")


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_int8_linear_close_to_fp32(rows: int) -> None:
    torch.manual_seed(rows)
    weight, bias = torch.randn(96, 64) * 0.05, torch.randn(96)
    x = torch.randn(rows, 64)
    x[0] *= 50.0  # one large-norm token must not coarsen the others (per-token scaling)
    layer = Int8DynamicLinear(weight, bias)
    expected, got = x @ weight.t() + bias, layer(x)
    rel = (got - expected).norm(dim=1) / expected.norm(dim=1)
    # int8 weights and activations: ~1-2% per row on average, a few % at worst on random data.
    assert rel.mean() < 0.03 and rel.max() < 0.08, rel
    assert layer(x.view(1, rows, 64)).shape == (1, rows, 96)


def test_smoothing_fold_keeps_the_model_function(tiny_checkpoint: Any) -> None:
    """Folding the factors into the weights changes no output beyond float rounding."""
    from tokenmill.config import EngineConfig
    from tokenmill.engine.core import EngineCore
    from tokenmill.loader import load_model
    from tokenmill.quant.smooth import _prefill_metadata, input_channel_maxima, smooth_model

    loaded = load_model(tiny_checkpoint("qwen2"))  # qwen2 has q/k/v biases
    model = EngineCore(EngineConfig.from_kwargs(num_blocks=64), loaded).model
    ids = list(range(5, 45))

    def run() -> torch.Tensor:
        layers = model.attention_layers
        shape = layers[0].backend.kv_cache_shape(3, 16, layers[0].num_kv_heads, layers[0].head_dim)
        saved = [layer.kv_cache for layer in layers]
        for layer in layers:
            layer.kv_cache = (torch.zeros(shape), torch.zeros(shape))
        try:
            with torch.inference_mode():
                return model(torch.tensor(ids), torch.arange(len(ids)), _prefill_metadata(len(ids), 16))
        finally:
            for layer, cache in zip(layers, saved):
                layer.kv_cache = cache

    before = run()
    maxima = input_channel_maxima(model, ids)
    assert set(maxima) >= {"layers.0.self_attn.qkv_proj", "layers.1.mlp.down_proj"}
    smooth_model(model, maxima)
    torch.testing.assert_close(run(), before, rtol=1e-4, atol=1e-4)


def test_int8_engine_generates_close_to_fp32(default_loaded: Any) -> None:
    """Teacher-forced top-1 agreement with fp32 along fp32's greedy continuation."""
    from tokenmill.config import EngineConfig
    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.sampling_params import SamplingParams

    prompts = ["The capital of France is", "def fibonacci(n):", "The three primary colors are"]

    def run(engine: LLMEngine, prompts: list, params: SamplingParams) -> list:
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[str(i)] for i in range(len(prompts))]

    fp32 = LLMEngine(EngineConfig.from_kwargs(num_blocks=256), default_loaded)
    reference = [o.outputs[0].token_ids for o in run(fp32, prompts, SamplingParams(temperature=0, max_tokens=24))]
    int8 = LLMEngine(EngineConfig.from_kwargs(num_blocks=256, quantization="int8"), default_loaded)
    forced = [fp32.tokenizer.encode(p) + ref for p, ref in zip(prompts, reference)]
    outs = run(int8, forced, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))
    hits = total = 0
    for out, ref in zip(outs, reference):
        ids = out.prompt_token_ids
        for i in range(len(ids) - len(ref), len(ids)):
            total += 1
            hits += out.prompt_logprobs[i][ids[i]].rank == 1
    assert hits / total >= 0.85, hits / total
