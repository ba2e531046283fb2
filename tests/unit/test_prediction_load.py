"""Predictions first (serving.prediction_load): the count of predictions in flight is shared
with a child process, the batcher keeps it, and the pacer holds explanations to their share."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest

from serving.batching import MicroBatcher
from serving.prediction_load import ExplanationPacer, PredictionLoad


def read_in_child(load: PredictionLoad) -> int:
    """The count as a separate process sees it through the passed descriptor."""
    code = (
        "import sys; from serving.prediction_load import PredictionLoad; "
        "print(PredictionLoad.attach(int(sys.argv[1])).in_flight)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(load.fd)],
        pass_fds=(load.fd,),
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout)


def test_a_child_process_reads_the_workers_count():
    load = PredictionLoad()
    assert load.shared
    load.enter()
    load.enter()
    assert load.in_flight == 2 and read_in_child(load) == 2
    load.leave()
    assert read_in_child(load) == 1


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.on_sleep = lambda: None

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.on_sleep()


def pacer(share: float) -> tuple[ExplanationPacer, PredictionLoad, FakeTime]:
    load, fake = PredictionLoad(), FakeTime()
    return ExplanationPacer(load, share, clock=fake.clock, sleep=fake.sleep), load, fake


def test_under_load_an_explanation_waits_for_its_share():
    paced, load, _ = pacer(0.2)
    load.enter()
    assert paced.wait_turn() == 0  # the first one starts at once
    paced.done(0.1, 0.2)  # 0.1 CPU-s at 0.2 CPU-s a second: the next 0.5 s after its start
    assert paced.wait_turn() == pytest.approx(0.3, abs=0.006)


def test_without_predictions_nothing_waits():
    paced, load, _ = pacer(0.2)
    paced.done(0.1, 0.1)  # nothing in flight when it ended
    load.enter()
    assert paced.wait_turn() == 0
    paced.done(0.1, 0.1)
    load.leave()  # predictions stopped meanwhile
    assert paced.wait_turn() == 0


def test_the_wait_ends_when_predictions_stop():
    paced, load, fake = pacer(0.01)
    load.enter()
    paced.done(1.0, 1.0)  # 99 s due
    fake.on_sleep = lambda: load.leave() if fake.now > 102.0 and load.in_flight else None
    assert paced.wait_turn() == pytest.approx(2.0, abs=0.006)


def test_cpu_time_beyond_the_share_is_paid_for_and_share_one_turns_pacing_off():
    paced, load, _ = pacer(0.5)
    load.enter()
    paced.done(2.0, 2.0)  # one core for 2 s at half a core a second: 2 s more
    assert paced.wait_turn() == pytest.approx(2.0, abs=0.006)
    paced, load, _ = pacer(1.0)
    load.enter()
    paced.done(4.0, 2.0)  # two cores for 2 s: no pacing all the same
    assert paced.wait_turn() == 0


def test_the_batcher_counts_rows_from_submission_to_answer():
    load = PredictionLoad()
    seen: list[int] = []

    def infer(rows: np.ndarray) -> np.ndarray:
        seen.append(load.in_flight)
        if rows[0, 0] < 0:
            raise RuntimeError("model failed")
        return rows * 2

    async def run() -> None:
        batcher = MicroBatcher(infer, max_batch=8, load=load)
        rows = [np.full((1, 2), float(i)) for i in range(3)]
        outputs = await asyncio.gather(*(batcher.submit(r) for r in rows))
        assert [float(o[0]) for o in outputs] == [0.0, 2.0, 4.0]
        assert load.in_flight == 0
        with pytest.raises(RuntimeError, match="model failed"):
            await batcher.submit(np.full((1, 2), -1.0))
        assert load.in_flight == 0  # a failed prediction is no longer in flight
        batcher.close()

    asyncio.run(run())
    assert seen[0] == 3 and seen[-1] == 1  # all three were in flight during their batch


def test_a_bad_share_is_refused():
    for share in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="share must lie in"):
            ExplanationPacer(PredictionLoad(), share)
