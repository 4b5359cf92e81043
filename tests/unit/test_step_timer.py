"""StepTimer: per-section sums, the breakdown's shares, and the no-op timer."""

from __future__ import annotations

import pytest

from tokenmill.engine import step_timer
from tokenmill.engine.step_timer import NULL_TIMER, StepTimer, format_breakdown


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A fake perf_counter: tests advance now[0] by hand."""
    now = [0.0]
    monkeypatch.setattr(step_timer, "perf_counter", lambda: now[0])
    return now


def _step(timer: StepTimer, clock: list[float], seconds: dict[str, float]) -> None:
    for name, dt in seconds.items():
        with timer.section(name):
            clock[0] += dt


def test_sections_sum_and_count_steps(clock: list[float]) -> None:
    timer = StepTimer()
    for _ in range(4):
        _step(timer, clock, {"schedule": 0.01, "prepare_inputs": 0.02, "forward": 0.5, "sample": 0.03, "update": 0.04})
        with timer.section("update"):  # a second update section in the same step (output processing)
            clock[0] += 0.01
    assert timer.num_steps == 4
    assert timer.totals["forward"] == pytest.approx(2.0)
    assert timer.totals["update"] == pytest.approx(0.2)
    assert timer.counts["update"] == 8

    report = timer.breakdown(wall_s=3.0)
    sections = report["sections"]
    assert list(sections) == ["schedule", "prepare_inputs", "forward", "sample", "update", "other"]
    assert sections["other"]["seconds"] == pytest.approx(3.0 - 2.44)
    assert sum(row["share"] for row in sections.values()) == pytest.approx(1.0, abs=1e-3)
    assert report["num_steps"] == 4
    assert report["mean_step_ms"] == pytest.approx(610.0)
    assert report["non_forward_share"] == pytest.approx(1 / 3, abs=1e-3)
    text = format_breakdown(report)
    assert "model forward" in text and "idle/other" in text and "4 steps" in text


def test_reset_and_exceptions(clock: list[float]) -> None:
    timer = StepTimer()
    with pytest.raises(RuntimeError), timer.section("forward"):
        clock[0] += 1.0
        raise RuntimeError("boom")
    assert timer.totals["forward"] == pytest.approx(1.0)  # a failing section still counts its time
    timer.reset()
    assert timer.totals["forward"] == 0.0 and timer.num_steps == 0
    assert timer.breakdown(wall_s=0.0)["mean_step_ms"] == 0.0


def test_sync_runs_at_every_section_exit(clock: list[float]) -> None:
    calls: list[float] = []
    timer = StepTimer(sync=lambda: calls.append(clock[0]))
    _step(timer, clock, {"schedule": 1.0, "forward": 2.0})
    assert calls == [1.0, 3.0]


def test_null_timer_is_a_shared_no_op() -> None:
    assert not NULL_TIMER.enabled
    first = NULL_TIMER.section("forward")
    assert NULL_TIMER.section("schedule") is first
    with first:
        pass
    with first:  # reusable
        pass
