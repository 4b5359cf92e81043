"""How much CPU other work took while this process timed kernels, so that the execution plan is not cached from
timings a busy machine distorted (worker/planner.py's finish_plan).

A sample reads the machine's CPU time from /proc/stat (every CPU's busy ticks, steal included: the hypervisor's
other guests) and this process's own CPU time (all its threads). Between two samples, the CPU-seconds per second of
wall time that neither this process nor idleness took is what other work ran: `others_cores`. Timing with
`threads` threads on a machine of `cpus` leaves cpus - threads cores to others (a tensor-parallel rank's peers, the
engine's own front end); more than that, plus DISTURBED_SHARE of the machine, means the candidates shared cores.
A contended OpenMP kernel with barriers (the one-call C forward) loses far more than a layer-by-layer path, so such a
timing would not just be slow but pick the wrong kernel: worker/plan.py's choose times a disturbed bucket again, and
finish_plan does not cache a plan with one left disturbed.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

# Others' CPU beyond the cores the timing left free, as a share of the machine, above which timings are disturbed.
DISTURBED_SHARE = 0.10
_STEAL = 7  # /proc/stat cpu columns: user nice system idle iowait irq softirq steal ...
_IDLE = (3, 4)


@dataclass(frozen=True)
class CpuSample:
    wall: float  # seconds (monotonic)
    busy: float  # CPU-seconds of all CPUs, neither idle nor waiting on I/O (steal included)
    own: float  # this process's CPU-seconds, all threads
    cpus: int  # CPUs /proc/stat lists


def sample(stat_path: str = "/proc/stat") -> CpuSample | None:
    """The machine's and this process's CPU time now; None where /proc/stat cannot be read (not Linux)."""
    try:
        with open(stat_path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    total = next((line.split()[1:] for line in lines if line.startswith("cpu ")), None)
    if total is None:
        return None
    ticks = [int(v) for v in total]
    busy = sum(v for i, v in enumerate(ticks[: _STEAL + 1]) if i not in _IDLE) / os.sysconf("SC_CLK_TCK")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return CpuSample(time.monotonic(), busy, usage.ru_utime + usage.ru_stime, max(cpus, 1))


def others_cores(start: CpuSample, end: CpuSample) -> float:
    """Average cores other work (other processes, other guests' steal) kept busy between the two samples."""
    wall = end.wall - start.wall
    if wall <= 0:
        return 0.0
    return max(0.0, (end.busy - start.busy) - (end.own - start.own)) / wall


def disturbed(start: CpuSample | None, end: CpuSample | None, threads: int) -> float | None:
    """others_cores when it exceeds the cores a timing with `threads` threads left free by DISTURBED_SHARE of the
    machine (the timings shared cores); None when not, or unknown. /proc/stat counts whole clock ticks: over a short
    timing, two ticks per CPU are allowed on top."""
    if start is None or end is None or end.wall <= start.wall:
        return None
    others = others_cores(start, end)
    ticks = 2.0 * end.cpus / (os.sysconf("SC_CLK_TCK") * (end.wall - start.wall))
    return others if others > max(0, end.cpus - threads) + DISTURBED_SHARE * end.cpus + ticks else None
