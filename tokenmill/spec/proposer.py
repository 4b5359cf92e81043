"""The worker's proposer: fills each step's speculative slots with drafts before the target model runs.

  spec/ngram.py        NgramProposer: from the request's own tokens (prompt lookup)
  spec/draft_model.py  DraftModelProposer: a second, cheaper model's greedy tokens

Both only add drafts (StepRequest.add_drafts, at most the slots the engine reserved, possibly none); the runner
verifies them (spec/verify.py). Under tensor parallelism every rank runs the same proposer on the same tokens, so
every rank computes the same rows (n-grams only: a draft model runs on one rank)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

from tokenmill.config import EngineConfig
from tokenmill.loader import LoadedModel
from tokenmill.worker.request_states import StepRequest

if TYPE_CHECKING:
    from tokenmill.worker.worker import Worker


class Proposer(Protocol):
    def propose(self, scheduled: Sequence[StepRequest]) -> None:
        """Adds drafts to the requests of the step that have speculative slots."""

    def follow(self, scheduled: Sequence[StepRequest]) -> None:
        """Sees the step before the model runs it (a draft model computes the tokens the target computes)."""

    def drop(self, req_ids: Iterable[str]) -> None:
        """Forgets requests that finished or were preempted."""


def build_proposer(config: EngineConfig, worker: Worker, draft_loaded: LoadedModel | None = None) -> Proposer:
    """The proposer of config's speculative_config for `worker` (the target); a draft model's checkpoint comes
    loaded (`draft_loaded`: the worker sized its K/V budget from it)."""
    spec = config.speculative.spec
    if spec is None:
        raise ValueError("no speculative_config")
    if spec.method == "ngram":
        from tokenmill.spec.ngram import NgramProposer

        return NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
    from tokenmill.spec.draft_model import DraftModelProposer

    if draft_loaded is None:
        raise ValueError("a draft model proposer needs the draft's loaded checkpoint")
    return DraftModelProposer.for_target(config, worker, draft_loaded)
