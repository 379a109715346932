"""Training under contention: the thread tuner picks the faster thread count from step times, and
the numbers of a run do not depend on it (one thread or two: the same metrics and weights)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import vaelab
from vaelab import threads
from vaelab.config import merge
from vaelab.distributed import Context
from vaelab.train import _build


@pytest.fixture(autouse=True)
def no_neighbours_seen(monkeypatch):
    """The tuner's view of other processes' CPU use comes from the test (none: unknown, and the
    tuner probes on its schedule), not from the machine the tests run on."""
    monkeypatch.setattr(threads, "others_cpu", lambda: None)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_the_seed_step_gives_the_same_numbers_with_one_thread_and_two(two_threads):
    config = vaelab.preset("seed")
    model, step_fn, _ = _build(config, torch.device("cpu"), Context())
    tuner = threads.tuner_for(step_fn, config, torch.device("cpu"), 60000)
    assert isinstance(tuner, threads.ThreadTuner) and not tuner.scores_alike  # (no sets to score given)
    # the test pass too (its batches of 2000, and a validation set's last 500), with the native step
    tuner = threads.tuner_for(step_fn, config, torch.device("cpu"), 60000, (10000, 2500))
    assert tuner.scores_alike == hasattr(step_fn, "loss_sums")


def test_the_test_pass_follows_the_steps_count_only_where_its_numbers_allow(two_threads):
    for alike, expected in ((True, 1), (False, 2)):
        tuner = threads.ThreadTuner(scores_alike=alike)
        drive(tuner, {2: 5.0, 1: 2.0}, 100)  # busy: one thread chosen
        with threads.scoring_threads(tuner):
            assert tuner.chosen == 1 and torch.get_num_threads() == expected
        assert torch.get_num_threads() == 2  # all threads again after the test pass
    with threads.scoring_threads(None):
        assert torch.get_num_threads() == 2
    x, eps = torch.rand(20, 784), torch.randn(20, 2)
    assert threads._sums_alike(lambda x, eps: (x.sum().item(), eps.sum().item()), x, eps)
    assert not threads._sums_alike(lambda x, eps: (float(torch.get_num_threads()), 0.0), x, eps)
    assert torch.get_num_threads() == 2


def test_no_tuner_where_the_numbers_could_depend_on_it(two_threads):
    conv = merge(vaelab.preset("conv"), {"model": {"input_shape": [1, 28, 28]}}, where="test")
    _, step_fn, _ = _build(conv, torch.device("cpu"), Context())
    assert threads.tuner_for(step_fn, conv, torch.device("cpu"), 60000) is None  # autograd's step
    torch.set_num_threads(1)
    seed = vaelab.preset("seed")
    _, step_fn, _ = _build(seed, torch.device("cpu"), Context())
    assert threads.tuner_for(step_fn, seed, torch.device("cpu"), 60000) is None  # nothing to choose from


def drive(tuner, seconds_per_step, steps, clock=None):
    """Run `steps` steps through the tuner with a scripted clock (from 0, or `clock`, a one-item
    list, going on from its time): a step takes seconds_per_step[thread count] (a dict, or a
    function of the count); returns the thread count of each step."""
    clock = [0.0] if clock is None else clock
    used = []
    real = threads.time.perf_counter
    threads.time.perf_counter = lambda: clock[0]
    seconds = seconds_per_step if callable(seconds_per_step) else seconds_per_step.__getitem__
    try:
        for _ in range(steps):
            tuner.step_started()
            used.append(torch.get_num_threads())
            clock[0] += seconds(torch.get_num_threads())
            tuner.step_done()
    finally:
        threads.time.perf_counter = real
    return used


def test_the_tuner_keeps_all_threads_on_a_quiet_machine(two_threads):
    tuner = threads.ThreadTuner()
    used = drive(tuner, {2: 1.0, 1: 1.8}, 1000)
    # probes at steps 0, 232 and 664 (then 200, 400, 800 steps between), one thread in half of each
    assert used.count(1) == threads.PROBE_STEPS * 3
    assert used[-300:] == [2] * 300 and tuner.chosen == 2


def test_the_tuner_counts_the_steps_that_wait_for_a_thread_without_a_core(two_threads):
    """Most steps with both threads as fast as alone, one in four waiting a time slice: slower on
    the whole, and the tuner must see that (a median would not)."""
    pattern = iter([1.1, 1.1, 1.1, 5.2] * 1000)
    tuner = threads.ThreadTuner()
    drive(tuner, lambda n: next(pattern) if n == 2 else 1.65, 2 * threads.PROBE_STEPS)
    assert tuner.chosen == 1


def test_the_tuner_takes_one_thread_when_a_core_is_busy_and_comes_back(two_threads):
    tuner = threads.ThreadTuner()
    used = drive(tuner, {2: 5.0, 1: 2.0}, 300)  # two threads wait for each other: slower
    assert tuner.chosen == 1 and used[-100:].count(1) >= 100 - threads.PROBE_STEPS
    used = drive(tuner, {2: 1.0, 1: 1.8}, 500)  # the neighbour is gone
    assert tuner.chosen == 2 and used[-200:].count(1) <= threads.PROBE_STEPS
    tuner.rest()
    assert torch.get_num_threads() == 2


def test_the_tuner_probes_at_once_when_its_steps_slow_down_between_probes(two_threads):
    """Quiet until the longest period between probes is reached; then a core slows down for a
    while (both threads 2.4x slower, one thread as before): one thread from within PROBE_STEPS
    (watched) + 2 * PROBE_STEPS (the probe) steps, not at the next scheduled probe; and a step
    that stalls once in a while does not start a probe."""
    tuner = threads.ThreadTuner()
    drive(tuner, {2: 1.0, 1: 1.8}, 3200)  # probes at 0, 232, 664, 1528, then 1600 steps apart
    assert tuner.period == threads.LONGEST_PERIOD and tuner.until_probe > 1000
    used = drive(tuner, {2: 2.4, 1: 1.8}, 200)
    switched, period = 3 * threads.PROBE_STEPS + 1, threads.FIRST_PERIOD
    assert tuner.chosen == 1 and used[switched : switched + period] == [1] * period
    tuner.rest()

    tuner = threads.ThreadTuner()
    drive(tuner, {2: 1.0, 1: 1.8}, 3200)
    waiting = tuner.until_probe
    assert tuner.chosen == 2 and tuner.expected == 1.0
    # one step in every 16 waits 4x as long: every watch's mean is 1.19x the probe's
    pattern = itertools.cycle([1.0] * (threads.PROBE_STEPS - 1) + [4.0])
    drive(tuner, lambda n: next(pattern) if n == 2 else 1.8, 4 * threads.PROBE_STEPS)
    assert tuner.until_probe == waiting - 4 * threads.PROBE_STEPS and not tuner.probe


def test_the_tuner_puts_probes_off_while_the_neighbour_that_made_it_take_one_thread_stays(
    two_threads, monkeypatch
):
    """Other processes' CPU use scripted on the drive's clock: a neighbour on one core makes two
    threads slower; while it stays, no probe until LONGEST_WAIT steps after the last; when it
    leaves, the next probe that is due runs and all threads come back."""
    clock, neighbour = [0.0], {"cores": 1.0, "seconds": 0.0, "at": 0.0}

    def others():
        neighbour["seconds"] += neighbour["cores"] * (clock[0] - neighbour["at"])
        neighbour["at"] = clock[0]
        return neighbour["seconds"]

    monkeypatch.setattr(threads, "others_cpu", others)
    monkeypatch.setattr(threads.time, "perf_counter", lambda: clock[0])  # (the tuner's start too)
    busy = {2: 5.0, 1: 2.0}
    tuner = threads.ThreadTuner()
    used = drive(tuner, busy, 3000, clock)
    assert tuner.chosen == 1 and tuner.neighbours == pytest.approx(1.0)
    assert used[threads.PROBE_STEPS :] == [1] * (3000 - threads.PROBE_STEPS)  # the first probe only
    used = drive(tuner, busy, threads.LONGEST_WAIT + threads.LONGEST_PERIOD, clock)
    assert used.count(2) == threads.PROBE_STEPS  # one probe, LONGEST_WAIT steps after the last
    probe = 2 * threads.PROBE_STEPS  # the steps of a probe (its half on one thread first)
    ended = probe + threads.LONGEST_WAIT + probe  # the first probe, the wait, the second
    assert used.index(2) == ended - threads.PROBE_STEPS - 3000
    assert tuner.chosen == 1 and tuner.since_probe == 3000 + len(used) - ended

    neighbour["cores"] = 0.0  # it leaves: the next probe that is due runs
    used = drive(tuner, {2: 1.0, 1: 1.8}, threads.LONGEST_PERIOD + 2 * threads.PROBE_STEPS, clock)
    assert tuner.chosen == 2 and used[-1] == 2
    # with all threads chosen, probes keep their schedule whatever the other processes do
    neighbour["cores"] = 1.0
    waiting, period = tuner.until_probe, tuner.period
    used = drive(tuner, {2: 1.0, 1: 1.8}, waiting + 2 * threads.PROBE_STEPS + 2 * period, clock)
    assert used.count(1) == threads.PROBE_STEPS and tuner.until_probe == 0  # and the next is due


def test_on_one_thread_the_tuner_keeps_the_helper_thread_only_while_it_pays(two_threads):
    """A step with a helper thread (`helper(on)`), under load (two threads 5 s a step, one 2 s):
    on one thread, trials of PROBE_STEPS steps with the helper the other way, HELPER_PERIOD steps
    apart and doubled while the setting wins; the helper goes off when it makes the steps slower
    and comes back when it makes them faster, and is never on with more than one thread."""
    helper = {"on": False}

    def turn(on):
        helper["on"] = on
        return on

    tuner, with_helper = threads.ThreadTuner(helper=turn), {"seconds": 1.5}
    seen = []

    def seconds(n):
        assert not (helper["on"] and n != 1)
        seen.append((n, helper["on"]))
        return 5.0 if n == 2 else with_helper["seconds"] if helper["on"] else 2.0

    drive(tuner, seconds, 1000)
    assert tuner.chosen == 1 and tuner.helper_wins
    off = [i for i, (n, on) in enumerate(seen) if n == 1 and not on]
    runs = [len(list(g)) for _, g in itertools.groupby(enumerate(off), lambda e: e[1] - e[0])]
    assert runs == [threads.PROBE_STEPS] * 3  # three trials, each kept the helper: 100, 200, 400 apart
    assert tuner.until_trial <= 8 * threads.HELPER_PERIOD

    with_helper["seconds"] = 3.0  # the helper now makes the steps slower than one thread alone
    seen.clear()
    drive(tuner, seconds, 1000)
    assert not tuner.helper_wins and not helper["on"]
    assert seen[-100:].count((1, True)) <= threads.PROBE_STEPS  # (at most one trial)

    with_helper["seconds"] = 1.5  # and faster again
    drive(tuner, seconds, 2000)
    assert tuner.helper_wins and helper["on"] and tuner.chosen == 1
    tuner.rest()
    assert not helper["on"] and torch.get_num_threads() == 2


def test_the_other_processes_cpu_use_is_read_from_the_machine(monkeypatch):
    """A process busy on a core for half a second shows as at least half a core (Linux)."""
    import subprocess
    import sys
    import time

    monkeypatch.undo()  # the machine's own numbers
    if threads.others_cpu() is None:
        pytest.skip("no /proc/stat here")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # (its start-up)
        then, used = time.perf_counter(), threads.others_cpu()
        time.sleep(0.5)
        cores = (threads.others_cpu() - used) / (time.perf_counter() - then)
    finally:
        busy.kill()
        busy.wait()
    assert cores >= 0.5


def test_the_epoch_line_says_how_many_steps_ran_on_one_thread_by_choice(two_threads):
    """Probe steps on one thread do not count; steps after the tuner chose one thread do."""
    tuner = threads.ThreadTuner()
    drive(tuner, {2: 1.0, 1: 1.8}, 40)  # quiet: one thread only in the first probe
    assert tuner.epoch_note() == ""
    # busy: the watch sees it 8 steps in (the 16 steps since the probe: 8 quiet, 8 busy), one
    # thread is chosen after the probe it starts, and the next probe, 100 steps later, runs 16
    # steps on two threads
    drive(tuner, {2: 5.0, 1: 2.0}, 300)
    one = tuner.steps_on_one
    assert one == 300 - (8 + 2 * threads.PROBE_STEPS) - threads.PROBE_STEPS
    assert tuner.epoch_note() == f"  (one thread for {one} of 300 steps: cores were busy)"
    assert tuner.epoch_note() == ""  # counted again from the next epoch


@pytest.mark.parametrize("sparse", [False, True])
def test_a_run_is_the_same_with_the_tuner_on_one_thread_and_with_two(
    tiny_npz, tmp_path, two_threads, monkeypatch, sparse
):
    """Dense digits (three in five pixels nonzero) and sparse ones (one in five, as MNIST's: the
    native step's first layer skips the zeros)."""
    source = tiny_npz
    if sparse:
        arrays = dict(np.load(tiny_npz))
        for key in ("x_train", "x_test"):
            arrays[key] = np.where(arrays[key] > 50, arrays[key], 0).astype(np.uint8)
        assert 0.1 < (arrays["x_train"] > 0).mean() < 0.3
        source = tmp_path / "sparse.npz"
        np.savez(source, **arrays)
    config = merge(
        vaelab.preset("seed"),
        {"data": {"source": str(source)}, "model": {"hidden": [256]}, "train": {"epochs": 2}},
        where="test",
    )
    vaelab.train(config, tmp_path / "two")
    monkeypatch.setattr(threads.ThreadTuner, "_threads_now", lambda self: 1)
    monkeypatch.setattr(threads.ThreadTuner, "for_scoring", lambda self: torch.set_num_threads(1))
    vaelab.train(config, tmp_path / "one")

    def metrics(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert metrics(tmp_path / "one") == metrics(tmp_path / "two")
    one, two = (
        load_file(tmp_path / "one" / "model.safetensors"),
        load_file(tmp_path / "two" / "model.safetensors"),
    )
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_a_compiled_step_keeps_its_threads_and_the_last_smaller_batch_is_checked(two_threads, monkeypatch):
    from vaelab.steps import FusedMLPStep

    config = vaelab.preset("seed")
    model, step_fn, _ = _build(config, torch.device("cpu"), Context())
    assert threads.tuner_for(FusedMLPStep(model, compile=True), config, torch.device("cpu"), 60000) is None
    checked = []

    def record(step, flat, x, eps):
        checked.append(len(x))
        return True

    monkeypatch.setattr(threads, "independent_of_threads", record)
    assert threads.tuner_for(step_fn, config, torch.device("cpu"), 1050) is not None
    assert checked == [50, 50, 100, 100]  # the epoch's last batch of 50 as well as the full 100,
    checked.clear()  # each dense and sparse
    assert threads.tuner_for(step_fn, config, torch.device("cpu"), 60000) is not None
    assert checked == [100, 100]
