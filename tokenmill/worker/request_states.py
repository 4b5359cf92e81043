"""The worker's own state of the requests it holds, kept up to date by each step's StepInput (worker/step_input.py),
and the per-step view the model runner works from (StepRequest). Nothing here refers to the engine's Request
objects: a worker in another process holds the same state from the same messages."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.step_input import StepInput


@dataclass
class RequestState:
    """One request as the worker holds it: its tokens so far (prompt, then outputs) and its block table."""

    req_id: str
    prompt_token_ids: list[int]
    all_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None
    block_ids: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]


@dataclass
class StepRequest:
    """One request's share of a step: compute tokens (state.all_token_ids + draft_token_ids)[start_pos : start_pos +
    num_new_tokens], writing their K/V into the slots of state.block_ids (the whole table, in order).

    Speculative decoding: the engine reserved num_spec_tokens slots past the request's known tokens; the worker's
    proposer (spec/) fills up to that many drafts with add_drafts(), which makes them this step's last rows. The
    rows from the last known token on are then all sampled, and verified against the drafts (spec/verify.py)."""

    state: RequestState
    start_pos: int
    num_new_tokens: int
    num_spec_tokens: int = 0
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def req_id(self) -> str:
        return self.state.req_id

    @property
    def block_ids(self) -> list[int]:
        return self.state.block_ids

    @property
    def token_ids(self) -> list[int]:
        end = self.start_pos + self.num_new_tokens - len(self.draft_token_ids)
        return self.state.all_token_ids[self.start_pos : end] + self.draft_token_ids

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the known tokens, so a new token is sampled."""
        return self.start_pos + self.num_new_tokens - len(self.draft_token_ids) >= self.state.num_tokens

    @property
    def num_sampled_rows(self) -> int:
        """How many of the step's last rows sample: the last known token's and each draft's (0 mid-prompt)."""
        return 1 + len(self.draft_token_ids) if self.samples else 0

    def add_drafts(self, draft_token_ids: list[int]) -> None:
        """Appends drafts (at most num_spec_tokens, to a request whose step reaches its last known token)."""
        if len(self.draft_token_ids) + len(draft_token_ids) > self.num_spec_tokens or not self.samples:
            raise ValueError(f"request {self.req_id!r}: {len(draft_token_ids)} drafts do not fit its "
                             f"{self.num_spec_tokens} speculative slots")
        self.draft_token_ids.extend(draft_token_ids)
        self.num_new_tokens += len(draft_token_ids)


class RequestStates:
    def __init__(self) -> None:
        self.states: dict[str, RequestState] = {}

    def apply(self, step: StepInput) -> list[StepRequest]:
        """Brings the held requests up to date with `step`; returns its work in batch order. ValueError when the
        message does not fit what is held (a request sent twice, or updated or scheduled without being sent)."""
        for req_id in step.dropped_req_ids:
            self.states.pop(req_id, None)
        for new in step.new_requests:
            if new.req_id in self.states:
                raise ValueError(f"request {new.req_id!r} sent to the worker twice")
            self.states[new.req_id] = RequestState(
                new.req_id, list(new.prompt_token_ids), [*new.prompt_token_ids, *new.output_token_ids],
                new.sampling_params, new.eos_token_id, list(new.block_ids))
        cached = step.cached
        for req_id, tokens, blocks in zip(cached.req_ids, cached.new_token_ids, cached.new_block_ids, strict=True):
            state = self._held(req_id)
            state.all_token_ids.extend(tokens)
            state.block_ids.extend(blocks)
        return [StepRequest(self._held(w.req_id), w.start_pos, w.num_new_tokens - w.num_spec_tokens, w.num_spec_tokens)
                for w in step.scheduled]

    def _held(self, req_id: str) -> RequestState:
        state = self.states.get(req_id)
        if state is None:
            raise ValueError(f"request {req_id!r} is not held by the worker")
        return state

    def __len__(self) -> int:
        return len(self.states)

