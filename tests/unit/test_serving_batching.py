"""In-process micro-batching: results per caller, batch sizes, errors, cancellation, limits."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from serving.batching import MicroBatcher, QueueFull


def rows_of(*values: float) -> list[np.ndarray]:
    return [np.array([[v, -v]], dtype=np.float32) for v in values]


class Model:
    """Doubles its input; optionally blocks until released, to let a queue form."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate
        self.batches: list[int] = []
        self.threads: set[str] = set()

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        if self.gate is not None:
            self.gate.wait(timeout=10)
        self.batches.append(len(rows))
        self.threads.add(threading.current_thread().name)
        return rows * 2.0


def test_each_caller_gets_its_own_row_back() -> None:
    model = Model()
    batcher = MicroBatcher(model, max_batch=8)

    async def main():
        return await asyncio.gather(*(batcher.submit(r) for r in rows_of(1, 2, 3, 4, 5)))

    results = asyncio.run(main())
    assert [r.tolist() for r in results] == [[2 * v, -2 * v] for v in (1, 2, 3, 4, 5)]
    assert sum(model.batches) == 5
    assert all(name.startswith("oncoflow-batch") for name in model.threads)  # off the loop
    batcher.close()


def test_requests_waiting_during_a_forward_pass_share_the_next_one() -> None:
    gate = threading.Event()
    model = Model(gate)
    seen: list[int] = []
    batcher = MicroBatcher(model, max_batch=4, on_batch=seen.append)

    async def main():
        first = asyncio.ensure_future(batcher.submit(rows_of(0)[0]))
        await asyncio.sleep(0.05)  # the lone request is running (blocked in the model)
        rest = [asyncio.ensure_future(batcher.submit(r)) for r in rows_of(1, 2, 3, 4, 5, 6)]
        await asyncio.sleep(0.05)
        gate.set()
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(main())
    assert first.tolist() == [0.0, -0.0]
    assert [r[0] for r in rest] == [2.0, 4.0, 6.0, 8.0, 10.0, 12.0]
    assert model.batches == [1, 4, 2]  # nobody waited for company; at most max_batch a call
    assert seen == [1, 4, 2]
    batcher.close()


def test_a_failing_model_call_fails_only_its_batch() -> None:
    calls = {"n": 0}

    def flaky(rows: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return rows

    batcher = MicroBatcher(flaky, max_batch=8)

    async def main():
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(rows_of(1)[0])
        return await batcher.submit(rows_of(2)[0])  # the batcher keeps working

    assert asyncio.run(main()).tolist() == [2.0, -2.0]
    batcher.close()


def test_wrong_output_count_is_an_error_not_a_mixup() -> None:
    batcher = MicroBatcher(lambda rows: rows[:1], max_batch=8)

    async def main():
        return await asyncio.gather(
            *(batcher.submit(r) for r in rows_of(1, 2)), return_exceptions=True
        )

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in results)
    batcher.close()


def test_cancelled_requests_are_not_run() -> None:
    gate = threading.Event()
    model = Model(gate)
    batcher = MicroBatcher(model, max_batch=8)

    async def main():
        running = asyncio.ensure_future(batcher.submit(rows_of(0)[0]))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(batcher.submit(rows_of(1)[0]))
        kept = asyncio.ensure_future(batcher.submit(rows_of(2)[0]))
        await asyncio.sleep(0.01)
        gone.cancel()  # the client went away while waiting
        gate.set()
        return await running, await kept

    _, kept = asyncio.run(main())
    assert kept.tolist() == [4.0, -4.0]
    assert model.batches == [1, 1]
    batcher.close()


def test_a_full_queue_answers_503() -> None:
    gate = threading.Event()
    batcher = MicroBatcher(Model(gate), max_batch=1, max_queue=2)

    async def main():
        running = asyncio.ensure_future(batcher.submit(rows_of(0)[0]))
        await asyncio.sleep(0.05)
        waiting = [asyncio.ensure_future(batcher.submit(r)) for r in rows_of(1, 2)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull) as refused:
            await batcher.submit(rows_of(3)[0])
        gate.set()
        await asyncio.gather(running, *waiting)
        return refused.value

    refused = asyncio.run(main())
    assert refused.http_status == 503
    batcher.close()


@pytest.mark.parametrize("max_batch, max_queue", [(0, 8), (8, 0)])
def test_limits_must_be_positive(max_batch: int, max_queue: int) -> None:
    with pytest.raises(ValueError):
        MicroBatcher(lambda rows: rows, max_batch=max_batch, max_queue=max_queue)
