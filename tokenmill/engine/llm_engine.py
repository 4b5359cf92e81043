"""LLMEngine: tokenization, validation and output processing around an EngineCore (synchronous)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.engine.core import EngineCore
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.step_timer import NULL_TIMER, AnyStepTimer
from tokenmill.loader import LoadedModel, load_model
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger("tokenmill")

Prompt = str | Sequence[int]


@dataclass(frozen=True)
class ProcessedPrompt:
    """A tokenized, validated prompt (text is None when the caller gave token ids)."""

    text: str | None
    token_ids: list[int]


def _generation_eos_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (loaded.generation_config.get("eos_token_id"), getattr(loaded.hf_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(t) for t in source)
    return ids


def load_engine_model(config: EngineConfig) -> LoadedModel:
    """The checkpoint of config.model, loaded in the compute dtype the config resolves to."""
    from tokenmill.worker.device import resolve_device, resolve_dtype

    dtype = resolve_dtype(config.model.dtype, resolve_device(config.model.device), config.model.quantization)
    return load_model(config.model.model, dtype=dtype)


class LLMEngine:
    def __init__(
        self, config: EngineConfig, loaded: LoadedModel | None = None, step_timer: AnyStepTimer = NULL_TIMER
    ) -> None:
        loaded = loaded or load_engine_model(config)
        self.config = config
        self.tokenizer = loaded.tokenizer
        self.hf_config = loaded.hf_config
        self.vocab_size = int(loaded.hf_config.vocab_size)
        self.eos_token_ids = _generation_eos_ids(loaded)
        self.eos_token_id = getattr(self.tokenizer, "eos_token_id", None)
        if self.eos_token_id is None and self.eos_token_ids:
            self.eos_token_id = min(self.eos_token_ids)
        self.timer = step_timer
        self.core = EngineCore(config, loaded, step_timer)
        self.max_model_len = self.core.max_model_len
        self.output_processor = OutputProcessor(self.tokenizer)

    def close(self) -> None:
        """Releases what outlives a step: the other tensor-parallel ranks' processes, if any (idempotent)."""
        self.core.close()

    # -- input ---------------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: Prompt, add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return prompt, list(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        token_ids = list(prompt)
        if not token_ids:
            raise ValueError("prompt must not be empty")
        bad = [t for t in token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size}), got {bad[:5]}")
        return None, token_ids

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if not messages:
            raise ValueError("messages must not be empty")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def process_inputs(
        self, prompt: Prompt, params: SamplingParams, add_special_tokens: bool = True
    ) -> ProcessedPrompt:
        """Tokenizes and validates a request without touching engine state (safe to call from any
        thread); raises ValueError naming the field on bad input."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        text, token_ids = self.tokenize_prompt(prompt, add_special_tokens)
        self._check_params(params, len(token_ids))
        return ProcessedPrompt(text, token_ids)

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

    def _check_params(self, params: SamplingParams, num_prompt_tokens: int) -> None:
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt has {num_prompt_tokens} tokens but the context length (max_model_len) is "
                f"{self.max_model_len}; shorten the prompt"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.vocab_size:
                raise ValueError(f"{name} must be <= the vocabulary size {self.vocab_size}, got {value}")
        if params.logit_bias:
            bad = [t for t in params.logit_bias if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"logit_bias token ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        bad_stop = [t for t in params.stop_token_ids or [] if t >= self.vocab_size]
        if bad_stop:
            raise ValueError(f"stop_token_ids must be in [0, {self.vocab_size}), got {bad_stop[:5]}")

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
