"""The governor: how many speculative tokens each decoding request gets this step, so that speculation never
costs throughput. Engine side, plain Python (the scheduler asks it while building a step).

- Batch: when more requests decode in a step than `disable_by_batch_size`, nobody speculates: a step of many
  requests is no longer bound by streaming the weights once, so verifying k + 1 rows per request costs about
  k + 1 times a token and the accepted drafts cannot pay for it.
- Acceptance: each request's number of guesses moves with what it gets accepted (additive increase, halving):
  one more after a step whose drafts were all accepted (up to num_speculative_tokens), half as many once its
  recent acceptance rate (an exponential average) falls below min_acceptance_rate, down to one; when that one is
  rejected too, none for PAUSE_STEPS decode steps, then one again (a probe): a request the draft cannot guess
  costs a draft every PAUSE_STEPS + 1 steps.
- Requests it cannot verify exactly get none: those under a grammar (structured output), whose mask for a draft
  position depends on the drafts before it.

It also keeps the counts /metrics reports: drafts verified, drafted and accepted tokens, acceptance by position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.engine.request import Request
from tokenmill.spec.config import SpeculativeConfig

_EMA_WEIGHT = 0.3  # of the latest step in a request's acceptance average
# Decode steps without drafts after a single rejected draft at a low acceptance rate (then one draft probes again).
PAUSE_STEPS = 8


@dataclass
class SpecDecodingStats:
    """Totals since start-up (the Prometheus counters read them). Plain data: it crosses from replicas."""

    num_drafts: int = 0  # request-steps that verified at least one draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_by_position: list[int] = field(default_factory=list)  # [j]: drafts at position j accepted

    def copy(self) -> SpecDecodingStats:
        return SpecDecodingStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                                 list(self.accepted_by_position))

    def __add__(self, other: SpecDecodingStats) -> SpecDecodingStats:
        a, b = self.accepted_by_position, other.accepted_by_position
        by_position = [x + y for x, y in zip(a + [0] * (len(b) - len(a)), b + [0] * (len(a) - len(b)))]
        return SpecDecodingStats(self.num_drafts + other.num_drafts, self.num_draft_tokens + other.num_draft_tokens,
                                 self.num_accepted_tokens + other.num_accepted_tokens, by_position)


class SpeculationGovernor:
    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self.stats = SpecDecodingStats(accepted_by_position=[0] * config.num_speculative_tokens)

    def num_spec_tokens(self, request: Request, num_decoding: int) -> int:
        """The speculative slots `request` (decoding: one known token left to compute) gets this step, when
        `num_decoding` requests decode in it; the scheduler may cut it further (budget, length)."""
        if num_decoding > self.config.disable_by_batch_size:
            return 0
        if request.sampling_params.structured_outputs is not None:
            return 0
        if request.spec_paused_steps > 0:  # drafts kept failing at one a step: a pause, then one probe
            request.spec_paused_steps -= 1
            return 0
        if request.spec_num_tokens == 0:  # first decode step: start at full speed
            request.spec_num_tokens = self.config.num_speculative_tokens
        return request.spec_num_tokens

    def record(self, request: Request, num_drafted: int, num_accepted: int) -> None:
        """A step verified `num_drafted` drafts of `request`, of which the first `num_accepted` were accepted."""
        request.num_draft_tokens += num_drafted
        request.num_accepted_tokens += num_accepted
        if num_drafted == 0:
            return
        stats = self.stats
        stats.num_drafts += 1
        stats.num_draft_tokens += num_drafted
        stats.num_accepted_tokens += num_accepted
        for j in range(num_accepted):
            stats.accepted_by_position[j] += 1
        rate = num_accepted / num_drafted
        request.spec_acceptance = rate if request.spec_acceptance is None else (
            (1 - _EMA_WEIGHT) * request.spec_acceptance + _EMA_WEIGHT * rate)
        if num_accepted == num_drafted:
            request.spec_num_tokens = min(self.config.num_speculative_tokens, max(request.spec_num_tokens, 1) + 1)
        elif request.spec_acceptance < self.config.min_acceptance_rate:
            if request.spec_num_tokens == 1 and num_accepted == 0:  # even one draft does not pay: stop for a while
                request.spec_paused_steps = PAUSE_STEPS
            request.spec_num_tokens = max(1, request.spec_num_tokens // 2)
