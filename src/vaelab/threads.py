"""Threads under contention: train with one thread while another process holds the other cores.

PyTorch runs a step's operations on all of the process's threads (OpenMP), each operation waiting
at its end for every thread. When another process keeps a core busy, the thread that shares that
core falls behind, and the others wait for it, spinning: on this project's 2-core machine one busy
process made a seed epoch 3.6-5x slower with two threads, and only 2x slower with one.

`ThreadTuner` times the steps now and then with all threads and with one, and trains on with the
faster; between those probes it watches the steps, and probes at once when they slow down. While
it trains on one thread and other processes still use as much CPU as when it chose it (Linux's
/proc/stat), it puts a probe off (up to LONGEST_WAIT steps): under load, a step on all threads
stalls now and then for 5-136 ms waiting for the thread without a core, so a busy epoch's probes
cost more than their steps' times show. On one thread, a step with a helper thread (the native
whole step's, `NativeMLPStep.helper_thread`: the output layer's weight gradient on a second
thread while the first goes on with the step, which then uses some of the busy core without
waiting for it) runs with it, and tries it the other way now and then, keeping the faster. It is
used only where the numbers cannot depend on it: the fused MLP step, after a check on the first
batch that one thread and all of them give bit-identical losses and gradients (its matrix
products and per-image sums split their work by rows, so they do; see `vaelab.products`). The
test pass runs on the count chosen for the steps where the same check on its batches passes (the
native step's loss sums; on a busy 2-core machine its 0.21 s per epoch on two threads became
0.08 s), else on all threads; everything else runs on all threads.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time

import torch

PROBE_STEPS = 16  # steps timed with each thread count in a probe (the first of each left out)
FIRST_PERIOD = 100  # steps between probes, doubled each time a probe keeps the choice
LONGEST_PERIOD = 1600
MARGIN = 0.85  # the other count is taken when its steps take at most this share of the time
# Between probes every PROBE_STEPS steps are watched: when they take SLOWER times as long as the
# chosen count's steps did in the last probe, the machine changed (a neighbour started, or a core
# slowed down for seconds), and the next probe starts at once rather than up to LONGEST_PERIOD later.
SLOWER = 1.3
# Other processes using at least NEIGHBOUR cores count as a neighbour that is still there; a probe
# is put off for at most LONGEST_WAIT steps after the last one.
NEIGHBOUR = 0.5
LONGEST_WAIT = 4 * LONGEST_PERIOD
# On one thread by choice, the step's helper thread (where it has one) is tried the other way
# (off where on, on where off) for PROBE_STEPS steps every HELPER_PERIOD steps, doubled each time
# the trial keeps the setting: whether a helper pays depends on the host, which changes during a
# run (in minutes when a cache line took 330-500 ns to go between the cores and back rather than
# 55-80, the seed's step gained nothing from it).
HELPER_PERIOD = 100


def others_cpu() -> float | None:
    """The CPU seconds the machine's other processes have used (since boot): /proc/stat's busy
    time (user, nice, system, irq, softirq) less this process's own; None without /proc/stat."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, AttributeError, ValueError):
        return None
    if fields[:1] != [b"cpu"] or len(fields) < 8:
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[1:8])
    return (user + nice + system + irq + softirq) / ticks - time.process_time()


def independent_of_threads(step_fn, flat: torch.nn.Parameter, x: torch.Tensor, eps: torch.Tensor) -> bool:
    """Whether the step gives bit-identical losses and gradients with one thread (and its helper
    thread, where it has one) and with all (checked on one batch of this run's shapes; the
    weights do not change)."""
    if torch.get_num_threads() < 2:
        return False

    def step():
        losses = step_fn(x, x, eps, 1.0, 1.0 / len(x))
        return torch.stack(list(losses)).clone(), flat.grad.clone()

    one, most = _on_one_and_all(step, _helper_of(step_fn))
    return all(torch.equal(a, b) for a, b in zip(one, most, strict=True))


def _helper_of(step_fn):
    """The step's `helper_thread(on)` where it has one (the native whole step), else None."""
    return step_fn.helper_thread if getattr(step_fn, "whole", False) else None


def _on_one_and_all(fn, helper=None) -> list:
    """fn()'s results on one thread (with `helper(True)` where given) and on all of the
    process's (the count restored after)."""
    most = torch.get_num_threads()
    results = []
    try:
        for n in (1, most):
            _set_threads(n, helper)
            results.append(fn())
    finally:
        _set_threads(most, helper)
    return results


def _set_threads(n: int, helper=None) -> bool:
    """PyTorch's thread count n, and the step's helper thread (`helper`, where it has one) on for
    one thread and off for more (off first: a thread started while the caller is pinned to a
    CPU would be pinned too); returns whether the helper is on."""
    if helper is not None and n != 1:
        helper(False)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return helper is not None and n == 1 and helper(True)


class ThreadTuner:
    """Picks the thread count of the training steps: all of the process's, or one, whichever
    ran faster in the last probe. Call `step_started` before a step and `step_done` after it,
    and `rest` to give all threads back after the epoch's steps; `scoring_threads(tuner)` around
    the test pass."""

    def __init__(self, scores_alike: bool = False, helper=None) -> None:
        self.most = torch.get_num_threads()
        self.scores_alike = scores_alike  # the test pass's numbers are the same on any count
        self.helper = helper  # the step's helper thread for one thread (`helper(on)`), or None
        self.with_helper = False  # asked for now
        self.helper_wins = helper is not None  # on one thread: with the helper (its last trial)
        self.trial: list[float] | None = None  # a helper trial's step seconds (the other way)
        self.recent: list[float] = []  # the last PROBE_STEPS steps' seconds between probes
        self.trial_period = self.until_trial = HELPER_PERIOD
        self.chosen = self.most
        self.period = FIRST_PERIOD
        self.until_probe = 0  # probe at the first step
        self.probe: list[tuple[int, float]] = []  # (threads, seconds) of the probe's steps
        self.started = 0.0
        self.expected = 0.0  # mean seconds of a step on the chosen count in the last probe (0: none yet)
        self.watched: list[float] = []  # seconds of the steps since the last watch
        self.steps = self.steps_on_one = 0  # this epoch's steps, and those the choice ran on one thread
        self.since_probe = 0  # steps since the last probe ended
        self.mark = (time.perf_counter(), others_cpu())  # for the other processes' CPU use since
        self.neighbours: float | None = None  # their cores in use up to the last probe's end

    def epoch_note(self) -> str:
        """For the epoch's log line: how many of its steps ran on one thread by choice (the
        machine was busy), or ''; the counts start again for the next epoch."""
        steps, one = self.steps, self.steps_on_one
        self.steps = self.steps_on_one = 0
        return f"  (one thread for {one} of {steps} steps: cores were busy)" if one else ""

    def _threads_now(self) -> int:
        if self.until_probe > 0:
            return self.chosen
        done = len(self.probe)
        return self.chosen if done < PROBE_STEPS else self._other()

    def _other(self) -> int:
        return 1 if self.chosen == self.most else self.most

    def step_started(self) -> None:
        threads = self._threads_now()
        self.steps += 1
        self.steps_on_one += threads == 1 and self.chosen == 1
        self._use(threads, self.helper_wins != (self.trial is not None))  # (a trial: the other way)
        self.started = time.perf_counter()

    def step_done(self) -> None:
        seconds = time.perf_counter() - self.started
        if self.until_probe > 0 and self.trial is not None:
            self._try_helper(seconds)
            return
        if self.until_probe > 0:
            self.until_probe -= 1
            self.since_probe += 1
            self._watch(seconds)
            self._helper_trial_due(seconds)
            if self.until_probe == 0 and self._still_busy():
                self.period = min(2 * self.period, LONGEST_PERIOD)  # put off, as a kept choice
                self.until_probe = min(self.period, LONGEST_WAIT - self.since_probe)
            return
        self.probe.append((torch.get_num_threads(), seconds))
        if len(self.probe) == 2 * PROBE_STEPS:
            self._decide()

    def _decide(self) -> None:
        # Means, not medians: under contention most steps with all threads are as fast as alone,
        # and one in a few waits a whole time slice (4-5 ms here) for the thread that lost its
        # core; those waits are the cost. Each half's first step is left out (it pays for the switch).
        ours = statistics.fmean(s for _, s in self.probe[1:PROBE_STEPS])
        theirs = statistics.fmean(s for _, s in self.probe[PROBE_STEPS + 1 :])
        if theirs <= MARGIN * ours:
            self.chosen, self.period, self.expected = self._other(), FIRST_PERIOD, theirs
        else:
            self.period, self.expected = min(2 * self.period, LONGEST_PERIOD), ours
        self.probe, self.until_probe, self.watched, self.since_probe = [], self.period, [], 0
        self.recent = []  # (a helper trial compares with steps of the count chosen now)
        self.neighbours = self._others_cores()

    def _helper_trial_due(self, seconds: float) -> None:
        """Between probes on one thread: start a helper trial (the next PROBE_STEPS steps with
        the helper the other way) once HELPER_PERIOD steps have passed since the last."""
        self.recent = (self.recent + [seconds])[-PROBE_STEPS:]
        if self.chosen != 1 or self.helper is None or self.until_probe == 0:
            return
        self.until_trial -= 1
        if self.until_trial <= 0 and len(self.recent) == PROBE_STEPS:
            self.trial = []

    def _try_helper(self, seconds: float) -> None:
        """A helper trial's step; after PROBE_STEPS of them the setting whose steps were faster
        (means, the trial's first step left out, MARGIN as in `_decide`) is kept."""
        self.trial.append(seconds)
        if len(self.trial) < PROBE_STEPS:
            return
        if statistics.fmean(self.trial[1:]) <= MARGIN * statistics.fmean(self.recent):
            self.helper_wins, self.trial_period = not self.helper_wins, HELPER_PERIOD
            self.expected = statistics.fmean(self.trial[1:])  # (the steps' time from now on)
        else:
            self.trial_period = min(2 * self.trial_period, LONGEST_PERIOD)
        self.trial, self.recent, self.until_trial = None, [], self.trial_period

    def _others_cores(self) -> float | None:
        """The cores the other processes used, on average, since the last call (None: unknown)."""
        (then, used), now = self.mark, (time.perf_counter(), others_cpu())
        self.mark = now
        if used is None or now[1] is None or now[0] <= then:
            return None
        return (now[1] - used) / (now[0] - then)

    def _still_busy(self) -> bool:
        """Whether a probe that is due can wait: the steps run on one thread, the last probe ended
        at most LONGEST_WAIT steps ago, and since the last look the other processes used at least
        NEIGHBOUR cores, and no fewer than up to that probe by NEIGHBOUR (the neighbour that
        made all threads slower is still there, and a probe would only wait for it)."""
        if self.chosen != 1 or self.neighbours is None or self.since_probe >= LONGEST_WAIT:
            return False
        cores = self._others_cores()
        return cores is not None and cores >= max(NEIGHBOUR, self.neighbours - NEIGHBOUR)

    def _watch(self, seconds: float) -> None:
        """Between probes: probe at the next step once the last PROBE_STEPS steps took SLOWER times
        as long as the last probe's (means, as in `_decide`)."""
        self.watched.append(seconds)
        if len(self.watched) < PROBE_STEPS:
            return
        if self.expected and statistics.fmean(self.watched) > SLOWER * self.expected:
            self.until_probe = 0
        self.watched = []

    def for_scoring(self) -> None:
        """The test pass's threads: the count the steps run on, where its numbers cannot depend on
        it (`scores_alike`), else all."""
        self._use(self.chosen if self.scores_alike else self.most, self.helper_wins)

    def rest(self) -> None:
        self._use(self.most)

    def _use(self, threads: int, with_helper: bool = False) -> None:
        """PyTorch's thread count, and the helper thread with one thread where `with_helper`
        (`_set_threads`; off first where it goes off)."""
        with_helper = with_helper and threads == 1 and self.helper is not None
        if torch.get_num_threads() != threads or self.with_helper != with_helper:
            if self.with_helper and not with_helper:
                self.helper(False)
            _set_threads(threads, self.helper if with_helper else None)
            self.with_helper = with_helper


def tuner_for(
    step_fn, config, device: torch.device, n_train: int, n_scored: tuple[int, ...] = ()
) -> ThreadTuner | None:
    """A `ThreadTuner` for a run's step on a CPU (`config` a RunConfig), or None: only the fused
    MLP step, uncompiled (a compiled step's kernels keep the thread count they were compiled
    with), and only where one thread and all give it the same numbers, at the batch size and at
    the epoch's last, smaller batch. n_scored: the sizes of the sets the test pass scores
    (validation, test); where the step's loss sums give the same numbers on one thread and all
    at their batches' sizes too, the test pass follows the tuner's choice."""
    from vaelab.scoring import EVAL_CHUNK
    from vaelab.steps import FusedMLPStep

    if not isinstance(step_fn, FusedMLPStep) or step_fn.compiled or device.type != "cpu":
        return None
    if torch.get_num_threads() < 2:
        return None
    batch = config.train.batch_size
    if not all(
        independent_of_threads(step_fn, step_fn.flat, x, eps)
        for x, eps in _batches(config, {min(batch, n_train), n_train % batch})
    ):
        return None
    sums = getattr(step_fn, "loss_sums", None)  # the native step's test pass
    chunks = {size for n in n_scored for size in (min(EVAL_CHUNK, n), n % EVAL_CHUNK)} - {0}
    alike = bool(chunks) and sums is not None
    alike = alike and all(_sums_alike(sums, x, eps) for x, eps in _batches(config, chunks))
    return ThreadTuner(scores_alike=alike, helper=_helper_of(step_fn))


def _batches(config, sizes: set[int]):
    """Batches of the run's shapes at each of `sizes` (its own random stream): (x, eps), dense and
    as sparse as MNIST (the native step's first layer then skips the zeros)."""
    g = torch.Generator().manual_seed(0)
    for rows in sorted(sizes - {0}):
        x = torch.rand(rows, config.model.input_dim, generator=g)
        eps = torch.randn(rows, config.model.latent_dim, generator=g)
        for pixels in (x, torch.where(x < 0.2, x * 5, 0.0)):
            yield pixels, eps


def _sums_alike(sums, x: torch.Tensor, eps: torch.Tensor) -> bool:
    """Whether `sums(x, eps)` (the test pass's loss sums, which the helper thread takes no part
    in) is the same on one thread and on all."""
    one, most = _on_one_and_all(lambda: sums(x, eps))
    return one == most


@contextlib.contextmanager
def scoring_threads(tuner: ThreadTuner | None):
    """Around the test pass: the steps' thread count where its numbers cannot depend on it
    (`ThreadTuner.for_scoring`), and all threads again after it (nothing without a tuner)."""
    if tuner is not None:
        tuner.for_scoring()
    try:
        yield
    finally:
        if tuner is not None:
            tuner.rest()
