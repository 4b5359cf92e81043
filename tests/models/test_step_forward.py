"""The one-call C forward of a step (worker/c_step.py, kernels/cpu/step_forward.c), a whole-step path of the
runner: which steps it takes (decode, prompt, chunked and mixed), that it computes what the layer-by-layer
forward computes, and HF parity through it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from tests.models.utils import check_matches_hf, hf_greedy, pin_int4_kernel, tiny_variant
from tokenmill import LLM, SamplingParams
from tokenmill.kernels.cpu.bf16_gemm import bf16_amx_ready
from tokenmill.kernels.cpu.bf16_prompt_attention import bf16_prompt_attention_available
from tokenmill.kernels.cpu.step_forward import PHASES, step_forward_available
from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.quant.int4_cpu import Int4GroupLinear, bf16_units_gemm_available
from tokenmill.quant.int8_cpu import Int8DynamicLinear
from tokenmill.worker.c_step import CStepForward

pytestmark = pytest.mark.skipif(not step_forward_available(), reason="no C compiler for the CPU kernels")

MAX_TOKENS = 10


def _prompts(vocab_size: int, lengths: tuple[int, ...]) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def _model(llm: LLM) -> LlamaForCausalLM:
    return llm.engine.core.model


def _c_step(llm: LLM) -> CStepForward | None:
    """The runner's C whole-step path, None when it has none."""
    return next((p for p in llm.engine.core.runner.step_paths if isinstance(p, CStepForward)), None)


@contextmanager
def compared_with_layer_by_layer(llm: LLM, rel_tol: float) -> Iterator[list[int]]:
    """Every step the C forward takes also runs layer by layer (first, so both read the same K/V cache;
    both write the step's K/V to the same slots); their final hidden states must agree within rel_tol
    of the largest value (on the rows the runner asked the C forward for). Yields the row counts of the steps
    compared."""
    c_step, model = _c_step(llm), _model(llm)
    assert c_step is not None
    rows: list[int] = []
    c_forward = c_step.forward

    def forward(input_ids: torch.Tensor, positions: torch.Tensor, meta: Any,
                keep_rows: torch.Tensor | None = None) -> torch.Tensor:
        reference = model(input_ids, positions, meta)
        got = c_forward(input_ids, positions, meta, keep_rows)
        kept = slice(None) if keep_rows is None else keep_rows
        error = (got[kept] - reference[kept]).abs().max() if got[kept].numel() else 0.0
        assert error <= rel_tol * reference.abs().max(), (meta.seq_lens_list, error)
        rows.append(got.shape[0])
        return got

    c_step.forward = forward  # an instance attribute: run() calls it
    try:
        yield rows
    finally:
        del c_step.forward


@pytest.fixture(scope="module")
def biased_checkpoint(tiny_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """arch -> a tiny checkpoint whose every bias is random: Qwen2's q/k/v biases, and Llama with
    attention_bias and mlp_bias (o_proj, gate/up/down biases too). The tiny checkpoints' are zero."""

    def make(arch: str) -> Any:
        changes = {"attention_bias": True, "mlp_bias": True} if arch == "llama" else {}
        return tiny_variant(tiny_checkpoint(arch), tmp_path_factory, f"biased-{arch}", 5, random_biases=True,
                            **changes)

    return make


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "biased-llama", "biased-qwen2"])
def test_c_forward_matches_hf(arch: str, tiny_checkpoint: Any, biased_checkpoint: Any) -> None:
    """Greedy tokens and logprobs equal to HF with every step in the C forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = biased_checkpoint(arch.removeprefix("biased-")) if arch.startswith("biased-") else tiny_checkpoint(arch)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = _prompts(hf_model.config.vocab_size, (1, 9, 30))
    expected = hf_greedy(hf_model, AutoTokenizer.from_pretrained(path), prompts, MAX_TOKENS, 5)

    llm = LLM(dtype="float32", kernels="c", model=str(path), block_size=8, kv_cache_memory=16 << 20)
    with compared_with_layer_by_layer(llm, rel_tol=1e-5) as rows:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)
        outputs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    check_matches_hf(expected, outputs, "tokenmill C forward")
    assert rows == [1 + 9 + 30] + [3] * (MAX_TOKENS - 1)  # the prompts' step, then every decode step


@pytest.mark.parametrize("activation_bits", [8, 7])
def test_c_forward_int8_agrees_with_layer_by_layer(tiny_checkpoint: Any, activation_bits: int) -> None:
    """W8A8 or W8A7 (rotated inputs): the same quantized arithmetic; both quantize the same activations, so
    only float rounding (then a rare flipped level) separates them. A float32 K/V cache keeps this to the
    projections: on an int8 one (test_c_forward_narrow_cache_agrees_with_layer_by_layer), a K level flipped
    by the rotary's float order then flips 7-bit activation levels downstream (measured: 2.8% at one step)."""
    llm = LLM(dtype="float32", kernels="c", model=str(tiny_checkpoint("llama")), block_size=8, kv_cache_memory=16 << 20,
              quantization="int8",
              int8_activation_bits=activation_bits, kv_cache_dtype="float32")
    model = _model(llm)
    assert _c_step(llm) is not None and _c_step(llm).max_rows >= 6
    assert {m.activation_bits for m in model.layers.modules() if isinstance(m, Int8DynamicLinear)} == {activation_bits}
    assert model.logits_head.activation_bits == 8  # the vocabulary projection keeps 8 bits
    prompts = _prompts(model.config.vocab_size, (2, 5, 8, 16, 17, 40))
    with compared_with_layer_by_layer(llm, rel_tol=1e-2) as rows:
        # Staggered lengths: steps of 6, 5, ... 1 requests (1 row: split-K attention; more: a task per KV head).
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (2, 3, 4, 5, 6, 8)]
        llm.generate(prompts, params, use_tqdm=False)
    assert rows == [88, 6, 5, 4, 3, 2, 1, 1]  # the prompts' step (2 + 5 + 8 + 16 + 17 + 40 rows), then decode


def test_c_forward_int8_fused_mlp_agrees_with_layer_by_layer(tiny_checkpoint: Any,
                                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    """The int8 MLP's fused gate/up and silu (step_forward.c's int8_gate_up_silu_phase) with an odd number of
    16-channel panels per half (intermediate 144: a last single panel) and a prompt step of more rows than one
    grab takes at a time (SILU_ROWS, 160): the layer-by-layer forward's values, and bitwise the unfused MLP's (the
    same tiles and silu on the same float32 gate/up values)."""
    from tokenmill.worker.planner import _synthetic_step

    path = tiny_variant(tiny_checkpoint("llama"), tmp_path_factory, "int8-mlp-144", 7, intermediate_size=144)
    llm = LLM(dtype="float32", kernels="c", model=str(path), block_size=8, kv_cache_memory=16 << 20,
              quantization="int8", kv_cache_dtype="float32", max_num_batched_tokens=512)
    assert _c_step(llm) is not None
    vocab_size = llm.engine.vocab_size
    prompts = _prompts(vocab_size, (150, 190, 3))
    with compared_with_layer_by_layer(llm, rel_tol=1e-2) as rows:
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert rows == [343, 3, 3]
    c_step = _c_step(llm)
    for q_len in (340, 1):  # a prompt step past SILU_ROWS, a decode step (one request: its K/V slots its own)
        ids, positions, meta = _synthetic_step(1, q_len, 340, 8, vocab_size)
        outputs = []
        for fuse in (1, 0):
            c_step.kernel._model.fuse_int8_mlp = fuse
            outputs.append(c_step.forward(ids, positions, meta).clone())
        assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("dtype, quantization", [("bfloat16", "none"), ("float32", "int8")])
def test_c_forward_weight_prefetch_changes_no_value(tiny_checkpoint: Any, dtype: str, quantization: str) -> None:
    """The next pair's weight prefetch (prefetch_stream.h: bf16 vdpbf16ps rows from 5 rows, int8 VNNI tiles at any
    row count, on the CPUs that have them) only moves weights into cache: decode steps of 12 down to 1 requests give
    the same tokens and bitwise the same logprobs with it off (the model's prefetch_weights = 0). Without prefix
    caching, so that both runs take the same steps (a hit's last prompt row attends as a one-row request)."""
    llm = LLM(dtype=dtype, kernels="c", model=str(tiny_checkpoint("llama")), block_size=8, kv_cache_memory=16 << 20,
              quantization=quantization, enable_prefix_caching=False)
    c_step = _c_step(llm)
    assert c_step is not None and c_step.kernel._model.prefetch_weights == 1
    prompts = _prompts(llm.engine.vocab_size, tuple(range(3, 15)))
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=3) for n in range(2, 14)]
    runs = []
    for prefetch in (1, 0):
        c_step.kernel._model.prefetch_weights = prefetch
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs.append([(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs])
    c_step.kernel._model.prefetch_weights = 1
    assert runs[0] == runs[1]


@pytest.mark.parametrize("kv_cache_dtype, dtype, rel_tol", [("float16", torch.float16, 1e-4),
                                                            ("int8", torch.int8, 1e-3)])
def test_c_forward_narrow_cache_agrees_with_layer_by_layer(
    tiny_checkpoint: Any, kv_cache_dtype: str, dtype: torch.dtype, rel_tol: float,
) -> None:
    """A float16 or int8 K/V cache in a float32 model: both paths write and read the same rounded K/V (int8:
    the same rows up to a level flipped by float rounding before the write)."""
    llm = LLM(dtype="float32", kernels="c", model=str(tiny_checkpoint("llama")), block_size=8, kv_cache_memory=16 << 20,
              kv_cache_dtype=kv_cache_dtype)
    model = _model(llm)
    assert model.layers[0].self_attn.attn.kv_cache[0].dtype == dtype and _c_step(llm) is not None
    prompts = _prompts(model.config.vocab_size, (2, 5, 8, 16, 17, 40))
    with compared_with_layer_by_layer(llm, rel_tol=rel_tol) as rows:
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (2, 3, 4, 5, 6, 8)]
        llm.generate(prompts, params, use_tqdm=False)
    assert rows == [88, 6, 5, 4, 3, 2, 1, 1]


@pytest.mark.parametrize("kv_cache_dtype, block_size", [("float16", 8), ("bfloat16", 8), ("bfloat16", 16)])
@pytest.mark.parametrize("checkpoint", ["tiny", "head64"])
def test_c_forward_bf16_agrees_with_layer_by_layer(tiny_checkpoint: Any, head64_checkpoint: Any,
                                                   checkpoint: str, kv_cache_dtype: str, block_size: int) -> None:
    """bf16 weights (Bf16PanelLinear): the C forward rounds each product's float32 input to bf16, layer by
    layer the norms return bf16 (a float32 residual stream either way): bf16-rounding-sized differences. With
    64-dim heads on an AMX CPU the whole prompts (in mixed steps too) attend on AMX tiles where the plan says so,
    in both paths. A bfloat16 cache's pair-interleaved tiles are multiplied as they lie with 64-dim heads in blocks
    of 16 (decode: on AMX tiles where the CPU has them, bf16_decode_amx.h, else vdpbf16ps) on an AVX512-BF16 CPU,
    unpacked to float32 rows otherwise; both paths read the same cache."""
    path = tiny_checkpoint("llama") if checkpoint == "tiny" else head64_checkpoint
    llm = LLM(dtype="bfloat16", kernels="c", model=str(path), block_size=block_size, kv_cache_memory=16 << 20,
              kv_cache_dtype=kv_cache_dtype)
    model = _model(llm)
    assert model.layers[0].self_attn.attn.kv_cache[0].dtype == getattr(torch, kv_cache_dtype)
    assert _c_step(llm) is not None
    prompts = _prompts(model.config.vocab_size, (2, 5, 8, 16, 17, 40))
    with compared_with_layer_by_layer(llm, rel_tol=2e-2) as rows:
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (2, 3, 4, 5, 6, 8)]
        llm.generate(prompts, params, use_tqdm=False)
    assert rows == [88, 6, 5, 4, 3, 2, 1, 1]


def test_c_forward_int4_agrees_with_layer_by_layer(tiny_checkpoint: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """W4A16 groups (the plan pinned to c_int4): the decoder's projections are int4_gemm's arithmetic; only float
    rounding in the other ops (then a flipped 16-bit level) separates the two paths. Prompt steps of more than 48
    tokens stay layer by layer (the int4 kernel multiplies each row on its own); smaller ones (a draft model's
    catch-up) take it."""
    pin_int4_kernel(monkeypatch, "c_int4")
    llm = LLM(dtype="float32", kernels="c", model=str(tiny_checkpoint("llama")), block_size=8, kv_cache_memory=16 << 20,
              quantization="int4")
    model = _model(llm)
    assert isinstance(model.layers[0].mlp.down_proj, Int4GroupLinear)
    assert _c_step(llm) is not None and _c_step(llm).kernel.int4_bf16_min_rows == 0
    prompts = _prompts(model.config.vocab_size, (2, 5, 8, 16, 17, 40))
    with compared_with_layer_by_layer(llm, rel_tol=1e-3) as rows:
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (2, 3, 4, 5, 6, 8)]
        llm.generate(prompts, params, use_tqdm=False)
        small = _prompts(model.config.vocab_size, (3, 9, 12))
        llm.generate(small, [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (2, 3, 4)],
                     use_tqdm=False)
    assert rows == [6, 5, 4, 3, 2, 1, 1, 24, 3, 2, 1]


@pytest.mark.skipif(not bf16_units_gemm_available(),
                    reason="a float32 model's int4 projections have the bf16 route only where the CPU multiplies bf16 "
                           "(AMX-BF16 or AVX512-BF16)")
@pytest.mark.parametrize("kv_cache_dtype", ["float32", "bfloat16"])
def test_c_forward_int4_bf16_route_agrees_with_layer_by_layer(tiny_checkpoint: Any, monkeypatch: pytest.MonkeyPatch,
                                                             kv_cache_dtype: str) -> None:
    """int4's bf16 route (the plan pinned to c_int4_bf16 at every row count): the C forward multiplies the int4
    weights as bf16 panels dequantized pass by pass (fused MLP and residual adds as a bf16 model's), layer by layer
    int4_bf16_gemm does per projection; both round their float32 inputs to bf16. Where those inputs differ by float
    order (the 1-row steps' split-K attention against one pass; the prompt step's attention over the step's float32
    K/V against the bf16 cache), an input near a rounding boundary flips by one bf16 step (2^-8 of it) downstream:
    measured on the AMX Xeon, 0.37% of the largest value at one 1-row step over a bf16 cache (0 at the others).
    Prompt steps of any size now take the C forward."""
    pin_int4_kernel(monkeypatch, "c_int4_bf16")
    llm = LLM(dtype="float32", kernels="c", model=str(tiny_checkpoint("llama")), block_size=16,
              kv_cache_memory=16 << 20, quantization="int4", kv_cache_dtype=kv_cache_dtype)
    model = _model(llm)
    c_step = _c_step(llm)
    assert c_step is not None and c_step.kernel.int4_bf16_min_rows == 1
    assert c_step.max_prompt_tokens > 88 and "bf16 units in steps of at least 1 rows" in c_step.describe()
    prompts = _prompts(model.config.vocab_size, (2, 5, 8, 16, 17, 40))
    with compared_with_layer_by_layer(llm, rel_tol=1e-2) as rows:
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (2, 3, 4, 5, 6, 8)]
        llm.generate(prompts, params, use_tqdm=False)
    assert rows == [88, 6, 5, 4, 3, 2, 1, 1]
    # The route switches by the step's rows: W4A16 below the bound, the bf16 products from it; the outputs differ by
    # the inputs' bf16 rounding only.
    from tokenmill.worker.planner import _synthetic_step

    ids, positions, meta = _synthetic_step(1, 40, 40, 16, llm.engine.vocab_size)
    bf16 = c_step.forward(ids, positions, meta).clone()
    c_step.kernel._model.int4_bf16_min_rows = 41
    w4a16 = c_step.forward(ids, positions, meta)
    assert not torch.equal(bf16, w4a16)
    torch.testing.assert_close(bf16, w4a16, rtol=0, atol=2e-2 * w4a16.abs().max().item())


def test_steps_it_does_not_take(tiny_checkpoint: Any) -> None:
    """Decode steps of more requests than max_rows, and steps of more prompt tokens than max_prompt_tokens,
    run layer by layer."""
    llm = LLM(dtype="float32", kernels="c", model=str(tiny_checkpoint("llama")), block_size=8, kv_cache_memory=16 << 20)
    model = _model(llm)
    c_step = _c_step(llm)
    limit = c_step.max_rows
    c_step.max_prompt_tokens = 4 * (limit + 1) - 1  # one short of the prompts' step
    with compared_with_layer_by_layer(llm, rel_tol=1e-5) as rows:
        prompts = _prompts(model.config.vocab_size, (4,) * (limit + 1))
        # limit + 1 requests decode together for 2 steps; then limit of them for 2 more.
        params = [SamplingParams(temperature=0.0, max_tokens=3 if i == 0 else 5, ignore_eos=True)
                  for i in range(limit + 1)]
        llm.generate(prompts, params, use_tqdm=False)
    assert rows == [limit, limit]


def test_chunked_mixed_and_prefix_hit_steps(tiny_checkpoint: Any) -> None:
    """Prompt rows beyond a plain prefill: a 40-token prompt split over steps of 16 tokens (chunked prefill:
    later chunks attend to the cached ones), chunks sharing steps with other requests' decode rows (mixed
    steps), and a second request whose first 24 tokens are cached (a prefix hit: its prompt step computes
    only the rest). Every step agrees with the layer-by-layer forward and the tokens and logprobs with HF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_checkpoint("llama")
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    long, short = _prompts(hf_model.config.vocab_size, (40, 5))
    shared = long[:24] + short  # shares long's first 3 blocks of 8
    expected = hf_greedy(hf_model, AutoTokenizer.from_pretrained(path), [short, long, shared], MAX_TOKENS, 5)

    llm = LLM(dtype="float32", kernels="c", model=str(path), block_size=8, kv_cache_memory=16 << 20,
              max_num_batched_tokens=16,
              enable_prefix_caching=True)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)
    with compared_with_layer_by_layer(llm, rel_tol=1e-5) as rows:
        outputs = [o.outputs[0] for o in llm.generate([short, long], params, use_tqdm=False)]
        outputs += [o.outputs[0] for o in llm.generate([shared], params, use_tqdm=False)]
    check_matches_hf(expected, outputs, "tokenmill C forward, chunked and prefix-hit steps")
    # short's 5 rows and long's first 11, then long's chunks of 15 and 14 beside short's decode row (mixed),
    # then decode steps; shared's step computes its 5 uncached tokens only.
    assert rows[:3] == [16, 16, 15] and rows.count(5) == 1, rows


def test_off_when_asked_or_torch_only(tiny_checkpoint: Any) -> None:
    path = str(tiny_checkpoint("llama"))

    def c_step(**kwargs: Any) -> CStepForward | None:
        return _c_step(LLM(model=path, kv_cache_memory=16 << 20, **kwargs))

    assert c_step(dtype="float32", kernels="c", fused_decode=False) is None
    # Float32 projections reach the C forward packed in panels only.
    assert c_step(dtype="float32", kernels="c", panel_gemm=False) is None
    assert c_step(dtype="bfloat16", kernels="torch") is None
    assert c_step(dtype="bfloat16", kernels="c") is not None


def test_kernel_rejects_bad_inputs(tiny_checkpoint: Any) -> None:
    llm = LLM(dtype="float32", kernels="c", model=str(tiny_checkpoint("llama")), block_size=8, kv_cache_memory=16 << 20)
    kernel = _c_step(llm).kernel
    hidden = torch.zeros(2, kernel.hidden_size)
    ints, ones = torch.zeros(2, dtype=torch.int64), torch.ones(2, dtype=torch.int64)
    tables = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="hidden"):
        kernel.run(hidden.double(), ints, ints, ints, ones, ones, tables)
    with pytest.raises(ValueError, match="hidden"):
        kernel.run(torch.zeros(2, kernel.hidden_size + 1), ints, ints, ints, ones, ones, tables)
    with pytest.raises(ValueError, match="seq_lens"):
        kernel.run(hidden, ints, ints, ints, ones, ones.int(), tables)
    with pytest.raises(ValueError, match="block_tables"):
        kernel.run(hidden, ints, ints, ints, ones, ones, tables[:1])
    with pytest.raises(ValueError, match="positions"):
        kernel.run(hidden, ints[:1], ints, ints, ones, ones, tables)
    with pytest.raises(ValueError, match="add up"):  # 2 requests of 2 rows each, for 2 rows
        kernel.run(hidden, ints, ints, ints, ones + 1, ones + 1, tables)


def test_phase_clock_adds_every_phase_and_leaves_outputs_alone(tiny_checkpoint: Any) -> None:
    llm = LLM(dtype="float32", kernels="c", model=str(tiny_checkpoint("llama")), block_size=8, kv_cache_memory=16 << 20)
    kernel = _c_step(llm).kernel
    prompts = _prompts(llm.engine.vocab_size, (5, 17, 9))
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    untimed = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    kernel.phase_seconds = torch.zeros(len(PHASES), dtype=torch.float64)
    start = time.perf_counter()
    timed = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    wall = time.perf_counter() - start
    assert timed == untimed
    single_rank = kernel.phase_seconds[:-1]  # the last phase, the tensor-parallel all-reduces, has none here
    assert bool((single_rank > 0).all()) and kernel.phase_seconds[-1] == 0
    assert float(kernel.phase_seconds.sum()) < wall


@pytest.mark.parametrize("dtype, quantization", [("float32", "none"), ("bfloat16", "none"), ("float32", "int8")])
def test_row_chunks_do_not_change_the_result(tiny_checkpoint: Any, dtype: str, quantization: str) -> None:
    """A prompt step of more than UNCHUNKED_ROWS rows takes its rows in chunks of row_chunk_bytes (3/8 of the L2):
    every row's result is the same whatever the chunk size; bitwise in float32 and int8 (exact int32 sums), and
    in bf16 up to float32 summation order (a row may fall in an AMX block with one chunk size and in the
    vdpbf16ps tail with another)."""
    from tokenmill.worker.planner import _synthetic_step

    llm = LLM(dtype=dtype, kernels="c", model=str(tiny_checkpoint("llama")), block_size=8, kv_cache_memory=16 << 20,
              quantization=quantization)
    c_step = _c_step(llm)
    assert c_step is not None
    # One request (_synthetic_step's requests share their blocks: several would race for the same slots).
    ids, positions, meta = _synthetic_step(1, 150, 150, 8, llm.engine.vocab_size)
    model_struct = c_step.kernel._model
    outputs = []
    for chunk_bytes in (model_struct.row_chunk_bytes, 1024, 64 << 20):
        model_struct.row_chunk_bytes = chunk_bytes
        outputs.append(c_step.forward(ids, positions, meta).clone())
    for other in outputs[1:]:
        if dtype == "bfloat16":
            scale = outputs[0].abs().max().item()
            torch.testing.assert_close(other.float(), outputs[0].float(), rtol=2e-2, atol=2e-2 * scale)
        else:
            assert torch.equal(outputs[0], other)


def _prompt_outputs(checkpoint: Any, dtype: str, quantization: str, kv_cache_dtype: str, bounds: tuple[int, ...]
                    ) -> dict[int, torch.Tensor]:
    """The C forward's final hidden states of one 150-token whole-context prompt (the same tokens every call) with
    amx_attention_max_rows set to each of bounds."""
    from tokenmill.worker.planner import _synthetic_step

    llm = LLM(dtype=dtype, quantization=quantization, kernels="c", model=str(checkpoint), block_size=8,
              kv_cache_memory=16 << 20, kv_cache_dtype=kv_cache_dtype)
    c_step = _c_step(llm)
    assert c_step is not None
    torch.manual_seed(0)
    ids, positions, meta = _synthetic_step(1, 150, 150, 8, llm.engine.vocab_size)
    outputs = {}
    for bound in bounds:
        c_step.kernel._model.amx_attention_max_rows = bound
        outputs[bound] = c_step.forward(ids, positions, meta).clone().float()
    return outputs


@pytest.mark.skipif(not bf16_prompt_attention_available(64), reason="no AMX-BF16 or AVX512-BF16 here")
@pytest.mark.parametrize("dtype, quantization", [("bfloat16", "none"), ("float32", "int8"), ("float32", "int4")])
def test_amx_prompt_attention_agrees_with_the_float32_kernel(head64_checkpoint: Any, dtype: str,
                                                             quantization: str) -> None:
    """A bf16 (or int8/int4) model's whole-context prompt attends in bf16 (AMX tiles or vdpbf16ps: q/k/v and
    probabilities rounded to bf16, from the step's own rows) when amx_attention_max_rows covers it, else in the
    float32 tile kernel over the cache; a prompt longer than the bound keeps the float32 kernel (bitwise the same as
    with the bound 0). bf16 model: bf16-rounding-sized differences. int8/int4 model (an int8 cache): against the
    same model attending in float32 over a float32 cache, bf16 attention is no further off than the float32 kernel
    over its int8 cache (measured 2.5% against 3.0% (int8), 0.5% against 1.4% (int4), relative Frobenius)."""
    outputs = _prompt_outputs(head64_checkpoint, dtype, quantization, "auto", (0, 149, 150))
    assert torch.equal(outputs[0], outputs[149])
    assert not torch.equal(outputs[0], outputs[150])
    if quantization == "none":
        scale = outputs[0].abs().max().item()
        torch.testing.assert_close(outputs[150], outputs[0], rtol=2e-2, atol=2e-2 * scale)
        return
    exact = _prompt_outputs(head64_checkpoint, dtype, quantization, "float32", (0,))[0]

    def off(x: torch.Tensor) -> float:
        return ((x - exact).norm() / exact.norm()).item()

    assert off(outputs[150]) <= 1.25 * off(outputs[0]) and off(outputs[150]) < 0.05


@pytest.mark.parametrize("dtype, quantization", [("float32", "none"), ("bfloat16", "none"), ("float32", "int8")])
def test_kept_rows_match_the_full_forward(tiny_checkpoint: Any, dtype: str, quantization: str) -> None:
    """keep_rows (the rows the runner reads: a prompt's last row): the last layer runs only those rows past its
    attention, and they come out as the whole step computes them; no kept row at all is a step that only writes
    K/V. Malformed keep_rows are refused."""
    from tokenmill.worker.planner import _synthetic_step

    llm = LLM(dtype=dtype, kernels="c", model=str(tiny_checkpoint("llama")), block_size=8, kv_cache_memory=16 << 20,
              quantization=quantization)
    c_step = _c_step(llm)
    assert c_step is not None
    ids, positions, meta = _synthetic_step(1, 150, 150, 8, llm.engine.vocab_size)
    full = c_step.forward(ids, positions, meta).clone()
    scale = full.abs().max().item()
    for keep in ([149], [0, 1, 70, 149], [5]):
        rows = torch.tensor(keep, dtype=torch.int64)
        got = c_step.forward(ids, positions, meta, keep_rows=rows)
        if dtype == "bfloat16":  # a kept row may run in another AMX block shape than in the whole step
            torch.testing.assert_close(got[rows].float(), full[rows].float(), rtol=2e-2, atol=2e-2 * scale)
        else:
            torch.testing.assert_close(got[rows], full[rows], rtol=1e-5, atol=1e-5 * scale)
    c_step.forward(ids, positions, meta, keep_rows=torch.zeros(0, dtype=torch.int64))  # K/V only
    torch.testing.assert_close(c_step.forward(ids, positions, meta), full, rtol=0, atol=0)
    for bad in ([3, 3], [7, 2], [150], [-1]):
        with pytest.raises(ValueError, match="keep_rows"):
            c_step.forward(ids, positions, meta, keep_rows=torch.tensor(bad, dtype=torch.int64))


def _step_of(requests: list[tuple[list[int], torch.Tensor, int]], block_size: int
             ) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """A step of requests (tokens, block table, q_len): each the last q_len of its tokens, at their positions."""
    from tokenmill.attention.backend import AttentionMetadata

    ids, positions, slots, q_lens, seq_lens = [], [], [], [], []
    for tokens, table, q_len in requests:
        pos = torch.arange(len(tokens) - q_len, len(tokens))
        ids.append(torch.tensor(tokens[len(tokens) - q_len:]))
        positions.append(pos)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
        q_lens.append(q_len)
        seq_lens.append(len(tokens))
    width = max(len(t) for _, t, _ in requests)
    tables = torch.stack([torch.cat([t, t.new_zeros(width - len(t))]) for _, t, _ in requests])
    meta = AttentionMetadata(
        num_tokens=sum(q_lens), block_size=block_size,
        query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()]),
        seq_lens=torch.tensor(seq_lens), block_tables=tables, slot_mapping=torch.cat(slots),
        query_lens_list=q_lens, seq_lens_list=seq_lens)
    return torch.cat(ids), torch.cat(positions), meta


@pytest.mark.skipif(not bf16_amx_ready(), reason="no AMX-BF16 tiles here")
@pytest.mark.parametrize("block_size", [16, 32])
def test_amx_prompts_read_a_bf16_cache(head64_checkpoint: Any, block_size: int) -> None:
    """With a bfloat16 cache of 16-position multiples on AMX tiles, prompts attend on the tiles reading their K/V from
    the cache (amx_cache_prompts): a whole prompt as from its own rows (the same bf16 roundings: bitwise), a chunk
    whose prefix an earlier step cached as the float32 kernel over the cache does (bf16-rounding-sized differences),
    blocks out of order, the cache past each request's end NaN, a decode row beside them. Their rows of the o
    projection's bf16 input written by the attention itself (amx_direct_o): bitwise as rounded from float32 rows."""
    llm = LLM(dtype="bfloat16", kernels="c", model=str(head64_checkpoint), block_size=block_size,
              kv_cache_memory=16 << 20, kv_cache_dtype="bfloat16", enable_prefix_caching=False)
    c_step, model = _c_step(llm), _model(llm)
    assert c_step is not None and c_step.kernel._model.amx_cache_prompts == 1
    c_step.kernel._model.amx_attention_max_rows = 8192
    for layer in model.layers:
        for cache in layer.self_attn.attn.kv_cache:
            cache.fill_(float("nan"))
    whole, chunked, decoding = _prompts(llm.engine.vocab_size, (150, 150, 131))
    blocks = torch.randperm(3 * 10, generator=torch.Generator().manual_seed(5)) + 1  # never the null block 0
    tables = [blocks[i * 10:(i + 1) * 10].sort(descending=True).values for i in range(3)]
    c_step.forward(*_step_of([(chunked[:80], tables[1], 80), (decoding[:130], tables[2], 130)], block_size))
    step = _step_of([(whole, tables[0], 150), (chunked, tables[1], 70), (decoding, tables[2], 1)], block_size)
    outputs = []
    for from_cache, direct_o in ((1, 1), (0, 1), (1, 0)):
        c_step.kernel._model.amx_cache_prompts = from_cache
        c_step.kernel._model.amx_direct_o = direct_o
        outputs.append(c_step.forward(*step).clone().float())
    c_step.kernel._model.amx_cache_prompts = c_step.kernel._model.amx_direct_o = 1
    cached, rows, rounded_after = outputs
    assert torch.isfinite(cached).all()
    assert torch.equal(cached, rounded_after)  # o's bf16 input from the attention's store: the same roundings
    assert torch.equal(cached[:150], rows[:150])
    scale = rows[150:220].abs().max().item()
    assert not torch.equal(cached[150:220], rows[150:220])  # the chunk took another kernel
    torch.testing.assert_close(cached[150:220], rows[150:220], rtol=2e-2, atol=2e-2 * scale)
    assert torch.equal(cached[220:], rows[220:])
