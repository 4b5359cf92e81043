"""/v1/completions and /v1/chat/completions: submit to the AsyncEngine, then answer in one JSON body or
as Server-Sent Events (one chunk per engine step's delta, `data: [DONE]` last).

A client that disconnects has its requests aborted at once (a watcher task awaits the ASGI
disconnect message), so their KV blocks are free before the next engine step.

Off the event loop (ctx.run, context.py): tokenization and chat templates; for non-streaming responses the whole
body (logprobs, echo, JSON); for streaming ones each delta's chunks when they carry logprobs or echo.
Every response's usage carries prompt_tokens_details.cached_tokens (the streamed usage chunk's too); with
`"return_timings": true` it also carries `timings` (outputs.timings), in the last chunk when streaming.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from tokenmill.engine.async_engine import EngineDeadError, EngineStepError
from tokenmill.engine.detokenizer import decode_token
from tokenmill.engine.llm_engine import ProcessedPrompt
from tokenmill.entrypoints.openai.context import SSE_DONE, ServerContext, new_id, sse, streaming_response
from tokenmill.entrypoints.openai.inputs import (
    chat_messages,
    chat_params,
    check_context,
    completion_params,
    completion_prompts,
)
from tokenmill.entrypoints.openai.offload import decode_ids
from tokenmill.entrypoints.openai.outputs import ChoiceState, chat_logprobs, completion_logprobs, timings, usage
from tokenmill.entrypoints.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    RequestTimings,
    Usage,
)
from tokenmill.entrypoints.openai.structured import (
    ToolPlan,
    chat_constraint,
    delta_tool_calls,
    structured_outputs_of,
    tool_calls_of,
)
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams


@dataclass
class _Job:
    """The engine requests behind one HTTP request: one per prompt, each with params.n choices."""

    ctx: ServerContext
    response_id: str
    prompts: list[ProcessedPrompt]
    params: SamplingParams
    sink: asyncio.Queue
    req_ids: list[str]
    return_timings: bool = False
    finals: dict[str, RequestOutput] = field(default_factory=dict)  # final output per request
    client_gone: bool = False

    def choice_index(self, req_id: str, sample_index: int) -> int:
        return self.req_ids.index(req_id) * self.params.n + sample_index

    def prompt_of(self, req_id: str) -> ProcessedPrompt:
        return self.prompts[self.req_ids.index(req_id)]

    def decode(self, token_id: int) -> str:
        return decode_token(self.ctx.engine.inputs.tokenizer, token_id)

    def abort_all(self) -> None:
        for req_id in self.req_ids:
            self.ctx.engine.abort(req_id)


async def _submit(ctx: ServerContext, prefix: str, prompts: list[ProcessedPrompt], params: SamplingParams,
                  priority: int, arrival: float, return_timings: bool) -> _Job:
    job = _Job(ctx, new_id(prefix), prompts, params, asyncio.Queue(), [], return_timings)
    try:
        for i, prompt in enumerate(prompts):
            req_id = await ctx.engine.submit(prompt, params, job.sink, req_id=f"{job.response_id}-{i}",
                                             priority=priority, arrival_time=arrival)
            job.req_ids.append(req_id)
    except BaseException:
        job.abort_all()
        raise
    return job


async def _abort_on_disconnect(request: Request, job: _Job) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.client_gone = True
            job.abort_all()
            return


async def _run_watched(job: _Job, request: Request, body: Callable[[], AsyncIterator]) -> AsyncIterator:
    """Iterates `body` while a watcher aborts the job if the client goes away."""
    watcher = asyncio.create_task(_abort_on_disconnect(request, job))
    try:
        async for item in body():
            yield item
    finally:
        watcher.cancel()
        job.abort_all()  # no-op for finished requests


async def _collect(job: _Job, request: Request) -> dict[int, ChoiceState] | None:
    """All choices of a non-streaming job, or None when the client disconnected first."""
    choices: dict[int, ChoiceState] = {}
    async for req_id, output in _run_watched(job, request, lambda: job.ctx.engine.iterate(job.sink, job.req_ids)):
        for completion in output.outputs:
            index = job.choice_index(req_id, completion.index)
            choices.setdefault(index, ChoiceState(index)).add(completion)
        if output.finished:
            job.finals[req_id] = output
    if job.client_gone:
        return None
    if any(c.finish_reason == "error" for c in choices.values()):
        raise EngineStepError("the engine failed while generating this request")
    return dict(sorted(choices.items()))


def _usage_of(job: _Job, num_completion_tokens: int) -> Usage:
    num_prompt = sum(len(p.token_ids) for p in job.prompts)
    num_cached = sum(o.num_cached_tokens for o in job.finals.values())
    return usage(num_prompt, num_completion_tokens, num_cached)


def _timings_of(job: _Job) -> RequestTimings | None:
    if not job.return_timings:
        return None
    return timings([o.metrics for o in job.finals.values() if o.metrics is not None])


def _json_response(result: BaseModel) -> Response:
    """The response's JSON, its choices serialized one at a time (a pool thread then never holds the GIL for the
    whole of a large body)."""
    head = result.model_dump_json(exclude={"choices"})
    choices = ",".join(choice.model_dump_json() for choice in result.choices)  # type: ignore[attr-defined]
    return Response(f'{head[:-1]},"choices":[{choices}]}}'.encode(), media_type="application/json")


def _final_chunk(job: _Job, include_usage: bool,
                 make: Callable[[Usage | None, RequestTimings | None], BaseModel]) -> Callable[[int], str | None]:
    """The stream's last chunk (no choices): the usage when asked for, the timings when asked for."""
    def final(num_generated: int) -> str | None:
        if not include_usage and not job.return_timings:
            return None
        return sse(make(_usage_of(job, num_generated) if include_usage else None, _timings_of(job)))

    return final


def _error_event(message: str, status: int, error_type: str) -> str:
    return sse(ErrorResponse(error=ErrorInfo(message=message, type=error_type, code=status)))


async def _stream_events(job: _Job, request: Request, render: Callable[[str, RequestOutput], list[str]],
                         offload: bool, final_chunk: Callable[[int], str | None]) -> AsyncIterator[str]:
    """SSE events of a streaming job: render() gives each delta's chunks (on the pool when `offload`: deltas
    with logprobs or echo); then the final chunk (usage, timings) if any, then [DONE]."""
    num_generated = 0
    try:
        async for req_id, output in _run_watched(job, request, lambda: job.ctx.engine.iterate(job.sink, job.req_ids)):
            num_generated += sum(len(c.token_ids) for c in output.outputs)
            if output.finished:
                job.finals[req_id] = output
            if any(c.finish_reason == "error" for c in output.outputs):
                job.abort_all()
                yield _error_event("the engine failed while generating this request", 500, "InternalServerError")
                break
            for chunk in (await job.ctx.run(render, req_id, output) if offload else render(req_id, output)):
                yield chunk
        else:
            last = final_chunk(num_generated)
            if last is not None:
                yield last
    except (EngineStepError, EngineDeadError) as exc:
        status = 500 if isinstance(exc, EngineStepError) else 503
        yield _error_event(str(exc), status, type(exc).__name__)
    yield SSE_DONE


# -- /v1/completions -------------------------------------------------------------------------------
def _process_all(ctx: ServerContext, prompts: list[str | list[int]], params: SamplingParams,
                 add_special_tokens: bool) -> list[ProcessedPrompt]:
    return [ctx.process(p, params, add_special_tokens) for p in prompts]


async def serve_completion(ctx: ServerContext, body: CompletionRequest, request: Request, arrival: float) -> Response:
    ctx.check_model(body.model)
    params = completion_params(body, structured_outputs_of(body), ctx.limits)
    prompts = await ctx.run(_process_all, ctx, completion_prompts(body), params, body.add_special_tokens)
    for prompt in prompts:
        check_context(len(prompt.token_ids), params.max_tokens, ctx.max_model_len)
    job = await _submit(ctx, "cmpl", prompts, params, body.priority, arrival, body.return_timings)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return streaming_response(_stream_events(
            job, request, _completion_chunk_renderer(job, body), body.echo or body.logprobs is not None,
            _final_chunk(job, include_usage, lambda u, t: CompletionChunk(
                id=job.response_id, model=ctx.model_name, choices=[], usage=u, timings=t)),
        ))
    choices = await _collect(job, request)
    if choices is None:
        return Response(status_code=499)
    return await ctx.run(_completion_response, job, body, choices)


def _completion_response(job: _Job, body: CompletionRequest, choices: dict[int, ChoiceState]) -> Response:
    result = CompletionResponse(
        id=job.response_id, model=job.ctx.model_name,
        usage=_usage_of(job, sum(len(c.token_ids) for c in choices.values())),
        choices=[_completion_choice(job, body, c) for c in choices.values()], timings=_timings_of(job),
    )
    return _json_response(result)


def _prompt_text(job: _Job, prompt: ProcessedPrompt) -> str:
    if prompt.text is not None:
        return prompt.text
    return decode_ids(job.ctx.engine.inputs.tokenizer, prompt.token_ids)


def _completion_choice(job: _Job, body: CompletionRequest, choice: ChoiceState) -> CompletionChoice:
    req_id = job.req_ids[choice.index // job.params.n]
    prompt = job.prompt_of(req_id)
    text = (_prompt_text(job, prompt) + choice.text) if body.echo else choice.text
    logprobs = None
    if body.logprobs is not None:
        token_ids, positions = choice.token_ids, list(choice.logprobs)
        if body.echo:
            prompt_positions = job.finals[req_id].prompt_logprobs or []
            token_ids = prompt.token_ids + token_ids
            positions = list(prompt_positions) + positions
        logprobs = completion_logprobs(token_ids, positions, body.logprobs, job.decode)
    return CompletionChoice(index=choice.index, text=text, logprobs=logprobs,
                            finish_reason=choice.finish_reason, stop_reason=choice.stop_reason)


def _completion_chunk_renderer(job: _Job, body: CompletionRequest) -> Callable[[str, RequestOutput], list[str]]:
    echoed: set[int] = set()
    offsets: dict[int, int] = {}

    def render(req_id: str, output: RequestOutput) -> list[str]:
        chunks = []
        for completion in output.outputs:
            index = job.choice_index(req_id, completion.index)
            text, token_ids, positions = completion.text, completion.token_ids, list(completion.logprobs or [])
            if body.echo and index not in echoed:
                echoed.add(index)
                prompt = job.prompt_of(req_id)
                text = _prompt_text(job, prompt) + text
                if body.logprobs is not None:
                    token_ids = prompt.token_ids + token_ids
                    positions = list(output.prompt_logprobs or []) + positions
            logprobs = None
            if body.logprobs is not None and token_ids:
                logprobs = completion_logprobs(token_ids, positions, body.logprobs, job.decode, offsets.get(index, 0))
                offsets[index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
            if not text and logprobs is None and completion.finish_reason is None:
                continue
            choice = CompletionChoice(index=index, text=text, logprobs=logprobs,
                                      finish_reason=completion.finish_reason, stop_reason=completion.stop_reason)
            chunks.append(sse(CompletionChunk(id=job.response_id, model=job.ctx.model_name, choices=[choice])))
        return chunks

    return render


# -- /v1/chat/completions --------------------------------------------------------------------------
async def serve_chat(ctx: ServerContext, body: ChatCompletionRequest, request: Request, arrival: float) -> Response:
    ctx.check_model(body.model)
    plan, constraint = chat_constraint(body)
    params = chat_params(body, constraint, ctx.limits)
    # The template describes the tools to the model (where it knows how) when the answer is a call to one.
    prompt = await ctx.run(ctx.process_chat, chat_messages(body.messages), body.add_generation_prompt,
                           body.tools if plan is not None else None, params)
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    check_context(len(prompt.token_ids), params.max_tokens, ctx.max_model_len, param)
    job = await _submit(ctx, "chatcmpl", [prompt], params, body.priority, arrival, body.return_timings)
    num_top = body.top_logprobs or 0
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return streaming_response(_stream_events(
            job, request, _chat_chunk_renderer(job, body.logprobs, num_top, plan), body.logprobs,
            _final_chunk(job, include_usage, lambda u, t: ChatCompletionChunk(
                id=job.response_id, model=ctx.model_name, choices=[], usage=u, timings=t)),
        ))
    choices = await _collect(job, request)
    if choices is None:
        return Response(status_code=499)
    return await ctx.run(_chat_response, job, choices, plan, num_top if body.logprobs else None)


def _chat_response(job: _Job, choices: dict[int, ChoiceState], plan: ToolPlan | None, num_top: int | None) -> Response:
    """`num_top`: the top logprobs per position, None without logprobs."""
    result = ChatCompletionResponse(
        id=job.response_id, model=job.ctx.model_name,
        usage=_usage_of(job, sum(len(c.token_ids) for c in choices.values())),
        choices=[_chat_choice(c, plan, chat_logprobs(c.token_ids, c.logprobs, num_top, job.decode)
                              if num_top is not None else None) for c in choices.values()],
        timings=_timings_of(job),
    )
    return _json_response(result)


def _chat_choice(choice: ChoiceState, plan: ToolPlan | None, logprobs: ChatLogprobs | None) -> ChatChoice:
    """A finished choice; under a tool plan a complete output is the message's tool_calls (content null)."""
    calls = tool_calls_of(plan, choice.text) if plan is not None and choice.finish_reason == "stop" else None
    if calls is not None:
        return ChatChoice(index=choice.index, message=AssistantMessage(content=None, tool_calls=calls),
                          logprobs=logprobs, finish_reason="tool_calls")
    return ChatChoice(index=choice.index, message=AssistantMessage(content=choice.text), logprobs=logprobs,
                      finish_reason=choice.finish_reason, stop_reason=choice.stop_reason)


def _chat_chunk_renderer(job: _Job, want_logprobs: bool, num_top: int,
                         plan: ToolPlan | None) -> Callable[[str, RequestOutput], list[str]]:
    """Under a tool plan a choice's text is held back and sent as one tool-call delta with its last chunk."""
    started: set[int] = set()
    held: dict[int, str] = {}

    def chunk(choice: ChatChunkChoice) -> str:
        return sse(ChatCompletionChunk(id=job.response_id, model=job.ctx.model_name, choices=[choice]))

    def render(req_id: str, output: RequestOutput) -> list[str]:
        chunks = []
        for completion in output.outputs:
            index = job.choice_index(req_id, completion.index)
            if index not in started:  # OpenAI's first chunk of a choice carries the role
                started.add(index)
                chunks.append(chunk(ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))))
            logprobs = None
            if want_logprobs and completion.token_ids:
                logprobs = chat_logprobs(completion.token_ids, completion.logprobs or [], num_top, job.decode)
            if not completion.text and logprobs is None and completion.finish_reason is None:
                continue
            delta = DeltaMessage(content=completion.text or None)
            finish_reason = completion.finish_reason
            if plan is not None:
                held[index] = held.get(index, "") + completion.text
                delta = DeltaMessage()
                calls = tool_calls_of(plan, held[index]) if finish_reason == "stop" else None
                if calls is not None:
                    delta, finish_reason = DeltaMessage(tool_calls=delta_tool_calls(calls)), "tool_calls"
                elif finish_reason is not None:  # not a complete call: the text as it is
                    delta = DeltaMessage(content=held[index] or None)
            chunks.append(chunk(ChatChunkChoice(
                index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason,
                stop_reason=completion.stop_reason,
            )))
        return chunks

    return render
