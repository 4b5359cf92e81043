"""Worker: owns the model's lifecycle on one device. Builds the model and loads its weights, quantizes it,
resolves the execution plan (worker/plan.py: timed here once, or read from its cache) and applies it, sizes
and binds the KV cache, and sets up the model runner with its whole-step fast paths (worker/step_paths.py).
Each step arrives as plain data (`execute(StepInput)`, worker/step_input.py): the worker keeps its own state of the
requests it holds (worker/request_states.py) and never sees the engine's Request objects.

Under tensor parallelism (`tp`, a world of more than one rank) the worker holds its rank's share of the model
(models/llama.py) and every rank runs every step. Each rank plans its own share's products; where the ranks share a
machine the one-call C forward sums the row-parallel outputs through their shared memory and takes every step it can
(whole steps are not timed under tensor parallelism: the timing runs would meet the other ranks' collectives out of
order); across machines the steps run layer by layer.

The plan is resolved once, here, and held here (`plan`); the layers and the attention backend read the kernels
it installed, and it is logged once. On a GPU, and under --compile, there is no plan: the GPU's kernels are
Triton's, and compiled layers keep torch's products.
"""

from __future__ import annotations

import logging

import torch

from tokenmill.attention.backend import get_attention_backend
from tokenmill.config import CPU_QUANTIZATIONS, EngineConfig
from tokenmill.distributed.communicator import SINGLE, Communicator
from tokenmill.engine.kv_budget import describe_capacity, num_kv_blocks
from tokenmill.engine.step_timer import NULL_TIMER, AnyStepTimer
from tokenmill.loader import LoadedModel
from tokenmill.models.registry import resolve_model_class
from tokenmill.spec.proposer import build_proposer
from tokenmill.worker.capabilities import detect_capabilities
from tokenmill.worker.device import (
    check_quantization,
    cuda_graph_sizes,
    default_dtype,
    resolve_attention_backend,
    resolve_device,
    resolve_dtype,
    resolve_kv_cache_dtype,
)
from tokenmill.worker.model_runner import KVCacheSpec, ModelRunner
from tokenmill.worker.plan import ExecutionPlan
from tokenmill.worker.planner import (
    finish_plan,
    new_or_cached_plan,
    pin_batch_invariant,
    plan_attention,
    plan_model,
    plan_steps,
)
from tokenmill.worker.request_states import RequestStates
from tokenmill.worker.runner_output import ModelRunnerOutput
from tokenmill.worker.step_input import StepInput

logger = logging.getLogger("tokenmill")


def resolve_max_model_len(config: EngineConfig, hf_config: object) -> int:
    model_len = int(getattr(hf_config, "max_position_embeddings", 0) or 2048)
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True) is not False:
        # Without sliding-window attention kernels, stay within the window where results are exact.
        model_len = min(model_len, int(window))
    asked = config.model.max_model_len
    if asked is not None and asked > model_len:
        raise ValueError(f"max_model_len={asked} exceeds the model's context length of {model_len} tokens")
    return asked or model_len


class Worker:
    def __init__(self, config: EngineConfig, loaded: LoadedModel, step_timer: AnyStepTimer = NULL_TIMER,
                 tp: Communicator = SINGLE, kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """`kv_caches`: another worker's K/V cache to use instead of one of its own (a self-draft's: the target's,
        with config.cache.num_blocks and kv_cache_dtype set to match it)."""
        self.tp = tp
        self.device = resolve_device(config.model.device)
        if self.device.type == "cuda" and tp.is_parallel:  # this rank's own GPU (distributed/worker_group.py)
            self.device = tp.device
        self.dtype = resolve_dtype(config.model.dtype, self.device, config.model.quantization,
                                   config.model.batch_invariant)
        backend = resolve_attention_backend(config.cache.attention_backend, self.device)
        check_quantization(config, self.device, backend)
        if config.parallel.num_threads is not None:
            torch.set_num_threads(config.parallel.num_threads)
        hf_config = loaded.hf_config
        self.max_model_len = resolve_max_model_len(config, hf_config)

        on_cpu = self.device.type == "cpu"
        if on_cpu and tp.is_parallel:  # the largest sum: a step's hidden rows
            tp.enable_shared_memory(config.scheduler.max_num_batched_tokens * int(hf_config.hidden_size),
                                    tp.world_size // config.parallel.nnodes)
        # The CPU kernel family; on a GPU nothing of it applies. Under --compile the plan is not built (the
        # compiled layers keep torch's products), but the eager attention between them keeps the C kernels.
        family = config.model.kernels if on_cpu else "torch"
        if on_cpu:
            logger.info("machine: %s", detect_capabilities().summary())
        model = self._build_model(config, loaded, backend, family)
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        kv_dtype = resolve_kv_cache_dtype(config.cache.kv_cache_dtype, self.dtype, backend, config.model.quantization,
                                          config.cache.block_size, head_dim)
        self.plan: ExecutionPlan | None = (
            None if not on_cpu or config.parallel.compile else new_or_cached_plan(config, model, kv_dtype, tp))
        invariant = config.model.batch_invariant
        # Deterministic mode has no C forward: its kernels (and their reductions) are not the layers' ones.
        use_c_forward = config.model.fused_decode and family != "torch" and self.plan is not None and not invariant
        if self.plan is not None:
            plan_model(model, self.plan, family, keep_panels=use_c_forward and config.model.panel_gemm,
                       panels=config.model.panel_gemm, batch_invariant=invariant)
            if not invariant:
                plan_attention(model, self.plan, family, kv_dtype, config.cache.block_size,
                               quantized=config.model.quantization in CPU_QUANTIZATIONS)
        if invariant:
            if self.plan is None:
                raise ValueError("batch_invariant needs the CPU's execution plan (not compile, not a GPU)")
            pin_batch_invariant(model)
        huge_pages = config.model.huge_pages and on_cpu
        if huge_pages:  # before anything holds raw weight pointers (the C forward, set up below)
            from tokenmill.worker.huge_pages import weight_arena

            moved, advised = weight_arena(model)
            logger.info("weights: %.0f MiB in one arena, %s", moved / 2**20,
                        "2 MiB huge pages" if advised else "4 KiB pages (the OS refused huge pages)")
        self.model = model.eval()

        layer0 = model.attention_layers[0]
        kv_spec = KVCacheSpec(num_layers=len(model.attention_layers), num_kv_heads=layer0.num_kv_heads,
                              head_dim=layer0.head_dim, block_size=config.cache.block_size, dtype=kv_dtype)
        # A draft model (speculative decoding) has a K/V cache of as many blocks, in the same budget (a self-draft
        # shares the target's: no bytes of its own).
        draft_loaded, draft_bytes_per_block = self._load_draft(config, backend)
        # Every rank must hold the same blocks (the one scheduler hands them out): the smallest budget wins.
        self.num_blocks = tp.min_int(num_kv_blocks(config.cache, kv_spec.bytes_per_block + draft_bytes_per_block,
                                                   self.device))
        self.block_size = kv_spec.block_size
        self.capacity = describe_capacity(self.num_blocks, kv_spec.block_size, kv_spec.bytes_per_block,
                                          self.max_model_len)
        logger.info(self.capacity)
        self.runner = ModelRunner(
            model, kv_spec, self.num_blocks, hf_config.vocab_size, self.device, config.model.seed,
            max_model_len=self.max_model_len, cuda_graph_sizes=cuda_graph_sizes(config, self.device, backend),
            step_timer=step_timer, huge_pages=huge_pages, kv_caches=kv_caches,
        )
        if step_timer.enabled and self.device.type == "cuda":
            step_timer.sync = torch.cuda.synchronize
        if config.parallel.compile:
            from tokenmill.worker.compile import compile_model

            compile_model(model)
        elif use_c_forward:
            self._add_c_step(family)
        if self.plan is not None:
            finish_plan(self.plan)
        self.requests = RequestStates()
        self.timer = step_timer
        self.proposer = build_proposer(config, self, draft_loaded) if config.speculative.spec is not None else None

    def execute(self, step: StepInput) -> ModelRunnerOutput:
        """Runs one step: its message applied to the held requests first, so that a step that fails still leaves
        them as the engine believes they are (the engine then finishes the step's requests, and drops them). With
        speculative decoding the proposer fills the step's draft slots before the model runs."""
        scheduled = self.requests.apply(step)
        if self.proposer is not None:
            self.proposer.drop(step.dropped_req_ids)
            with self.timer.section("propose"):
                self.proposer.follow(scheduled)
                if any(s.num_spec_tokens for s in scheduled):
                    self.proposer.propose(scheduled)
        if step.grammar is not None:  # structured output's masks (wrappers of execute(scheduled) stay valid without)
            return self.runner.execute(scheduled, step.grammar)
        return self.runner.execute(scheduled)

    def _load_draft(self, config: EngineConfig, backend: str) -> tuple[LoadedModel | None, int]:
        """The draft model's checkpoint (speculative decoding with a draft model) and the bytes a block of its K/V
        cache takes of its own; (None, 0) without one."""
        spec = config.speculative.spec
        if spec is None or spec.method != "draft_model":
            return None, 0
        from tokenmill.spec.draft_model import draft_engine_config, load_draft_model

        loaded = load_draft_model(config, spec)
        if spec.is_self_draft(config.model.model):
            return loaded, 0  # it writes and reads the target's own K/V cache (spec/draft_model.py)
        draft = draft_engine_config(config, spec).model
        dtype = resolve_dtype(draft.dtype, self.device, draft.quantization)
        hf = loaded.hf_config
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        kv_spec = KVCacheSpec(
            num_layers=hf.num_hidden_layers, num_kv_heads=getattr(hf, "num_key_value_heads", hf.num_attention_heads),
            head_dim=head_dim, block_size=config.cache.block_size,
            dtype=resolve_kv_cache_dtype(config.cache.kv_cache_dtype, dtype, backend, draft.quantization,
                                         config.cache.block_size, head_dim))
        return loaded, kv_spec.bytes_per_block

    def _build_model(self, config: EngineConfig, loaded: LoadedModel, backend: str, family: str) -> torch.nn.Module:
        """The model in the compute dtype on the device, its weights loaded and quantized as configured."""
        model_cls = resolve_model_class(loaded.hf_config)
        # Parameters start uninitialised, in the compute dtype on the device: the checkpoint fills them.
        with torch.device(self.device), default_dtype(self.dtype):
            model = model_cls(loaded.hf_config, get_attention_backend(backend, use_c_kernels=family != "torch"),
                              self.max_model_len, self.dtype, self.device, tp=self.tp)
        model = model.to(self.dtype)
        model.load_weights(loaded.state_dict)
        quantization = config.model.quantization
        if quantization == "fp8":
            from tokenmill.quant.fp8 import quantize_model_fp8

            quantize_model_fp8(model)
        elif quantization == "int8":
            from tokenmill.quant.int8_cpu import quantize_model_int8
            from tokenmill.quant.smooth import CALIBRATION_TEXT

            calibration_ids = loaded.tokenizer.encode(CALIBRATION_TEXT, add_special_tokens=True)
            replaced = quantize_model_int8(model, calibration_ids, quantize_lm_head=config.model.quantize_lm_head,
                                           activation_bits=config.model.int8_activation_bits)
            logger.info("int8 W8A%d: %d projections quantized", config.model.int8_activation_bits, replaced)
        elif quantization == "int4":
            from tokenmill.quant.int4_cpu import quantize_model_int4

            replaced = quantize_model_int4(model, quantize_lm_head=config.model.quantize_lm_head)
            logger.info("int4 W4A16: %d projections quantized", replaced)
        return model

    def _add_c_step(self, family: str) -> None:
        """The one-call C forward as a whole-step path, for the step sizes the plan timed it faster at."""
        from tokenmill.worker.c_step import build_c_step

        if not hasattr(self.model, "rotary"):  # a model family the C forward does not describe
            return
        c_step = build_c_step(self.model, self.runner.build_inputs)
        if c_step is None:
            return
        if self.tp.is_parallel:
            # Timing whole steps would run the ranks' collectives out of step with each other: the C forward takes
            # every step it can (it won every step size the plans of one rank timed on both machines seen).
            self.runner.step_paths.append(c_step)
            logger.info("%s", c_step.describe())
            return
        if not plan_steps(self.model, c_step, self.plan, family, self.num_blocks, self.block_size):
            logger.info("every step runs layer by layer (the execution plan timed the C forward slower)")
            return
        self.runner.step_paths.append(c_step)
        logger.info("%s", c_step.describe())
