"""Predictions first: the explanation process paces itself while predictions are in flight.

The explanation process already runs in Linux's ``SCHED_IDLE`` class, so a prediction thread
that wakes takes the core from it at once. That is not enough on a small machine: an
explanation that runs whenever a core is idle for a moment still shares the caches and memory
bandwidth with the predictions: under a 32-client soak it cost /predict 12 % of its throughput
(95 % interval 7-17 %; `bench/soak.py --alternate`). Here the two processes share one number:

- the request worker counts the predictions in flight (submitted to the model's batcher and
  not yet answered) in eight bytes of shared memory (`PredictionLoad`, a ``memfd``);
- the explanation process reads it (`PredictionLoad.attach`) and, while it is not zero, uses
  at most `share` CPU-seconds a second (0.05: a twentieth of one core; `ExplanationPacer`): an
  explanation that took c CPU-seconds (all its threads) starts the next no sooner than c /
  share seconds after it began, or at once when predictions stop. On an idle server nothing
  waits. CPU time, not wall time: under load the lowest-priority process is preempted often,
  and its wall time would count the predictions' work against it. (For the same reason the
  explanation process's OpenMP threads spin only briefly before they sleep,
  ``GOMP_SPINCOUNT=30000``: spinning they would count CPU time that does no work. Sleeping at
  once, ``OMP_WAIT_POLICY=PASSIVE``, made each explanation 15-20 ms slower.)

So explanations are slower under a full prediction load (by design: predictions first), never
starved (each still gets its share), and as fast as ever when predictions are not running.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from collections.abc import Callable

_SIZE = ctypes.sizeof(ctypes.c_int64)


class PredictionLoad:
    """A count of predictions in flight, in memory shared with child processes.

    The worker creates it (`PredictionLoad()`), counts with `enter`/`leave` on its event loop
    thread, and passes `fd` to the explanation process (``pass_fds``), which opens the same
    count with `PredictionLoad.attach(fd)`. Where ``memfd_create`` is missing (not Linux) the
    count is private to the process, and explanations are not paced.
    """

    def __init__(self, fd: int | None = None) -> None:
        if fd is None and hasattr(os, "memfd_create"):
            fd = os.memfd_create("oncoflow-prediction-load")
            os.ftruncate(fd, _SIZE)
        self.fd = fd
        self._memory = mmap.mmap(-1 if fd is None else fd, _SIZE)
        self._count = ctypes.c_int64.from_buffer(self._memory)

    @classmethod
    def attach(cls, fd: int) -> PredictionLoad:
        """The count another process created and passed down as `fd`."""
        return cls(fd)

    @property
    def shared(self) -> bool:
        """Whether child processes can read this count."""
        return self.fd is not None

    @property
    def in_flight(self) -> int:
        return int(self._count.value)

    def enter(self) -> None:
        """A prediction was submitted (called on the worker's event loop thread only)."""
        self._count.value += 1

    def leave(self) -> None:
        """A prediction was answered, failed or cancelled."""
        self._count.value -= 1


class ExplanationPacer:
    """While predictions are in flight, explanations use at most `share` CPU-seconds a second.

    Call `wait_turn()` before each explanation and `done(cpu_s, wall_s)` after it. `share`
    1.0 turns pacing off.
    """

    def __init__(
        self,
        load: PredictionLoad,
        share: float,
        *,
        poll_s: float = 0.005,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not 0.0 < share <= 1.0:
            raise ValueError(f"share must lie in (0, 1], got {share}")
        self.load = load
        self.share = share
        self.poll_s = poll_s
        self._clock = clock
        self._sleep = sleep
        self._resume_at = 0.0

    def wait_turn(self) -> float:
        """Wait while predictions are in flight and the last explanation's pause lasts; the
        seconds waited."""
        began = self._clock()
        while self.load.in_flight > 0 and self._clock() < self._resume_at:
            self._sleep(self.poll_s)
        return self._clock() - began

    def done(self, cpu_s: float, wall_s: float) -> None:
        """An explanation used `cpu_s` CPU-seconds in `wall_s`: while predictions run, the next
        starts `cpu_s / share` after this one began."""
        if self.share >= 1.0 or self.load.in_flight == 0:
            self._resume_at = 0.0
            return
        self._resume_at = self._clock() + max(0.0, cpu_s / self.share - wall_s)


__all__ = ["ExplanationPacer", "PredictionLoad"]
