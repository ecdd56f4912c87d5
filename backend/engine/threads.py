"""CPU threads that leave room for the rest of the machine.

llama.cpp's CPU threads meet at a barrier after every graph node, and its OpenMP build spins there. When another
process holds one of the cores those threads run on, a spinning thread burns the timeslice its partner needs, and
decoding collapses instead of slowing down: SmolLM2 on 2 cores fell from ~150 to ~1 tok/s beside one
`yes > /dev/null` (bench/bench_contention.py), where one thread keeps ~95. Sleeping at the barrier instead
(OMP_WAIT_POLICY=PASSIVE) avoids the collapse but costs ~60% on a quiet machine.

So the scheduler runs as many threads as there are cores the other processes leave free: every `interval` it
reads how much CPU time the machine's cores spent busy and how much of it was this process's own; the rest is
the others' load, in cores. It gives threads back at once when others take a core, and takes them again only
after two windows in a row say the cores are free, so a bursty neighbour (a compiler starting processes) does not
make it flap. A window starts when decoding does: what others ran while this process was idle slowed nothing.
It never runs more threads than it was configured with.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

CpuSample = tuple[float, float, float]  # (wall seconds, busy core-seconds of our cores, our own CPU seconds)


def cpu_times(cpus: tuple[int, ...] | None = None) -> tuple[float, float]:
    """The busy time of `cpus` (all when None) and this process's CPU time, in seconds so far."""
    per_cpu = psutil.cpu_times(percpu=True)
    chosen = per_cpu if cpus is None else [per_cpu[i] for i in cpus if i < len(per_cpu)]
    busy = sum(sum(t) - t.idle - getattr(t, "iowait", 0.0) for t in chosen)
    own = psutil.Process().cpu_times()
    return busy, own.user + own.system


def free_cores(before: CpuSample, after: CpuSample, cores: int) -> float:
    """Cores the other processes left free between two samples (0..cores)."""
    wall = after[0] - before[0]
    if wall <= 0:
        return float(cores)
    others = max(0.0, (after[1] - before[1]) - (after[2] - before[2])) / wall
    return min(float(cores), max(0.0, cores - others))


def threads_for(free: float, configured: int) -> int:
    """Threads to run with when `free` cores are left: the nearest whole core count, at least one, at most the
    configured number."""
    return max(1, min(configured, int(free + 0.5)))


@dataclass
class ThreadGovernor:
    """Chooses llama.cpp's thread count from the cores left free; `poll` returns a new count when it changes."""

    configured: int
    interval: float = 0.5
    cores: int = 0  # cores this process may run on (0: its CPU affinity)
    times: Callable[[], tuple[float, float]] | None = None  # (busy, own) CPU seconds; default: `cpu_times`
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        if not self.cores or self.times is None:
            affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
                list(range(os.cpu_count() or 1))
            self.cores = self.cores or len(affinity)
            if self.times is None:
                self.times = lambda: cpu_times(tuple(affinity))
        self.threads = self.configured
        self._last = self._sample()
        self._rising = 0  # consecutive windows that asked for more threads

    def _sample(self) -> CpuSample:
        assert self.times is not None
        return (self.clock(), *self.times())

    def poll(self, *, resumed: bool = False) -> int | None:
        """Called before each decode step (cheap: it reads the CPU counters once per `interval`); `resumed` when
        the scheduler was idle since its last step. The thread count to switch to, or None to keep the current one."""
        if resumed:  # what others ran while we were idle slowed nothing: start a new window
            self._last = self._sample()
            return None
        if self.clock() - self._last[0] < self.interval:
            return None
        now = self._sample()
        want = threads_for(free_cores(self._last, now, self.cores), self.configured)
        self._last = now
        if want > self.threads:
            self._rising += 1
            if self._rising < 2:
                return None
        self._rising = 0
        if want == self.threads:
            return None
        self.threads = want
        return want
