"""In-process micro-batching: concurrent requests share one model call.

`MicroBatcher.submit` is awaited by request handlers on one asyncio event loop. Whenever the
model is free, every waiting row (up to `max_batch`) goes into the next call, which runs on a
dedicated thread so the event loop keeps accepting and preparing requests meanwhile. Nothing is
held back to wait for company: a lone request runs at once (batch of 1), and under load the
requests that arrive during one forward pass form the next batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from components.errors import OncoflowError
from serving.prediction_load import PredictionLoad

log = logging.getLogger(__name__)


class QueueFull(OncoflowError):
    """More rows are waiting than the batcher accepts; retry later."""

    http_status = 503


class MicroBatcher:
    """Run `infer` (rows (N, D) -> outputs (N, ...)) on batches of concurrently submitted rows.

    `on_batch(n)` is called with the size of every batch run (for metrics). At most
    `max_queue` rows may wait; `submit` refuses more with `QueueFull`. `load`, when given,
    counts the rows in flight (submitted, not yet answered) for the explanation process.
    """

    def __init__(
        self,
        infer: Callable[[np.ndarray], np.ndarray],
        max_batch: int = 32,
        max_queue: int = 1024,
        on_batch: Callable[[int], None] | None = None,
        load: PredictionLoad | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self.infer = infer
        self.max_batch = int(max_batch)
        self.max_queue = int(max_queue)
        self.on_batch = on_batch
        self.load = load
        self._waiting: list[tuple[np.ndarray, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oncoflow-batch")

    async def submit(self, row: np.ndarray) -> np.ndarray:
        """The output for one input row (shape (1, D)), computed in a batch with others."""
        if len(self._waiting) >= self.max_queue:
            raise QueueFull(f"{len(self._waiting)} predictions are waiting; retry in a moment")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((row, future))
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        if self.load is None:
            return await future
        self.load.enter()
        try:
            return await future
        finally:
            self.load.leave()

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            taken = self._waiting[: self.max_batch]
            del self._waiting[: self.max_batch]
            taken = [(row, future) for row, future in taken if not future.done()]  # cancelled
            if not taken:
                continue
            try:
                outputs = await loop.run_in_executor(
                    self._executor, self._run, [row for row, _ in taken]
                )
            except Exception as exc:  # every caller of this batch gets the error
                for _, future in taken:
                    if not future.done():
                        future.set_exception(exc)
                continue
            if self.on_batch is not None:
                try:
                    self.on_batch(len(taken))
                except Exception:  # metrics must never fail a prediction
                    log.exception("batch metrics failed")
            for (_, future), output in zip(taken, outputs, strict=True):
                if not future.done():
                    future.set_result(output)

    def _run(self, rows: list[np.ndarray]) -> np.ndarray:
        """One model call on the model thread (the rows are joined there, off the loop)."""
        outputs = self.infer(np.concatenate(rows))
        if len(outputs) != len(rows):
            raise RuntimeError(f"{len(outputs)} outputs for {len(rows)} inputs")
        return outputs

    def close(self) -> None:
        """Stop the model thread (after the batch it is running)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


__all__ = ["MicroBatcher", "QueueFull"]
