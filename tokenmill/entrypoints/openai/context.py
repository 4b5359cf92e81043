"""What the OpenAI routes share: the served engine and model, input helpers, SSE framing."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from tokenmill.engine.engine_client import EngineClient
from tokenmill.engine.llm_engine import ProcessedPrompt
from tokenmill.entrypoints.openai.inputs import RequestError, param_of_value_error


@dataclass
class ServerContext:
    engine: EngineClient  # AsyncEngine, or DataParallelEngine under --data-parallel-size > 1
    model_name: str
    api_key: str | None = None
    retry_after_s: int = 1  # Retry-After sent with 429

    @property
    def max_model_len(self) -> int:
        return self.engine.inputs.max_model_len

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise RequestError(f"The model `{model}` does not exist.", "model", status=404,
                               error_type="NotFoundError")

    def process(self, prompt: str | list[int], params: object, add_special_tokens: bool = True) -> ProcessedPrompt:
        try:
            return self.engine.process_inputs(prompt, params, add_special_tokens)
        except ValueError as exc:
            raise RequestError(str(exc), param_of_value_error(exc) or "prompt") from None

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
