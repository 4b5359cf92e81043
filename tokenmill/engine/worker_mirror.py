"""What the worker holds of each request, as the engine tracks it: turns each SchedulerOutput into the plain
StepInput (worker/step_input.py) that brings the worker's mirror up to date, sending each token and block id
once."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.engine.scheduler_output import SchedulerOutput
from tokenmill.worker.step_input import CachedRequestData, NewRequestData, ScheduledWork, StepInput


@dataclass
class _Sent:
    num_tokens: int  # the request's first num_tokens tokens are the worker's
    num_blocks: int  # and the first num_blocks entries of its block table


class WorkerMirror:
    def __init__(self) -> None:
        self._sent: dict[str, _Sent] = {}

    @property
    def num_held(self) -> int:
        """Requests the worker holds."""
        return len(self._sent)

    def step_input(self, out: SchedulerOutput) -> StepInput:
        """The StepInput of `out`. A running request's block table only grows (blocks are appended, never
        replaced), and its tokens only grow, so what changed is a suffix of each."""
        dropped = [r for r in (*out.finished_req_ids, *out.preempted_req_ids) if self._sent.pop(r, None) is not None]
        new_requests: list[NewRequestData] = []
        cached = CachedRequestData()
        scheduled: list[ScheduledWork] = []
        for s in out.scheduled:
            request = s.request
            sent = self._sent.get(request.req_id)
            if sent is None:
                new_requests.append(NewRequestData(
                    request.req_id, list(request.prompt_token_ids), list(request.output_token_ids),
                    request.sampling_params, request.eos_token_id, list(s.block_ids)))
                self._sent[request.req_id] = _Sent(request.num_tokens, len(s.block_ids))
            else:
                cached.req_ids.append(request.req_id)
                cached.new_token_ids.append(request.all_token_ids[sent.num_tokens:])
                cached.new_block_ids.append(s.block_ids[sent.num_blocks:])
                sent.num_tokens, sent.num_blocks = request.num_tokens, len(s.block_ids)
            scheduled.append(ScheduledWork(request.req_id, s.start_pos, s.num_new_tokens, s.num_spec_tokens))
        return StepInput(scheduled, new_requests, cached, dropped)
