"""OpenAI request bodies -> engine inputs (prompts and SamplingParams), with 400-worthy errors that
name the offending field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenmill.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
)
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured.params import StructuredOutputsParams

MiB = 1 << 20


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask for (`tokenmill serve --max-request-bytes / --max-n / --max-logprobs`)."""

    max_request_bytes: int = 16 * MiB  # a larger body gets 413 before it is parsed
    max_n: int = 16  # choices per prompt
    max_logprobs: int = 20  # top logprobs per position (OpenAI allows 5 for completions and 20 for chat)

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {self.max_request_bytes}")
        if self.max_n < 1:
            raise ValueError(f"max_n must be >= 1, got {self.max_n}")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be >= 0, got {self.max_logprobs}")


DEFAULT_LIMITS = RequestLimits()


class RequestError(ValueError):
    """A request the server must refuse; `param` names the field, `status` is the HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 error_type: str = "BadRequestError") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.error_type = error_type


_PARAM_IN_MESSAGE = (
    "n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "logit_bias", "seed", "stop", "stop_token_ids", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs",
    "structured_outputs",
)


def param_of_value_error(exc: ValueError) -> str | None:
    """SamplingParams' errors start with the field name ("top_p must be ..."); find it."""
    first = str(exc).split(" ", 1)[0]
    return first if first in _PARAM_IN_MESSAGE else None


def _sampling_kwargs(body: SamplingFields, limits: RequestLimits) -> dict[str, Any]:
    if body.best_of is not None and body.best_of != body.n:
        raise RequestError("best_of other than n is not supported", "best_of")
    if body.n > limits.max_n:
        raise RequestError(f"n must be at most {limits.max_n} on this server (--max-n), got {body.n}", "n")
    kwargs: dict[str, Any] = {
        "n": body.n, "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p, "top_k": 0 if body.top_k is None else body.top_k,
        "min_p": body.min_p or 0.0, "stop": body.stop, "stop_token_ids": body.stop_token_ids, "seed": body.seed,
        "presence_penalty": body.presence_penalty or 0.0, "frequency_penalty": body.frequency_penalty or 0.0,
        "repetition_penalty": 1.0 if body.repetition_penalty is None else body.repetition_penalty,
        "ignore_eos": body.ignore_eos, "min_tokens": body.min_tokens,
        "include_stop_str_in_output": body.include_stop_str_in_output,
        "skip_special_tokens": body.skip_special_tokens,
    }
    if body.logit_bias:
        try:
            kwargs["logit_bias"] = {int(k): v for k, v in body.logit_bias.items()}
        except ValueError:
            raise RequestError("logit_bias keys must be token ids (integers as strings)", "logit_bias") from None
    return kwargs


def _make_params(**kwargs: Any) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except ValueError as exc:
        raise RequestError(str(exc), param_of_value_error(exc)) from None


def _check_logprobs(value: int | None, param: str, limits: RequestLimits) -> None:
    if value is not None and not 0 <= value <= limits.max_logprobs:
        raise RequestError(f"{param} must be between 0 and {limits.max_logprobs} on this server (--max-logprobs), "
                           f"got {value}", param)


def completion_params(body: CompletionRequest, structured_outputs: StructuredOutputsParams | None = None,
                      limits: RequestLimits = DEFAULT_LIMITS) -> SamplingParams:
    """`structured_outputs`: the request's output constraint (entrypoints/openai/structured.py)."""
    if body.suffix:
        raise RequestError("suffix is not supported", "suffix")
    _check_logprobs(body.logprobs, "logprobs", limits)
    kwargs = _sampling_kwargs(body, limits)
    kwargs["max_tokens"] = body.max_tokens
    kwargs["logprobs"] = body.logprobs
    if body.echo and body.logprobs is not None:
        kwargs["prompt_logprobs"] = body.logprobs
    kwargs["structured_outputs"] = structured_outputs
    return _make_params(**kwargs)


def chat_params(body: ChatCompletionRequest, structured_outputs: StructuredOutputsParams | None = None,
                limits: RequestLimits = DEFAULT_LIMITS) -> SamplingParams:
    """`structured_outputs`: the request's output constraint, tool calls' included (openai/structured.py)."""
    if body.top_logprobs is not None and not body.logprobs:
        raise RequestError("top_logprobs requires logprobs to be true", "top_logprobs")
    _check_logprobs(body.top_logprobs, "top_logprobs", limits)
    kwargs = _sampling_kwargs(body, limits)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise RequestError(f"{param} must be an integer >= 1, got {max_tokens}", param)
    kwargs["max_tokens"] = max_tokens
    kwargs["logprobs"] = (body.top_logprobs or 0) if body.logprobs else None
    kwargs["structured_outputs"] = structured_outputs
    return _make_params(**kwargs)


def completion_prompts(body: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts: one text, one token list, or a list of either."""
    prompt = body.prompt
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]  # type: ignore[arg-type]
    else:
        prompts = list(prompt)  # type: ignore[arg-type]
    if not prompts:
        raise RequestError("prompt must not be empty", "prompt")
    for p in prompts:
        if len(p) == 0:
            raise RequestError("prompt must not be empty", "prompt")
    return prompts


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template expects them (text content only)."""
    if not messages:
        raise RequestError("messages must not be empty", "messages")
    result = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise RequestError(f"only text content parts are supported, got {part.type!r}",
                                       f"messages[{i}].content")
                parts.append(part.text)
            content = "\n".join(parts)
        entry: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role,
                                 "content": content or ""}
        if message.name:
            entry["name"] = message.name
        if message.tool_calls:
            entry["tool_calls"] = message.tool_calls
        if message.tool_call_id:
            entry["tool_call_id"] = message.tool_call_id
        result.append(entry)
    return result


def check_context(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                  param: str = "max_tokens") -> None:
    """Like OpenAI and vLLM: the prompt plus the requested tokens must fit the context."""
    if num_prompt_tokens >= max_model_len:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
            f"{num_prompt_tokens} tokens. Please reduce the length of the prompt.", "prompt")
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, {max_tokens} for the "
            f"completion). Please reduce the prompt or {param}.", param)
