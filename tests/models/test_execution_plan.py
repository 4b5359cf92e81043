"""The execution plan (worker/plan.py, worker/planner.py): cached under a key of everything its timings
depend on, applied without timing when cached, and every forced kernel family computes the same model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.models.utils import check_logprobs_close
from tokenmill import LLM, SamplingParams
from tokenmill.attention.torch_backend import TorchAttentionBackend, max_rows_routed
from tokenmill.kernels.cpu.bf16_prompt_attention import AMX_ATTENTION_MAX_KEYS, bf16_prompt_attention_available
from tokenmill.layers.linear import Linear
from tokenmill.layers.panel_linear import PanelLinear
from tokenmill.layers.planned_linear import PlannedLinear
from tokenmill.worker import cpu_load
from tokenmill.worker import plan as plan_module
from tokenmill.worker.c_step import CStepForward
from tokenmill.worker.plan import Choice, ExecutionPlan, choose, load_plan, plan_path, routes_from_choices, save_plan


@pytest.fixture()
def plan_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache root of this test's own (the default model's converted GGUF is not needed here). The machine's load
    reads as unknown, so that a busy test machine does not keep plans out of the cache here (tested below)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_load, "sample", lambda: None)
    return tmp_path / "tokenmill"


def _engine_plan(path: str, block_size: int = 8) -> ExecutionPlan:
    return LLM(dtype="float32", model=path, block_size=block_size, kv_cache_memory=16 << 20).engine.core.plan


def test_plan_is_cached_and_keyed(tiny_checkpoint: Any, plan_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tiny_checkpoint("llama"))
    first = _engine_plan(path)
    assert not first.cached and first.choices
    assert plan_path(plan_cache, first.key).is_file()
    operations = {c.operation for c in first.choices}
    assert {"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"} <= operations
    if TorchAttentionBackend().use_c_prefill:  # the C prefill kernel against torch's fused attention
        assert {c.kernel for c in first.choices if c.operation == "prompt_attention"} <= {"c_paged", "torch_sdpa"}
        assert len([c for c in first.choices if c.operation == "prompt_attention"]) == 2
    assert all(c.kernel in c.seconds for c in first.choices)

    second = _engine_plan(path)  # same machine, model and settings: read back, nothing timed
    assert second.cached and second.key == first.key
    assert [(c.operation, c.rows, c.kernel) for c in second.choices] == [
        (c.operation, c.rows, c.kernel) for c in first.choices]

    other = _engine_plan(path, block_size=16)  # a setting the step timings depend on: a new key
    assert not other.cached and other.key != first.key

    # Changed C kernel sources: timed again.
    monkeypatch.setattr("tokenmill.worker.planner.kernel_sources_digest", lambda: "changed kernels")
    rebuilt = _engine_plan(path)
    assert not rebuilt.cached and rebuilt.key != first.key

    # Another machine (CPU flags, threads or torch version change the capabilities' key): rebuilt.
    monkeypatch.setattr("tokenmill.worker.capabilities.MachineCapabilities.cache_key", lambda self: "another cpu")
    moved = _engine_plan(path)
    assert not moved.cached and moved.key != first.key


def test_only_bf16_and_quantized_models_may_attend_prompts_in_bf16(head64_checkpoint: Any, plan_cache: Path) -> None:
    """Our bf16 prompt attention is a candidate of an int8 or int4 model's plan where it runs (their float32
    activations are quantized already) as of a bf16 model's, and never of a float32 model's (greedy HF parity); the
    C forward follows the route it wins."""
    if not (TorchAttentionBackend().use_c_prefill and bf16_prompt_attention_available(64)):
        pytest.skip("no C prefill kernel or no bf16 attention kernel here")
    for quantization, dtype, allowed in (("none", "float32", False), ("int8", "float32", True),
                                         ("int4", "float32", True), ("none", "bfloat16", True)):
        llm = LLM(dtype=dtype, quantization=quantization, model=str(head64_checkpoint), block_size=8,
                  kv_cache_memory=16 << 20)
        choices = [c for c in llm.engine.core.plan.choices if c.operation == "prompt_attention"]
        assert choices and all(("c_bf16" in c.seconds) == allowed for c in choices), (quantization, dtype)
        backend = llm.engine.core.runner.model.attention_layers[0].backend
        assert backend.prompt_routes == routes_from_choices(choices)
        c_step = next((p for p in llm.engine.core.runner.step_paths if isinstance(p, CStepForward)), None)
        if c_step is not None:
            routed = max_rows_routed(backend.prompt_routes, "c_bf16", AMX_ATTENTION_MAX_KEYS)
            assert c_step.kernel._model.amx_attention_max_rows == routed
            assert allowed or routed == 0


def test_step_sizes_past_the_c_forwards_first_loss_are_not_timed(tiny_checkpoint: Any, plan_cache: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The C forward keeps only the step sizes below its first loss, so the larger ones are not timed (the largest
    prompt steps were most of a plan's build time); the sizes it keeps are those below the loss."""
    timed: list[tuple[str, int]] = []

    def rigged(operation: str, rows: int, fns: dict[str, Any]) -> Choice:
        timed.append((operation, rows))
        c_loses = (operation == "decode_step" and rows >= 16) or (operation == "prompt_step" and rows >= 512)
        kernel = "layers" if c_loses and "layers" in fns else next(iter(fns))
        return Choice(operation, rows, kernel, {name: 1.0 if name == kernel else 2.0 for name in fns})

    monkeypatch.setattr("tokenmill.worker.planner.choose", rigged)
    llm = LLM(dtype="float32", model=str(tiny_checkpoint("llama")), block_size=8, kv_cache_memory=64 << 20,
              max_model_len=512)
    steps = [t for t in timed if t[0] in ("decode_step", "prompt_step")]
    if not steps:
        pytest.skip("no C forward here")
    assert steps == [("decode_step", 1), ("decode_step", 16), ("prompt_step", 256), ("prompt_step", 512)]
    c_step = next(p for p in llm.engine.core.runner.step_paths if isinstance(p, CStepForward))
    assert c_step.max_rows == 1 and c_step.max_prompt_tokens == 256


def _cpu(wall: float, busy: float, own: float, cpus: int = 2) -> cpu_load.CpuSample:
    return cpu_load.CpuSample(wall=wall, busy=busy, own=own, cpus=cpus)


def test_others_cpu_time_beyond_the_free_cores_disturbs_a_timing() -> None:
    start = _cpu(0.0, 100.0, 10.0)
    # 10 s of timing with 2 threads on 2 CPUs: 19.5 busy CPU-seconds, 19 of them ours -> others 0.05 cores
    assert cpu_load.others_cores(start, _cpu(10.0, 119.5, 29.0)) == pytest.approx(0.05)
    assert cpu_load.disturbed(start, _cpu(10.0, 119.5, 29.0), threads=2) is None
    # another process (or the hypervisor's steal) took 0.6 cores
    assert cpu_load.disturbed(start, _cpu(10.0, 125.0, 29.0), threads=2) == pytest.approx(0.6)
    # one thread of a tensor-parallel rank: the other core is its peer's, not contention
    assert cpu_load.disturbed(start, _cpu(10.0, 120.0, 20.0), threads=1) is None
    assert cpu_load.disturbed(start, _cpu(10.0, 123.0, 20.0), threads=1) == pytest.approx(1.3)
    assert cpu_load.disturbed(None, _cpu(10.0, 125.0, 29.0), threads=2) is None  # unknown: not disturbed


def test_cpu_samples_read_this_machine(tmp_path: Path) -> None:
    first = cpu_load.sample()
    if first is None:
        pytest.skip("no /proc/stat here")
    sum(i * i for i in range(300_000))  # some CPU time of our own
    second = cpu_load.sample()
    assert second is not None and second.cpus >= 1 and second.own > first.own and second.busy >= first.busy
    (tmp_path / "stat").write_text("intr 1 2 3\n")
    assert cpu_load.sample(str(tmp_path / "stat")) is None  # no cpu line


class _BusyMachine:
    """cpu_load.sample's stand-in: each reading 1 s after the last, both CPUs busy, this process on one of them
    (another process kept the other core: disturbed for a timing with 2 threads)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> cpu_load.CpuSample:
        self.calls += 1
        return _cpu(float(self.calls), 2.0 * self.calls, 1.0 * self.calls)


def test_a_disturbed_timing_is_done_again(monkeypatch: pytest.MonkeyPatch) -> None:
    timings = []
    monkeypatch.setattr(plan_module, "median_time", lambda fns, **_: timings.append(1) or {k: 1.0 for k in fns})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    busy = _BusyMachine()
    monkeypatch.setattr(cpu_load, "sample", busy)
    choice = choose("op", 1, {"c": lambda: None, "torch": lambda: None})
    assert len(timings) == plan_module.CHOICE_ATTEMPTS and choice.disturbed  # busy throughout: tried, flagged
    quiet_after_one = iter([_cpu(0.0, 0.0, 0.0), _cpu(1.0, 2.0, 1.0), _cpu(2.0, 2.0, 1.0), _cpu(3.0, 4.0, 3.0)])
    monkeypatch.setattr(cpu_load, "sample", lambda: next(quiet_after_one))
    timings.clear()
    choice = choose("op", 1, {"c": lambda: None, "torch": lambda: None})
    assert len(timings) == 2 and not choice.disturbed  # the second timing ran on a quiet machine
    assert ExecutionPlan.from_json(ExecutionPlan("k", "m", [choice]).to_json()).choices == [choice]


def test_a_plan_timed_on_a_busy_machine_is_used_but_not_cached(tiny_checkpoint: Any, plan_cache: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_module, "CHOICE_ATTEMPTS", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(cpu_load, "sample", _BusyMachine())
    path = str(tiny_checkpoint("llama"))
    busy = _engine_plan(path)
    assert not busy.cached and busy.choices and not plan_path(plan_cache, busy.key).exists()
    assert all(c.disturbed for c in busy.choices)
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(plan_cache.parent))
    monkeypatch.setattr(cpu_load, "sample", lambda: None)
    again = _engine_plan(path)  # timed again, on a machine that now reads as quiet: cached
    assert not again.cached and plan_path(plan_cache, again.key).is_file()


def test_a_plan_file_of_another_key_is_not_used(tmp_path: Path) -> None:
    plan = ExecutionPlan(key="key a", machine="m", choices=[Choice("o_proj", 1, "torch_fp32", {"torch_fp32": 1e-3})])
    save_plan(tmp_path, plan)
    assert load_plan(tmp_path, "key a").choices == plan.choices
    plan_path(tmp_path, "key b").write_text(plan_path(tmp_path, "key a").read_text())  # a stale or copied file
    assert load_plan(tmp_path, "key b") is None
    plan_path(tmp_path, "key a").write_text("{not json")
    assert load_plan(tmp_path, "key a") is None


def test_choice_prefers_the_first_candidate_within_the_margin(monkeypatch: pytest.MonkeyPatch) -> None:
    times = {"c": 1.02, "torch": 1.0}
    monkeypatch.setattr(plan_module, "median_time", lambda fns, **_: {k: times[k] for k in fns})
    assert choose("op", 1, {"c": lambda: None, "torch": lambda: None}).kernel == "c"
    times["c"] = 1.2
    chosen = choose("op", 1, {"c": lambda: None, "torch": lambda: None})
    assert chosen.kernel == "torch" and chosen.runner_up_ratio() == 1.0


def test_a_narrow_win_over_the_preferred_candidate_is_timed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A later candidate ahead of the preferred one by less than CONFIRM_MARGIN is timed again; each keeps the lower
    of its two medians, so a first timing that a noisy neighbour slowed for the preferred one does not decide."""
    rounds = [{"c": 1.10, "torch": 1.0}, {"c": 0.98, "torch": 1.01}]
    calls = []
    monkeypatch.setattr(plan_module, "median_time", lambda fns, **_: calls.append(1) or rounds[len(calls) - 1])
    chosen = choose("op", 1, {"c": lambda: None, "torch": lambda: None})
    assert len(calls) == 2 and chosen.kernel == "c" and chosen.seconds == {"c": 0.98, "torch": 1.0}
    rounds[:] = [{"c": 1.10, "torch": 1.0}, {"c": 1.12, "torch": 0.99}]  # confirmed: the later one wins
    calls.clear()
    chosen = choose("op", 1, {"c": lambda: None, "torch": lambda: None})
    assert len(calls) == 2 and chosen.kernel == "torch"
    rounds[:] = [{"c": 1.3, "torch": 1.0}]  # a clear win: one timing
    calls.clear()
    assert choose("op", 1, {"c": lambda: None, "torch": lambda: None}).kernel == "torch" and len(calls) == 1


def test_routes_merge_equal_neighbours_and_planned_linear_dispatches_by_rows() -> None:
    choices = [Choice("o", r, k, {k: 1.0}) for r, k in ((1, "c"), (16, "c"), (64, "t"), (256, "t"), (2048, "c"))]
    assert routes_from_choices(choices) == [(16, "c"), (256, "t"), (2048, "c")]
    torch.manual_seed(0)
    plain = Linear(24, 40, bias=True)
    plain.weight.data.normal_(), plain.bias.data.normal_()
    panels = PanelLinear(plain.weight, plain.bias)
    planned = PlannedLinear([(16, panels), (256, plain)], ["c_f32_panels", "torch_fp32"])
    for rows, used in ((3, panels), (16, panels), (17, plain), (300, plain)):
        x = torch.randn(rows, 24)
        assert torch.equal(planned(x), used(x))
        torch.testing.assert_close(planned(x), x @ plain.weight.t() + plain.bias, rtol=1e-5, atol=1e-5)
    assert planned.impl_of(PanelLinear) is panels


def test_forced_families_agree_in_bfloat16(tiny_checkpoint: Any, plan_cache: Path) -> None:
    """bf16 products (oneDNN) with the C attention (family c) and with torch's attention (family torch):
    greedy sequences may part only where each pick is in the other's top-k (bf16's tolerance)."""
    path = str(tiny_checkpoint("llama"))
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (1, 9, 40)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5)
    results = {}
    for kernels in ("c", "torch"):
        llm = LLM(dtype="bfloat16", model=path, block_size=8, kv_cache_memory=16 << 20, kernels=kernels)
        outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        results[kernels] = [(o.token_ids, [{t: lp.logprob for t, lp in pos.items()} for pos in o.logprobs])
                            for o in outs]
    assert results["c"][0][0], "nothing generated"
    check_logprobs_close(outputs_0=results["c"], outputs_1=results["torch"], name_0="c", name_1="torch")


def test_greedy_ids_from_the_vocabulary_projection_match_the_sampler(tiny_checkpoint: Any, plan_cache: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 model's greedy rows take their ids from the head's fused argmax (no logits); the tokens are those the
    sampler picks from the logits, and requests with logprobs (which need the logits) still get them."""
    from tokenmill.models.llama import LlamaForCausalLM

    path = str(tiny_checkpoint("llama"))
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (1, 9, 40)]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    llm = LLM(dtype="bfloat16", model=path, block_size=8, kv_cache_memory=16 << 20)
    calls = []
    fused = LlamaForCausalLM.greedy_token_ids

    def counted(self: LlamaForCausalLM, hidden: torch.Tensor) -> torch.Tensor | None:
        ids = fused(self, hidden)
        calls.append(ids is not None)
        return ids

    monkeypatch.setattr(LlamaForCausalLM, "greedy_token_ids", counted)
    with_fused = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    if not any(calls):
        pytest.skip("the plan put no bf16 panel kernel on the vocabulary projection here")
    monkeypatch.setattr(LlamaForCausalLM, "greedy_token_ids", lambda self, hidden: None)
    from_logits = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    assert with_fused == from_logits and with_fused[0]
    calls.clear()
    monkeypatch.setattr(LlamaForCausalLM, "greedy_token_ids", counted)
    with_logprobs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2),
                                 use_tqdm=False)
    assert not calls  # logprobs need the logits: the sampler's path
    assert [o.outputs[0].token_ids for o in with_logprobs] == from_logits
    assert all(len(o.outputs[0].logprobs) == 12 for o in with_logprobs)


def test_steps_timed_on_the_first_layers_compute_those_layers(tiny_checkpoint: Any, plan_cache: Path) -> None:
    """The plan times prompt steps on the first layers (model.first_layers, the C forward's kernel.first_layers):
    both then compute the same truncated model, which differs from the whole one, and every layer is back after."""
    from tokenmill.worker.planner import _synthetic_step

    llm = LLM(dtype="float32", model=str(tiny_checkpoint("llama")), block_size=8, kv_cache_memory=16 << 20)
    core = llm.engine.core
    c_step = next((p for p in core.runner.step_paths if isinstance(p, CStepForward)), None)
    if c_step is None:
        pytest.skip("no C forward here")
    model = core.model
    depth = len(model.decoder_layers())
    assert depth >= 2
    ids, positions, meta = _synthetic_step(1, 8, 8, 8, model.config.vocab_size)  # one request: its own slots
    with torch.no_grad():
        whole = model(ids, positions, meta).clone()
        with model.first_layers(1), c_step.kernel.first_layers(1):
            assert len(model.decoder_layers()) == 1
            layers = model(ids, positions, meta).clone()
            c_forward = c_step.forward(ids, positions, meta).clone()
        torch.testing.assert_close(c_forward, layers, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(layers, whole, rtol=1e-3, atol=1e-3)
        assert len(model.decoder_layers()) == depth
        torch.testing.assert_close(c_step.forward(ids, positions, meta), whole, rtol=1e-4, atol=1e-4)
