"""The device-independent parts of the GPU path, on the CPU: device/dtype/backend selection, CUDA-graph
buckets and batch padding, FP8 scale computation (float8 casts work on the CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenmill.config import CacheConfig, EngineConfig, ModelConfig
from tokenmill.quant.fp8 import FP8_MAX, dequantize_weight, quantize_per_token, quantize_weight
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.cuda_graphs import capture_sizes, fill_decode_inputs, padded_size
from tokenmill.worker.device import (
    check_quantization,
    cuda_graph_sizes,
    resolve_attention_backend,
    resolve_device,
    resolve_dtype,
    resolve_kv_cache_dtype,
)
from tokenmill.worker.request_states import RequestState, StepRequest

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


def test_dtype_and_backend_defaults_follow_the_device() -> None:
    from tokenmill.worker.capabilities import detect_capabilities

    native_bf16 = detect_capabilities().native_bf16
    assert resolve_dtype("auto", CPU) == (torch.bfloat16 if native_bf16 else torch.float32)
    assert resolve_dtype("auto", CPU, "int8") == torch.float32  # the C int8 / int4 kernels take float32
    assert resolve_dtype("float32", CPU) == torch.float32
    assert resolve_dtype("auto", CUDA) == torch.bfloat16
    assert resolve_dtype("float16", CPU) == torch.float16
    assert resolve_attention_backend("auto", CPU) == "torch"
    assert resolve_attention_backend("auto", CUDA) == "triton"
    assert resolve_kv_cache_dtype("auto", torch.bfloat16, "triton") == torch.bfloat16
    assert resolve_kv_cache_dtype("fp8", torch.bfloat16, "triton") == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="triton"):
        resolve_kv_cache_dtype("fp8", torch.float32, "torch")
    # float16 or int8 on the CPU (torch backend): asked for, and int8 by default under int8 / int4
    assert resolve_kv_cache_dtype("float16", torch.float32, "torch") == torch.float16
    assert resolve_kv_cache_dtype("auto", torch.float32, "torch", "int8") == torch.int8
    assert resolve_kv_cache_dtype("auto", torch.float32, "torch", "int4") == torch.int8
    assert resolve_kv_cache_dtype("auto", torch.float32, "torch", "none") == torch.float32
    assert resolve_kv_cache_dtype("float32", torch.float32, "torch", "int8") == torch.float32
    assert resolve_kv_cache_dtype("int8", torch.float32, "torch", "int8") == torch.int8
    with pytest.raises(ValueError, match="int8"):
        resolve_kv_cache_dtype("int8", torch.bfloat16, "triton")
    with pytest.raises(ValueError, match="triton one does not"):
        resolve_kv_cache_dtype("float16", torch.bfloat16, "triton")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == CPU
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_config_validates_new_fields() -> None:
    with pytest.raises(ValueError, match="device"):
        ModelConfig(device="tpu")
    with pytest.raises(ValueError, match="quantization"):
        ModelConfig(quantization="int3")
    with pytest.raises(ValueError, match="int8_activation_bits"):
        ModelConfig(int8_activation_bits=6)
    with pytest.raises(ValueError, match="attention_backend"):
        CacheConfig(attention_backend="flash")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        CacheConfig(kv_cache_dtype="int4")
    config = EngineConfig.from_kwargs(quantization="fp8")
    with pytest.raises(ValueError, match="CUDA"):
        check_quantization(config, CPU, "torch")


def test_graph_sizes_and_padding_buckets() -> None:
    assert capture_sizes(256) == [1, 2, 4, 8] + list(range(16, 257, 16))
    assert capture_sizes(3) == [1, 2, 4]
    assert capture_sizes(100)[-1] == 112  # the bucket covering max_num_seqs
    assert capture_sizes(1000)[-1] == 256
    sizes = capture_sizes(256)
    assert [padded_size(n, sizes) for n in (1, 3, 8, 9, 17, 255, 256)] == [1, 4, 8, 16, 32, 256, 256]
    assert padded_size(257, sizes) is None  # eager above the largest bucket
    assert cuda_graph_sizes(EngineConfig(), CPU, "torch") == []
    assert cuda_graph_sizes(EngineConfig.from_kwargs(enforce_eager=True), CUDA, "triton") == []
    assert cuda_graph_sizes(EngineConfig.from_kwargs(max_num_seqs=16), CUDA, "triton") == [1, 2, 4, 8, 16]


def _decode(req_id: str, tokens: list[int], block_ids: list[int]) -> StepRequest:
    state = RequestState(req_id, list(tokens), list(tokens), SamplingParams(max_tokens=4), None, list(block_ids))
    return StepRequest(state, start_pos=len(tokens) - 1, num_new_tokens=1)


def test_fill_decode_inputs_pads_with_inert_rows() -> None:
    scheduled = [_decode("a", [5, 6, 7], [9]), _decode("b", list(range(10, 20)), [3, 4, 8])]
    ints = np.full((4, 8), 99, dtype=np.int64)
    tables = np.full(8 * 4, 99, dtype=np.int64)
    width = fill_decode_inputs(scheduled, 4, 4, ints, tables)
    assert width == 3
    assert ints[:, :4].tolist() == [
        [7, 19, 0, 0],  # the token at each request's position
        [2, 9, 0, 0],  # positions
        [3, 10, 0, 0],  # sequence lengths; padding rows have length 0 ...
        [9 * 4 + 2, 8 * 4 + 1, -1, -1],  # ... and slot -1: they read and write no KV
    ]
    assert tables[0] == 9 and tables[3:6].tolist() == [3, 4, 8]  # rows of width 3


def test_fp8_weight_scales_per_channel_and_per_tensor() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 64, generator=gen) * torch.tensor([1e-3, 0.1, 1.0, 5.0, 30.0, 0.0]).unsqueeze(1)
    q, scale = quantize_weight(w, per_channel=True)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (6,)
    # Each channel's largest magnitude lands on 448; relative error of e4m3 is at most 2^-4.
    assert torch.allclose(q.float().abs().amax(dim=1)[:5], torch.full((5,), FP8_MAX))
    deq = dequantize_weight(q, scale)
    assert torch.all((deq - w).abs() <= w.abs() * 2**-4 + scale.unsqueeze(1) * 2**-9)
    assert torch.all(deq[5] == 0)
    q_t, scale_t = quantize_weight(w, per_channel=False)
    assert torch.all(scale_t == scale_t[0]) and scale_t[0] == w.abs().max() / FP8_MAX
    # A shared scale flushes the tiny channel towards zero: why per-channel is the default.
    assert (dequantize_weight(q_t, scale_t)[0] - w[0]).abs().max() > (deq[0] - w[0]).abs().max()


def test_fp8_per_token_activation_scales() -> None:
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [300.0, 1.0, -900.0]])
    q, scale = quantize_per_token(x)
    assert scale.shape == (3, 1)
    assert torch.allclose(q.float().abs().amax(dim=1)[[0, 2]], torch.full((2,), FP8_MAX))
    torch.testing.assert_close(q.float() * scale, x, rtol=2**-4, atol=0)


def test_quantize_model_fp8_replaces_the_projections_but_not_the_vocab_projection(tiny_checkpoint) -> None:
    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.layers.linear import Linear
    from tokenmill.models.interface import CausalLM
    from tokenmill.quant.fp8 import Fp8Linear, quantize_model_fp8

    config = EngineConfig.from_kwargs(model=str(tiny_checkpoint("qwen2")), dtype="float32", num_blocks=8,
                                      kernels="torch", panel_gemm=False, fused_decode=False)
    model = LLMEngine(config).core.model
    assert isinstance(model, CausalLM)
    slots = [slot for part in model.decoder_layers() for slot in part.projections]
    assert quantize_model_fp8(model) == len(slots) == 4 * len(model.decoder_layers())
    assert all(isinstance(slot.module, Fp8Linear) for slot in slots)
    assert type(model.vocab_projection) is Linear
    qkv = model.decoder_layers()[0].projection("qkv_proj").module
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.bias is not None  # qwen2: q/k/v biases kept


