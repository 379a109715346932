"""The helper thread for the whole step under load (step.c's pool, `native.helper_thread`): the
output layer's weight gradient on it while the caller goes on, the same bits as one thread whoever
computes a tile, a slow helper's tiles taken over, the caller pinned while it is on and given its
CPUs back after, a forked child that still computes, and the thread tuner turning it on for one
thread and off before more."""

from __future__ import annotations

import os

import pytest
import torch

from vaelab import native, threads
from vaelab.config import preset
from vaelab.models import build_model
from vaelab.steps import make_step

lib = native.library()
pytestmark = [
    pytest.mark.skipif(lib is None or not lib.gemm_tiled(), reason="no native products here"),
    pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                       reason="one CPU, or no thread affinity"),
]


@pytest.fixture
def one_thread():
    before, cpus = torch.get_num_threads(), os.sched_getaffinity(0)
    torch.set_num_threads(1)
    yield
    native.helper_thread(False)
    lib.pool_delay(0)
    torch.set_num_threads(before)
    assert os.sched_getaffinity(0) == cpus


def seed_steps():
    """The seed's whole step (`mlp_step`) on a batch of 100 sparse inputs, as MNIST's; returns a
    function giving its three losses and every gradient."""
    torch.manual_seed(0)
    step = make_step(build_model(preset("seed").model), "fp32")
    assert step.whole
    g = torch.Generator().manual_seed(1)
    x = torch.where(torch.rand(100, 784, generator=g) < 0.2, torch.rand(100, 784, generator=g), 0.0)
    eps = torch.randn(100, 2, generator=g)

    def once():
        losses = step(x, x, eps, 1.0, 0.01)
        return torch.stack(list(losses)), step.flat.grad.clone()

    return step, once


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_the_helpers_tiles_are_the_bits_of_one_thread(one_thread):
    step, once = seed_steps()
    alone = once()
    cpus = os.sched_getaffinity(0)
    assert step.helper_thread(True)
    assert len(os.sched_getaffinity(0)) == 1 and os.sched_getaffinity(0) <= cpus  # pinned
    helped = lib.pool_counts(0)
    for _ in range(50):
        assert same(once(), alone)
    assert lib.pool_counts(0) > helped  # (the helper did compute some of them)
    assert not step.helper_thread(False) and os.sched_getaffinity(0) == cpus
    assert same(once(), alone)


def test_a_helper_that_falls_behind_has_its_tiles_taken_over(one_thread):
    step, once = seed_steps()
    alone = once()
    assert step.helper_thread(True)
    lib.pool_delay(2_000_000)  # the helper waits 2 ms before putting each chunk in place
    taken = lib.pool_counts(1)
    for _ in range(5):
        assert same(once(), alone)
    assert lib.pool_counts(1) > taken


def test_a_forked_child_computes_without_its_parents_helper(one_thread):
    step, once = seed_steps()
    alone = once()
    assert step.helper_thread(True)
    once()
    pid = os.fork()
    if pid == 0:  # (the child: the helper off, the step computes alone)
        os._exit(0 if same(once(), alone) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_tuner_turns_the_helper_on_for_one_thread_and_off_before_more(monkeypatch):
    calls = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tuner = threads.ThreadTuner(helper=lambda on: calls.append((on, torch.get_num_threads())) or on)
        tuner._use(1, True)
        tuner._use(1, True)  # (no second call)
        tuner._use(2, True)
        tuner.chosen = 1
        tuner.for_scoring()  # scores not alike: all threads
        tuner._use(1, True)
        tuner.rest()
    finally:
        torch.set_num_threads(before)
    # on after PyTorch has one thread; off while it still has one (before it gets more)
    assert calls == [(True, 1), (False, 1), (True, 1), (False, 1)]


def test_the_helper_stays_off_where_the_caller_cannot_be_pinned(one_thread, monkeypatch):
    step, once = seed_steps()
    alone = once()

    def refuse(pid, cpus):
        raise OSError("not allowed")

    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    assert not step.helper_thread(True)
    monkeypatch.undo()
    helped = lib.pool_counts(0)
    assert same(once(), alone) and lib.pool_counts(0) == helped  # (the step computed alone)
