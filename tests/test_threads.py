"""Threads that leave room for other processes (backend/engine/threads.py): the arithmetic, the governor's
hysteresis, a real busy process on this machine, and answers that do not depend on the thread count."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import wait_until

from backend.engine.generation import GenerationRequest
from backend.engine.llama import Engine, EngineConfig
from backend.engine.scheduler import Scheduler, collect
from backend.engine.speculative import SpecConfig
from backend.engine.threads import ThreadGovernor, free_cores, threads_for


def test_free_cores_are_what_the_other_processes_leave():
    # 1 s: the cores were busy 1.9 core-seconds, 0.9 of them ours -> others held one core of two
    assert free_cores((0.0, 10.0, 5.0), (1.0, 11.9, 5.9), cores=2) == pytest.approx(1.0)
    assert free_cores((0.0, 10.0, 5.0), (1.0, 11.0, 6.0), cores=2) == 2.0  # all of it ours
    assert free_cores((0.0, 0.0, 0.0), (1.0, 9.0, 0.0), cores=2) == 0.0  # more than the cores: clamped
    assert free_cores((1.0, 0.0, 0.0), (1.0, 1.0, 0.0), cores=2) == 2.0  # no time passed
    assert [threads_for(f, 2) for f in (0.0, 0.6, 1.3, 1.6, 2.0)] == [1, 1, 1, 2, 2]
    assert threads_for(7.5, 4) == 4


def test_governor_gives_threads_back_at_once_and_takes_them_after_two_free_windows():
    now, busy, own = [0.0], [0.0], [0.0]

    def window(others: float, ours: float = 1.0) -> int | None:
        now[0] += 0.5
        busy[0] += (others + ours) * 0.5
        own[0] += ours * 0.5
        return gov.poll()

    gov = ThreadGovernor(2, cores=2, times=lambda: (busy[0], own[0]), clock=lambda: now[0])
    assert gov.poll() is None  # within the first interval: nothing is read
    assert window(0.0) is None and gov.threads == 2
    assert window(1.0) == 1  # a neighbour took a core
    assert window(1.0) is None
    assert window(0.0) is None and gov.threads == 1  # one free window is not enough
    assert window(1.0) is None
    assert window(0.0) is None
    assert window(0.0) == 2 and gov.threads == 2
    now[0] += 10.0  # idle while a neighbour computed: that window is not judged
    busy[0] += 20.0
    assert gov.poll(resumed=True) is None and window(0.0) is None and gov.threads == 2
    now[0] += 3.0  # one slow step (threads starved by a neighbour) is judged like any other window
    busy[0] += 3.0 * 2
    own[0] += 3.0
    assert gov.poll() == 1


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_governor_sees_a_busy_process_on_this_machine():
    cores = len(os.sched_getaffinity(0))
    gov = ThreadGovernor(cores, interval=0.25)

    def threads() -> int:
        gov.poll()
        return gov.threads

    hog = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: threads() < cores, 20, 0.05)
    finally:
        hog.kill()
        hog.wait()
    wait_until(lambda: threads() == cores, 20, 0.05)


def test_greedy_answers_do_not_depend_on_the_thread_count(smollm2_path):
    s = Scheduler(Engine(smollm2_path, EngineConfig(n_ctx=512, n_threads=2, adaptive_threads=False)), SpecConfig())
    try:
        assert s.threads is None
        req = GenerationRequest(prompt=s.engine.tokenize("Write a poem about the sea."), max_tokens=32,
                                ignore_eos=True)
        two = collect(s, req).token_ids
        s.engine.reset()
        s.engine.set_threads(1)
        assert collect(s, req).token_ids == two
    finally:
        s.close()
    adaptive = Scheduler(Engine(smollm2_path, EngineConfig(n_ctx=512, n_threads=2)), SpecConfig())
    try:
        assert adaptive.threads is not None and adaptive.threads.configured == 2
        assert collect(adaptive, req).token_ids == two
    finally:
        adaptive.close()
