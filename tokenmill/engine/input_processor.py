"""InputProcessor: tokenization and validation of requests, before any engine state is touched.

It needs only the tokenizer, the model's config and generation defaults and the context length, never the weights:
the engine owns one, and a data-parallel front end (engine/data_parallel.py) owns one for all of its replicas.
Every method only reads immutable state, so any thread may call them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tokenmill.loader import LoadedModel
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured.grammar import validate as validate_structured_outputs

Prompt = str | Sequence[int]


@dataclass(frozen=True)
class ProcessedPrompt:
    """A tokenized, validated prompt (text is None when the caller gave token ids)."""

    text: str | None
    token_ids: list[int]


def generation_eos_ids(loaded: LoadedModel) -> set[int]:
    """Every token id that ends generation: the generation config's and the model config's eos ids."""
    ids: set[int] = set()
    for source in (loaded.generation_config.get("eos_token_id"), getattr(loaded.hf_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(t) for t in source)
    return ids


class InputProcessor:
    def __init__(self, loaded: LoadedModel, max_model_len: int) -> None:
        self.tokenizer = loaded.tokenizer
        self.hf_config = loaded.hf_config
        self.vocab_size = int(loaded.hf_config.vocab_size)
        self.max_model_len = max_model_len
        self.eos_token_ids = generation_eos_ids(loaded)
        self.eos_token_id = getattr(self.tokenizer, "eos_token_id", None)
        if self.eos_token_id is None and self.eos_token_ids:
            self.eos_token_id = min(self.eos_token_ids)

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

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """`tools`: OpenAI tool definitions, for templates that describe them to the model."""
        if not messages:
            raise ValueError("messages must not be empty")
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("this model has no chat template; use generate() with a plain prompt")
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def process_inputs(
        self, prompt: Prompt, params: SamplingParams, add_special_tokens: bool = True
    ) -> ProcessedPrompt:
        """Tokenizes and validates a request; raises ValueError naming the field on bad input."""
        if not isinstance(params, SamplingParams):  # offline, every bad input is a ValueError
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")  # noqa: TRY004
        text, token_ids = self.tokenize_prompt(prompt, add_special_tokens)
        self.check_params(params, len(token_ids))
        return ProcessedPrompt(text, token_ids)

    def check_params(self, params: SamplingParams, num_prompt_tokens: int) -> None:
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
        if params.structured_outputs is not None:  # a schema or grammar that cannot compile fails here, not later
            validate_structured_outputs(params.structured_outputs)
