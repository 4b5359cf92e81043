"""Turns EngineCoreOutputs (token deltas) into RequestOutputs: detokenization, stop strings, n > 1.

Invariant: every added request yields exactly one RequestOutput with finished=True, after which its
state is dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tokenmill.engine.detokenizer import IncrementalDetokenizer, decode_token
from tokenmill.engine.scheduler_output import EngineCoreOutput
from tokenmill.outputs import CompletionOutput, PositionLogprobs, RequestMetrics, RequestOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class _SampleState:
    index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_tokens_sent: int = 0
    num_logprobs_sent: int = 0
    num_preemptions: int = 0  # as the engine core last reported for this sample
    final_sent: bool = False  # DELTA: its final delta went out; later outputs of the request leave it out


@dataclass
class RequestState:
    req_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: dict[str, _SampleState]  # child req_id -> state
    metrics: RequestMetrics
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples.values())


def child_request_ids(req_id: str, n: int) -> list[str]:
    return [req_id] if n == 1 else [f"{i}_{req_id}" for i in range(n)]


class OutputProcessor:
    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self.parent_of: dict[str, str] = {}

    def add_request(
        self, req_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
        arrival_time: float,
    ) -> list[str]:
        """Registers a request; returns the child ids the engine core must run (one per sample)."""
        if req_id in self.requests:
            raise ValueError(f"request id {req_id!r} is already in use")
        children = child_request_ids(req_id, params.n)
        samples = {
            child: _SampleState(i, IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params),
                                logprobs=[] if params.logprobs is not None else None,
                                cumulative_logprob=0.0 if params.logprobs is not None else None)
            for i, child in enumerate(children)
        }
        self.requests[req_id] = RequestState(
            req_id, prompt, prompt_token_ids, params, samples, RequestMetrics(arrival_time=arrival_time),
            prompt_logprobs=[] if params.prompt_logprobs is not None else None,
        )
        for child in children:
            self.parent_of[child] = req_id
        return children

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def child_ids(self, req_id: str) -> list[str]:
        state = self.requests.get(req_id)
        return list(state.samples) if state else []

    def process_outputs(self, core_outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns the RequestOutputs to hand out this step and the child ids that hit a stop string
        (the caller must stop them in the engine core)."""
        touched: dict[str, RequestState] = {}
        stopped: list[str] = []
        now = time.monotonic()
        for out in core_outputs:
            parent = self.parent_of.get(out.req_id)
            if parent is None:
                continue
            state = self.requests[parent]
            sample = state.samples[out.req_id]
            if sample.finish_reason is not None:
                continue  # already final (e.g. stopped by a stop string)
            touched[parent] = state
            state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
            if state.metrics.first_scheduled_time is None:
                state.metrics.first_scheduled_time = out.first_scheduled_time
            state.metrics.num_draft_tokens += out.num_draft_tokens
            state.metrics.num_accepted_tokens += out.num_accepted_tokens
            if out.num_preemptions != sample.num_preemptions:  # a running count per sample; the request's is the sum
                state.metrics.num_preemptions += out.num_preemptions - sample.num_preemptions
                sample.num_preemptions = out.num_preemptions
            # Each of n samples reports the (identical) prompt logprobs: keep the first copy.
            if out.new_prompt_logprobs and state.prompt_logprobs == []:
                state.prompt_logprobs.extend(self._decode_logprobs(out.new_prompt_logprobs))
            if out.new_token_ids:
                if state.metrics.first_token_time is None:
                    state.metrics.first_token_time = now
                state.metrics.last_token_time = now
                if self._append_tokens(state, sample, out):
                    stopped.append(out.req_id)
                    continue
            if out.finish_reason is not None:
                sample.finish_reason = out.finish_reason
                sample.stop_reason = out.stop_reason
        results = []
        for state in touched.values():
            output = self._make_output(state)
            if output is not None:
                results.append(output)
            if state.finished:
                state.metrics.finished_time = now
                self._drop(state)
        return results, stopped

    def abort_request(self, req_id: str) -> RequestOutput | None:
        """Marks every unfinished sample aborted and returns the request's final output."""
        state = self.requests.get(req_id)
        if state is None:
            return None
        for sample in state.samples.values():
            if sample.finish_reason is None:
                sample.finish_reason = "abort"
        output = self._make_output(state)
        self._drop(state)
        return output

    def _drop(self, state: RequestState) -> None:
        del self.requests[state.req_id]
        for child in state.samples:
            self.parent_of.pop(child, None)

    def _append_tokens(self, state: RequestState, sample: _SampleState, out: EngineCoreOutput) -> bool:
        sample.token_ids.extend(out.new_token_ids)
        if out.new_logprobs and sample.logprobs is not None:
            decoded = self._decode_logprobs(out.new_logprobs)
            sample.logprobs.extend(decoded)  # type: ignore[arg-type]
            for token_id, position in zip(out.new_token_ids, decoded):
                sample.cumulative_logprob += position[token_id].logprob  # type: ignore[index,operator]
        text_ids = out.new_token_ids
        if out.finish_reason == "stop" and not isinstance(out.stop_reason, str) and \
                not state.params.include_stop_str_in_output:
            text_ids = text_ids[:-1]  # like vLLM: an EOS / stop token's text is not part of the output
        stop_str = sample.detokenizer.update(text_ids, len(sample.token_ids))
        if stop_str is not None:
            sample.finish_reason = "stop"
            sample.stop_reason = stop_str
            return True
        return False

    def _decode_logprobs(self, positions: list[PositionLogprobs | None]) -> list[PositionLogprobs | None]:
        for position in positions:
            if position is None:
                continue
            for token_id, lp in position.items():
                if lp.decoded_token is None:
                    lp.decoded_token = decode_token(self.tokenizer, token_id)
        return positions

    def _make_output(self, state: RequestState) -> RequestOutput | None:
        kind = state.params.output_kind
        finished = state.finished
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        delta = kind == RequestOutputKind.DELTA
        completions = []
        for sample in state.samples.values():
            done = sample.finish_reason is not None
            if delta and sample.final_sent:  # n > 1: a sibling finished earlier; its final delta is not repeated
                continue
            sample.final_sent = done
            text = sample.detokenizer.get_next_output_text(done, delta)
            token_ids = sample.token_ids[sample.num_tokens_sent:] if delta else list(sample.token_ids)
            logprobs = sample.logprobs
            if delta and logprobs is not None:
                logprobs = logprobs[sample.num_logprobs_sent:]
            if delta:
                sample.num_tokens_sent = len(sample.token_ids)
                sample.num_logprobs_sent = len(sample.logprobs or [])
            completions.append(CompletionOutput(
                index=sample.index, text=text, token_ids=token_ids,
                cumulative_logprob=sample.cumulative_logprob, logprobs=logprobs,
                finish_reason=sample.finish_reason, stop_reason=sample.stop_reason,
            ))
        return RequestOutput(
            request_id=state.req_id, prompt=state.prompt, prompt_token_ids=state.prompt_token_ids,
            outputs=completions, finished=finished, prompt_logprobs=state.prompt_logprobs,
            num_cached_tokens=state.num_cached_tokens, metrics=state.metrics,
        )
