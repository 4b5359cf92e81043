"""Where a step's time goes (`tokenmill bench throughput --profile`).

The engine wraps each phase of a step in `timer.section(name)`. Sections are disjoint (never nested),
so their sum is the time spent inside steps and wall time minus that sum is everything else (adding
requests, the caller's loop). `NULL_TIMER`, the default, hands out one shared no-op context manager:
with profiling off the hot path pays an attribute lookup and two empty calls per section.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from time import perf_counter
from typing import Any

# Sections in step order, with the label the report prints; the first one runs once per step.
SECTIONS: dict[str, str] = {
    "schedule": "schedule",
    "propose": "speculative drafts (proposer)",
    "prepare_inputs": "input preparation (metadata, tensors)",
    "forward": "model forward",
    "sample": "logits + sampling",
    "update": "scheduler update + output processing",
}
STEP_SECTION = "schedule"


class _Section:
    """Adds the time between __enter__ and __exit__ to its timer's total for `name`."""

    __slots__ = ("_name", "_start", "_timer")

    def __init__(self, timer: StepTimer, name: str) -> None:
        self._timer = timer
        self._name = name
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = perf_counter()

    def __exit__(self, *exc: object) -> None:
        timer = self._timer
        if timer.sync is not None:  # asynchronous devices: charge queued work to the section that queued it
            timer.sync()
        timer.totals[self._name] += perf_counter() - self._start
        timer.counts[self._name] += 1


class StepTimer:
    """Sums seconds per section over a run. `sync`, when set, is called at every section exit (e.g.
    torch.cuda.synchronize) so time is not hidden in asynchronous launches."""

    enabled = True

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.sync = sync
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self._sections: dict[str, _Section] = {}

    def section(self, name: str) -> AbstractContextManager[None]:
        sec = self._sections.get(name)
        if sec is None:  # one reusable object per name: sections of one name never nest
            sec = self._sections[name] = _Section(self, name)
            self.totals.setdefault(name, 0.0)
            self.counts.setdefault(name, 0)
        return sec

    def reset(self) -> None:
        for name in self.totals:
            self.totals[name] = 0.0
            self.counts[name] = 0

    @property
    def num_steps(self) -> int:
        return self.counts.get(STEP_SECTION, 0)

    def breakdown(self, wall_s: float) -> dict[str, Any]:
        """Seconds and share of `wall_s` per section (known ones first), plus idle/other = the rest."""
        names = [n for n in SECTIONS if n in self.totals] + [n for n in self.totals if n not in SECTIONS]
        in_steps = sum(self.totals.values())
        rows = {n: self.totals[n] for n in names}
        rows["other"] = max(wall_s - in_steps, 0.0)

        def share(seconds: float) -> float:
            return round(seconds / wall_s, 4) if wall_s > 0 else 0.0

        steps = self.num_steps
        forward = self.totals.get("forward", 0.0)
        return {
            "wall_s": round(wall_s, 4),
            "num_steps": steps,
            "mean_step_ms": round(1000 * in_steps / steps, 3) if steps else 0.0,
            "sections": {n: {"seconds": round(s, 4), "share": share(s)} for n, s in rows.items()},
            # Everything that is not the model forward: Python bookkeeping, sampling, idle time.
            "non_forward_share": share(wall_s - forward),
        }


class NullStepTimer:
    """The disabled timer: section() returns a shared no-op context manager."""

    enabled = False
    sync: Callable[[], None] | None = None
    _NOOP: AbstractContextManager[None] = nullcontext()

    def section(self, name: str) -> AbstractContextManager[None]:
        return self._NOOP


NULL_TIMER = NullStepTimer()
AnyStepTimer = StepTimer | NullStepTimer


def format_breakdown(breakdown: dict[str, Any]) -> str:
    """The breakdown as an aligned text table (what `--profile` prints)."""
    labels = {**SECTIONS, "other": "idle/other (adding requests, caller loop)"}
    width = max(len(labels.get(n, n)) for n in breakdown["sections"])
    lines = [f"{'step phase':<{width}}  {'seconds':>9}  {'share':>6}"]
    for name, row in breakdown["sections"].items():
        lines.append(f"{labels.get(name, name):<{width}}  {row['seconds']:9.3f}  {100 * row['share']:5.1f}%")
    lines.append(f"{'wall':<{width}}  {breakdown['wall_s']:9.3f}  100.0%")
    lines.append(
        f"{breakdown['num_steps']} steps, mean step {breakdown['mean_step_ms']:.2f} ms; "
        f"not model forward (Python overhead, sampling, idle): {100 * breakdown['non_forward_share']:.1f}% of wall"
    )
    return "\n".join(lines)
