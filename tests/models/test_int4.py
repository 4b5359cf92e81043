"""`--quantization int4` on the default model: its Q4_1 GGUF weights come back exactly, and the engine's
decode (W4A16, and the bf16 route where the plan chose it) follows fp32's greedy tokens and logprobs; the bf16 route
is a candidate where it can run fast."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.models.test_int8 import _quality_benchmark, _run
from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.kernels.cpu.int4_gemm import int4_gemm_available
from tokenmill.layers.panel_linear import PanelLinear
from tokenmill.layers.planned_linear import PlannedLinear
from tokenmill.quant.int4_cpu import Int4GroupLinear, bf16_units_gemm_available
from tokenmill.quant.int8_cpu import Int8DynamicLinear
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.c_step import CStepForward, int4_bf16_route_start
from tokenmill.worker.planner import _projection_candidates

pytestmark = pytest.mark.skipif(not int4_gemm_available(), reason="C kernels not built (no compiler)")


@pytest.fixture(scope="module")
def engines(default_loaded: Any) -> dict[str, LLMEngine]:
    return {
        "fp32": LLMEngine(EngineConfig.from_kwargs(dtype="float32", num_blocks=256, kernels="c"), default_loaded),
        # float16 K/V (rounding-sized) rather than auto's int8, so that only the weights' path differs from fp32
        "int4": LLMEngine(EngineConfig.from_kwargs(dtype="float32", num_blocks=256, quantization="int4",
                                                   quantize_lm_head=False, kv_cache_dtype="float16"), default_loaded),
    }


def test_the_gguf_q4_1_weights_come_back_exactly(engines: dict[str, LLMEngine]) -> None:
    """The embedded file stores every projection in Q4_1: the int4 layers compute with those very weights."""
    fp32 = dict(engines["fp32"].core.model.named_modules())
    # A projection the plan routes by row count holds its two routes (c_int4 and c_int4_bf16, the same weights).
    quantized = {name.split(".impls.")[0]: m for name, m in engines["int4"].core.model.named_modules()
                 if isinstance(m, Int4GroupLinear)}
    assert len(quantized) == 4 * engines["fp32"].core.model.config.num_hidden_layers
    for name, module in quantized.items():
        assert isinstance(fp32[name], PanelLinear)
        assert torch.equal(module.dequantized_weight(), fp32[name].unpacked_weight()), name
    assert any(isinstance(p, CStepForward) for p in engines["int4"].core.runner.step_paths)  # C int4 decode steps


def test_greedy_decode_follows_fp32(engines: dict[str, LLMEngine]) -> None:
    """16-bit activation groups leave float-rounding-sized differences: the chosen tokens' logprobs agree
    within 0.02 nat wherever the sequences agree, and the sequences agree on nearly every token. Where the plan
    routes some row counts to the bf16 route (bf16 inputs: the 8-prompt steps here), within 0.1 nat (measured
    0.03-0.06; a bf16 model's 0.075, an int8 model's 0.26)."""
    bf16_route = any(c.kernel == "c_int4_bf16" for c in engines["int4"].core.plan.choices)
    bound = 0.1 if bf16_route else 0.02
    prompts = _quality_benchmark().PROMPTS
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    reference, got = (_run(engines[name], prompts, params) for name in ("fp32", "int4"))
    same = total = 0
    for ref, out in zip(reference, got):
        ref_ids, ids = ref.outputs[0].token_ids, out.outputs[0].token_ids
        for i, (a, b) in enumerate(zip(ref_ids, ids)):
            if a != b:
                break
            same += 1
            assert abs(ref.outputs[0].logprobs[i][a].logprob - out.outputs[0].logprobs[i][b].logprob) < bound
        total += len(ref_ids)
    assert same / total >= 0.9, same / total


def test_int4_engine_quantizes_the_lm_head_to_int8_by_default(default_loaded: Any) -> None:
    engine = LLMEngine(EngineConfig.from_kwargs(dtype="float32", num_blocks=64, quantization="int4"), default_loaded)
    assert isinstance(engine.core.model.logits_head, Int8DynamicLinear)
    with pytest.raises(ValueError, match="int4"):
        EngineConfig.from_kwargs(quantization="int5")


def test_the_bf16_route_is_a_candidate_where_bf16_is_native_or_the_model_bf16() -> None:
    """The plan's c_int4_bf16 (quant/int4_cpu.py's bf16 route): a bf16 model's candidate everywhere, a float32
    model's where the CPU multiplies bf16 in hardware."""
    layer = Int4GroupLinear(torch.randn(96, 128), None)
    both = {"c_int4", "c_int4_bf16"}
    assert set(_projection_candidates(layer, True, torch.bfloat16)) == both
    assert set(_projection_candidates(layer, True, torch.float32)) == (both if bf16_units_gemm_available()
                                                                      else {"c_int4"})


def test_the_c_forward_takes_the_bf16_route_where_the_plan_does() -> None:
    """int4_bf16_route_start: the first row count of the c_int4_bf16 route, from the plan's routes of a projection."""
    layer = Int4GroupLinear(torch.randn(96, 128), None)
    twin = layer.with_prefill_dtype(torch.bfloat16)
    assert int4_bf16_route_start(layer) == 0 and int4_bf16_route_start(twin) == 1
    assert int4_bf16_route_start(PlannedLinear([(8, layer), (2048, twin)], ["c_int4", "c_int4_bf16"])) == 9
    assert int4_bf16_route_start(PlannedLinear([(1, layer), (4, layer), (16, twin)],
                                               ["c_int4", "c_int4", "c_int4_bf16"])) == 5
    assert int4_bf16_route_start(PlannedLinear([(2048, layer)], ["c_int4"])) == 0
    assert int4_bf16_route_start(torch.nn.Linear(128, 96)) == 0
