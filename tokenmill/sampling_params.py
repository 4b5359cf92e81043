"""Per-request sampling parameters, validated on construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum

from tokenmill.structured.params import StructuredOutputsParams

# Temperatures below this are treated as greedy (argmax).
_GREEDY_EPS = 1e-5


class RequestOutputKind(Enum):
    CUMULATIVE = 0  # each output carries everything generated so far
    DELTA = 1  # each output carries only what is new since the last one
    FINAL_ONLY = 2  # only the finished output is returned


@dataclass
class SamplingParams:
    """How to pick tokens for one request. Field meanings follow vLLM / OpenAI."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 disables
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    logprobs: int | None = None  # number of top logprobs per generated token (plus the sampled one)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # The output must match this (JSON schema, regex, choice, EBNF grammar, JSON object): constrained decoding.
    structured_outputs: StructuredOutputsParams | None = None
    # Set by the engine: eos ids that end generation (model's eos plus generation_config's).
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if self.top_k == -1:
            self.top_k = 0
        self._verify()

    def _verify(self) -> None:
        def fail(param: str, msg: str) -> None:
            raise ValueError(f"{param} {msg}")

        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            fail("n", f"must be an integer >= 1, got {self.n!r}.")
        if not _is_number(self.temperature) or self.temperature < 0.0:
            fail("temperature", f"must be a number >= 0, got {self.temperature!r}.")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            fail("top_p", f"must be in (0, 1], got {self.top_p!r}.")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            fail("top_k", f"must be 0 or -1 (disabled) or a positive integer, got {self.top_k!r}.")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            fail("min_p", f"must be in [0, 1], got {self.min_p!r}.")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                fail(name, f"must be in [-2, 2], got {value!r}.")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0.0:
            fail("repetition_penalty", f"must be a number > 0, got {self.repetition_penalty!r}.")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1
        ):
            fail("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}.")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            fail("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"must be <= max_tokens={self.max_tokens}, got {self.min_tokens}.")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            fail("seed", f"must be an integer, got {self.seed!r}.")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            fail("stop", f"must be a string or a list of strings, got {self.stop!r}.")
        if any(s == "" for s in self.stop):
            fail("stop", "must not contain empty strings.")
        if not isinstance(self.stop_token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            fail("stop_token_ids", f"must be a list of non-negative integers, got {self.stop_token_ids!r}.")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                fail(name, f"must be None or an integer >= 0, got {value!r}.")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                fail("logit_bias", f"must be a dict of token id -> bias, got {self.logit_bias!r}.")
            clean: dict[int, float] = {}
            for tok, bias in self.logit_bias.items():
                try:
                    tok_id = int(tok)
                except (TypeError, ValueError):
                    fail("logit_bias", f"keys must be token ids, got {tok!r}.")
                if not _is_number(bias) or not -100.0 <= bias <= 100.0:
                    fail("logit_bias", f"values must be in [-100, 100], got {bias!r}.")
                clean[tok_id] = float(bias)
            self.logit_bias = clean
        if not isinstance(self.output_kind, RequestOutputKind):
            fail("output_kind", f"must be a RequestOutputKind, got {self.output_kind!r}.")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                fail("structured_outputs", f"must be a StructuredOutputsParams, got {self.structured_outputs!r}.")
            if self.min_tokens:  # the grammar alone decides where the output ends
                fail("min_tokens", f"must be 0 with structured_outputs, got {self.min_tokens}.")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def clone(self, **changes: object) -> SamplingParams:
        return dataclasses.replace(self, **changes)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
