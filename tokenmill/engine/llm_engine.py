"""LLMEngine: tokenization, validation and output processing around an EngineCore (synchronous)."""

from __future__ import annotations

import logging
import time
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.engine.core import EngineCore
from tokenmill.engine.input_processor import InputProcessor, ProcessedPrompt, Prompt
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.step_timer import NULL_TIMER, AnyStepTimer
from tokenmill.loader import LoadedModel, load_model
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger("tokenmill")

__all__ = ["LLMEngine", "ProcessedPrompt", "Prompt", "load_engine_model"]


def load_engine_model(config: EngineConfig) -> LoadedModel:
    """The checkpoint of config.model, loaded in the compute dtype the config resolves to."""
    from tokenmill.worker.device import resolve_device, resolve_dtype

    m = config.model
    dtype = resolve_dtype(m.dtype, resolve_device(m.device), m.quantization, m.batch_invariant)
    return load_model(config.model.model, dtype=dtype)


class LLMEngine:
    def __init__(
        self, config: EngineConfig, loaded: LoadedModel | None = None, step_timer: AnyStepTimer = NULL_TIMER
    ) -> None:
        loaded = loaded or load_engine_model(config)
        self.config = config
        self.timer = step_timer
        self.core = EngineCore(config, loaded, step_timer)
        self.max_model_len = self.core.max_model_len
        self.inputs = InputProcessor(loaded, self.max_model_len)
        self.tokenizer, self.hf_config, self.vocab_size = self.inputs.tokenizer, loaded.hf_config, self.inputs.vocab_size
        self.eos_token_ids, self.eos_token_id = self.inputs.eos_token_ids, self.inputs.eos_token_id
        self.output_processor = OutputProcessor(self.tokenizer)

    def close(self) -> None:
        """Releases what outlives a step: the other tensor-parallel ranks' processes, if any (idempotent)."""
        self.core.close()

    # -- input ---------------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: Prompt, add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
        return self.inputs.tokenize_prompt(prompt, add_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return self.inputs.apply_chat_template(messages, add_generation_prompt)

    def process_inputs(
        self, prompt: Prompt, params: SamplingParams, add_special_tokens: bool = True
    ) -> ProcessedPrompt:
        """Tokenizes and validates a request without touching engine state (safe to call from any
        thread); raises ValueError naming the field on bad input."""
        return self.inputs.process_inputs(prompt, params, add_special_tokens)

    def add_request(
        self, req_id: str, prompt: Prompt | ProcessedPrompt, params: SamplingParams, priority: int = 0,
        add_special_tokens: bool = True, arrival_time: float | None = None,
    ) -> None:
        """Validates and queues a request; raises ValueError (naming the field) on bad input."""
        if not isinstance(prompt, ProcessedPrompt):
            prompt = self.process_inputs(prompt, params, add_special_tokens)
        text, token_ids = prompt.text, prompt.token_ids
        params = params.clone()
        params.all_stop_token_ids = set(self.eos_token_ids)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        children = self.output_processor.add_request(req_id, text, token_ids, params, arrival)
        group_id = req_id if params.n > 1 else None
        added: list[str] = []
        try:
            for i, child_id in enumerate(children):
                child_params = params
                if params.n > 1 and params.seed is not None:
                    child_params = params.clone(seed=params.seed + i)
                request = Request(
                    child_id, token_ids, child_params, eos_token_id=self.eos_token_id, priority=priority,
                    arrival_time=arrival, group_id=group_id,
                )
                self.core.add_request(request)
                added.append(child_id)
        except ValueError:
            self.core.abort_requests(added)
            self.output_processor.abort_request(req_id)
            raise

    def abort_request(self, req_id: str) -> RequestOutput | None:
        children = self.output_processor.child_ids(req_id)
        self.core.abort_requests(children)
        return self.output_processor.abort_request(req_id)

    # -- stepping --------------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        core_outputs = self.core.step()
        with self.timer.section("update"):
            outputs, stopped = self.output_processor.process_outputs(core_outputs)
            if stopped:
                self.core.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        return outputs
