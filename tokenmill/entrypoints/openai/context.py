"""What the OpenAI routes share: the served engine and model, its limits, the front-end thread pool, input
helpers, SSE framing.

Invariant: nothing that grows with a request's size runs on the event loop. Tokenization, chat templates, the
checks on tokenized prompts and the formatting of large outputs run in `ctx.run(...)` on the front-end pool
(`--frontend-threads`), so /health and /metrics answer at once whatever the other requests do.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from tokenmill.engine.engine_client import EngineClient
from tokenmill.engine.llm_engine import ProcessedPrompt
from tokenmill.entrypoints.openai.inputs import RequestError, RequestLimits, param_of_value_error
from tokenmill.entrypoints.prompt_limits import TokenBound, text_too_long, token_bound

T = TypeVar("T")


@dataclass
class ServerContext:
    engine: EngineClient  # AsyncEngine, or DataParallelEngine under --data-parallel-size > 1
    model_name: str
    api_key: str | None = None
    retry_after_s: int = 1  # Retry-After sent with 429
    limits: RequestLimits = field(default_factory=RequestLimits)
    frontend_threads: int = 2  # the pool that tokenizes and formats off the event loop

    def __post_init__(self) -> None:
        if self.frontend_threads < 1:
            raise ValueError(f"frontend_threads must be >= 1, got {self.frontend_threads}")
        self.pool = ThreadPoolExecutor(self.frontend_threads, thread_name_prefix="tokenmill-frontend")
        self.token_bound: TokenBound | None = token_bound(self.engine.inputs.tokenizer)

    @property
    def max_model_len(self) -> int:
        return self.engine.inputs.max_model_len

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the front-end pool; the event loop serves other requests meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def close(self) -> None:
        """Stops the pool (at app shutdown): queued work is dropped, running work finishes on its own."""
        self.pool.shutdown(wait=False, cancel_futures=True)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise RequestError(f"The model `{model}` does not exist.", "model", status=404,
                               error_type="NotFoundError")

    # -- on the pool (ctx.run) -----------------------------------------------------------------------
    def process(self, prompt: str | list[int], params: object, add_special_tokens: bool = True,
                param: str = "prompt") -> ProcessedPrompt:
        """Tokenizes and validates one prompt; a text that cannot fit the context is refused by its length
        before tokenizing. `param` names the field errors about the prompt blame."""
        token_ids = prompt
        if isinstance(prompt, str) and prompt:
            too_long = text_too_long(prompt, self.token_bound, self.max_model_len)
            if too_long is not None:
                raise RequestError(too_long, param)
            token_ids = self.engine.inputs.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)  # GIL-free
        try:
            processed = self.engine.process_inputs(token_ids, params, add_special_tokens)
        except ValueError as exc:
            raise RequestError(str(exc), param_of_value_error(exc) or param) from None
        return ProcessedPrompt(prompt if isinstance(prompt, str) else None, processed.token_ids)

    def process_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                     tools: list[dict[str, Any]] | None, params: object) -> ProcessedPrompt:
        text = self.apply_chat_template(messages, add_generation_prompt, tools)
        # The template already holds the special tokens (bos) it wants.
        return self.process(text, params, add_special_tokens=False, param="messages")

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                            tools: list[dict[str, Any]] | None = None) -> str:
        try:
            return self.engine.inputs.apply_chat_template(messages, add_generation_prompt, tools)
        except ValueError as exc:
            raise RequestError(str(exc), "messages") from None
        except Exception as exc:  # noqa: BLE001 - template errors (raise_exception) are the caller's fault
            raise RequestError(f"the chat template rejected the messages: {exc}", "messages") from None


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def streaming_response(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
