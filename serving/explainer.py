"""Explanations in their own process, off the request worker's interpreter lock.

Grad-CAM, SHAP and the PDF report cost 100 ms or more of CPU each, much of it Python holding
the GIL (autograd's bookkeeping, PNG and PDF encoding). Run on threads of the request worker
they slowed every concurrent prediction (/predict p50 978 -> 1178 ms under a 32-client soak
with explanation clients). `ExplanationProcess` runs them in one child process instead
(``python -m serving.explainer``), which builds the served bundle's engine once, from the same
model directory, and answers over a socket pair:

- the child dies with the worker: the kernel kills it when the thread that started it ends
  (`serving.lifeline.die_with_parent`; that thread lives as long as the worker), and it exits
  when the socket closes;
- it runs at the lowest CPU priority (niceness `EXPLAIN_NICENESS`, Linux's ``SCHED_IDLE``
  class): when the cores are busy, predictions get them first; and while predictions are in
  flight it uses at most ``serving.explain_share_under_load`` CPU-seconds a second
  (`serving.prediction_load`), so that it does not crowd their caches and memory bandwidth
  either;
- it computes one explanation at a time on every core the server may use
  (``serving.explain_threads`` to use fewer): one explanation is a batch of some twenty
  images forward and backward that parallelises across cores, so the first of two queued
  finishes sooner than if the two shared the cores one each. The service admits up to
  ``serving.explain_concurrency`` at once (its middleware answers 429 beyond), the rest of them
  queue here;
- it hands freed memory back to the system (`release_free_memory`) once it has had nothing to
  do for `IDLE_TRIM_S`: after every explanation instead, the next one would pay to fault the
  same pages in again;
- a child that dies (killed, out of memory) fails the explanations it was computing with 503
  and is started again; after `max_restarts` deaths within `window_s`, or when it cannot load
  the model, explanations answer 503 with the reason while predictions go on.

Requests wait for a child that is still starting (up to `start_wait_s`, then 503). Nothing of a
request is logged: a failure is logged with its exception type and frames only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection, Pipe
from pathlib import Path
from typing import Any

from components.config import ServingConf
from components.errors import ModelError, OncoflowError
from serving.prediction_load import ExplanationPacer, PredictionLoad
from serving.process import (
    EXPLAIN_NICENESS,
    lowest_cpu_priority,
    release_free_memory,
    single_threaded_blas,
)

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = ("explain", "explain_tabular", "report")
IDLE_TRIM_S = 1.0  # the child trims its heap after this long without a request


@dataclass(frozen=True)
class ExplainerSpec:
    """What the child needs to build the same engine as the worker's."""

    model_dir: str
    ref: dict[str, Any]
    max_pixels: int
    optimise: bool
    torch_threads: int = 1  # torch threads of the one explanation computed at a time
    niceness: int = EXPLAIN_NICENESS
    share_under_load: float = 1.0  # CPU-seconds a second while predictions run (1: no pacing)
    # image-SHAP samples of an /explain naming none (None: the model's own)
    shap_nsamples: int | None = ServingConf.shap_nsamples

    @classmethod
    def of(cls, engine, settings) -> ExplainerSpec:
        """The spec for `engine` (loaded from its bundle directory) under `settings`."""
        if engine.model_dir is None:
            raise ModelError("the explanation process needs the engine's bundle directory")
        return cls(
            model_dir=str(engine.model_dir),
            ref=engine.ref.model_dump(),
            max_pixels=engine.max_pixels,
            optimise=engine.optimise,
            torch_threads=settings.explain_threads or len(os.sched_getaffinity(0)),
            share_under_load=settings.explain_share_under_load,
            shap_nsamples=settings.shap_nsamples,
        )


def _unavailable(message: str) -> OncoflowError:
    from serving.api_errors import Overloaded

    return Overloaded(message)


class ExplanationProcess:
    """The worker's handle on its explanation process: `start`, then ``await call(op, ...)``."""

    def __init__(
        self,
        spec: ExplainerSpec,
        *,
        load: PredictionLoad | None = None,
        max_restarts: int = 5,
        window_s: float = 300.0,
        start_wait_s: float = 90.0,
    ) -> None:
        self.spec = spec
        self.load = load  # the worker's predictions in flight: the child paces itself by it
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.start_wait_s = start_wait_s
        self.error: str | None = None  # set when explanations are off for good
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self._ids = itertools.count()
        self._lock = threading.Lock()  # _conn and _pending
        self._send_lock = threading.Lock()
        self._conn: Connection | None = None
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._ready = threading.Event()
        self._closing = False
        self._crashes: list[float] = []

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> ExplanationProcess:
        """Start the child in the background (the owner thread restarts it when it dies)."""
        threading.Thread(target=self._own, name="oncoflow-explainer", daemon=True).start()
        return self

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def close(self) -> None:
        """Stop the child (its pending explanations fail with 503)."""
        self._closing = True
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()

    def _own(self) -> None:
        """The owner thread: start the child, read its answers, start it again when it dies.
        It never returns while the worker serves, so the child's parent-death signal (tied to
        the thread that forked it) fires only when the worker itself dies."""
        while not self._closing:
            try:
                self._serve_child()
            except _LoadFailed as exc:
                self._give_up(
                    "explanations are off on this server: the explanation process could not "
                    f"load the model ({exc})"
                )
                return
            except Exception as exc:  # logged by type and frames, then restarted
                log.error(
                    "the explanation process failed: %s\n%s",
                    type(exc).__name__,
                    "".join(traceback.format_tb(exc.__traceback__)),
                )
            self._fail_pending("the explanation process stopped while computing this; retry")
            if self._closing:
                return
            now = time.monotonic()
            self._crashes = [t for t in self._crashes if now - t < self.window_s] + [now]
            if len(self._crashes) > self.max_restarts:
                self._give_up(
                    f"explanations are off on this server: the explanation process died "
                    f"{len(self._crashes)} times in {self.window_s:.0f} s (see the server log)"
                )
                return
            log.warning("restarting the explanation process")
            time.sleep(1.0)

    def _serve_child(self) -> None:
        parent_end, child_end = Pipe(duplex=True)
        fd = child_end.fileno()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")])
        )
        # OpenMP threads spin a tenth as long as libgomp's default before they sleep: enough
        # between one operator and the next, while spinning after an explanation, or while a
        # preempted sibling holds a barrier, would count as CPU time that does no work (pacing)
        env["GOMP_SPINCOUNT"] = "30000"
        command = [sys.executable, "-m", "serving.explainer", str(os.getpid()), str(fd)]
        fds = (fd,)
        if self.load is not None and self.load.shared:
            command.append(str(self.load.fd))
            fds += (self.load.fd,)
        self.process = process = subprocess.Popen(command, pass_fds=fds, cwd=PROJECT_ROOT, env=env)
        self.starts += 1
        child_end.close()
        try:
            parent_end.send(asdict(self.spec))
            kind, detail = parent_end.recv()
            if kind != "ready":
                raise _LoadFailed(detail)
            with self._lock:
                self._conn = parent_end
            self._ready.set()
            log.info("explanation process %d ready", process.pid)
            while True:
                rid, ok, value = parent_end.recv()  # EOFError once the child is gone
                self._settle(rid, ok, value)
        except (EOFError, OSError):
            if not self._closing:
                code = process.poll()
                log.error(
                    "the explanation process %d exited (code %s)",
                    process.pid,
                    "running" if code is None else code,
                )
        finally:
            self._ready.clear()
            with self._lock:
                self._conn = None
            parent_end.close()
            if process.poll() is None:
                process.kill()
            process.wait()

    def _give_up(self, reason: str) -> None:
        log.error("%s", reason)
        self.error = reason
        self._fail_pending(reason)

    def _fail_pending(self, message: str) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for rid in list(pending):
            self._settle_entry(pending[rid], False, _unavailable(message))

    def _settle(self, rid: int, ok: bool, value: Any) -> None:
        with self._lock:
            entry = self._pending.pop(rid, None)
        if entry is not None:  # else its request was cancelled meanwhile
            self._settle_entry(entry, ok, value)

    @staticmethod
    def _settle_entry(entry, ok: bool, value: Any) -> None:
        loop, future = entry

        def settle() -> None:
            if not future.done():
                future.set_result(value) if ok else future.set_exception(value)

        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody waits for it
            loop.call_soon_threadsafe(settle)

    # -- requests ----------------------------------------------------------------------------
    async def call(self, op: str, **kwargs: Any) -> Any:
        """Run `op` (one of `OPERATIONS`) in the child with `kwargs`; its answer, or its
        `OncoflowError` raised here; 503 (`Overloaded`) when no child can answer."""
        import anyio

        if op not in OPERATIONS:
            raise ValueError(f"unknown explanation operation {op!r}")
        await self._wait_ready()
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            conn = self._conn
            if conn is None:
                raise _unavailable("the explanation process is restarting; retry in a moment")
            rid = next(self._ids)
            self._pending[rid] = (asyncio.get_running_loop(), future)
        try:
            try:  # off the event loop: an upload may be megabytes
                await anyio.to_thread.run_sync(self._send, conn, (rid, op, kwargs))
            except (OSError, ValueError):
                raise _unavailable(
                    "the explanation process is restarting; retry in a moment"
                ) from None
            return await future
        finally:
            with self._lock:
                self._pending.pop(rid, None)

    def _send(self, conn: Connection, message: tuple) -> None:
        with self._send_lock:
            conn.send(message)

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_wait_s
        while not self._ready.is_set():
            if self.error:
                raise _unavailable(self.error)
            if time.monotonic() > deadline:
                raise _unavailable("explanations are still loading on this server; retry shortly")
            await asyncio.sleep(0.05)


class _LoadFailed(Exception):
    """The child could not build the engine (no point in starting it again)."""


# ------------------------------------------------------------------------------ the child


def _run(engine, op: str, kwargs: dict[str, Any]) -> Any:
    if op == "explain":
        image, clinical = kwargs.pop("image"), kwargs.pop("clinical", None)
        return engine.explain(engine.prepare(image, clinical), **kwargs)
    if op == "report":
        image, clinical = kwargs.pop("image"), kwargs.pop("clinical", None)
        return engine.report(engine.prepare(image, clinical), **kwargs)
    if op == "explain_tabular":
        return engine.explain(engine.prepare_record(kwargs.get("clinical")), **_only(kwargs))
    raise ModelError(f"unknown explanation operation {op!r}")


def _only(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k != "clinical"}


def _sendable(exc: BaseException) -> OncoflowError:
    """`exc` as the error the worker raises: an `OncoflowError` as is (its message is written
    for the client), anything else as a generic 500 (logged here by type and frames)."""
    import pickle

    if isinstance(exc, OncoflowError):
        with contextlib.suppress(Exception):  # one that does not survive pickling: a 500
            pickle.loads(pickle.dumps(exc))
            return exc
    log.error(
        "explanation failed: %s\n%s",
        type(exc).__name__,
        "".join(traceback.format_tb(exc.__traceback__)),
    )
    return ModelError(
        f"the explanation failed on the server ({type(exc).__name__}; see the server log)"
    )


def _warm(engine) -> None:
    """Explanation imports, copy and base values, then one explanation and one report of a
    noise image, so no request pays for a first call (image models without a record only)."""
    import io

    import numpy as np
    from PIL import Image

    engine.warm_up(explainers=True)
    if engine.kind != "image":
        return
    side = max(engine.bundle.preprocessing.size, engine.min_side)
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    case = engine.prepare(buffer.getvalue())
    engine.explain(case)
    engine.report(case)


def child_main(parent: int, fd: int, load_fd: int | None = None) -> None:
    """The explanation process: build the engine the spec names, then answer requests
    (paced by the worker's predictions in flight, shared as `load_fd`, when given)."""
    from serving.lifeline import die_with_parent

    die_with_parent(parent)
    conn = Connection(fd)
    spec = ExplainerSpec(**conn.recv())
    lowest_cpu_priority(spec.niceness)  # threads started from here inherit it
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s explainer %(levelname)s %(name)s: %(message)s"
    )
    try:
        import torch

        from serving.engine import DiagnosisEngine
        from serving.schemas import ModelRef

        torch.set_num_threads(spec.torch_threads)
        single_threaded_blas()  # torch's threads do the heavy work; numpy's would spin
        engine = DiagnosisEngine.from_dir(
            spec.model_dir,
            ModelRef(**spec.ref),
            spec.max_pixels,
            spec.optimise,
            shap_nsamples=spec.shap_nsamples,
        )
        _warm(engine)
        release_free_memory()
    except Exception as exc:  # reported to the worker, which stops explaining
        log.error(
            "loading the model failed: %s\n%s",
            type(exc).__name__,
            "".join(traceback.format_tb(exc.__traceback__)),
        )
        conn.send(("failed", type(exc).__name__))
        return
    conn.send(("ready", None))
    requests: queue.Queue = queue.Queue()
    threading.Thread(target=_receive, args=(conn, requests), name="receive", daemon=True).start()
    load = PredictionLoad.attach(load_fd) if load_fd is not None else PredictionLoad()
    pacer = ExplanationPacer(load, spec.share_under_load)
    _compute(engine, conn, requests, pacer)  # on the main thread, whose torch settings were made


def _receive(conn: Connection, requests: queue.Queue) -> None:
    """Queue the worker's requests; exit the process when the worker closes its end."""
    while True:
        try:
            requests.put(conn.recv())
        except (EOFError, OSError):
            os._exit(0)


def _compute(engine, conn: Connection, requests: queue.Queue, pacer: ExplanationPacer) -> None:
    """Answer `requests` one at a time, each when `pacer` gives its turn; trim the heap once
    idle for `IDLE_TRIM_S`."""
    trimmed = True
    while True:
        try:
            rid, op, kwargs = requests.get(timeout=IDLE_TRIM_S)
        except queue.Empty:
            if not trimmed:
                release_free_memory()
                trimmed = True
            continue
        trimmed = False
        pacer.wait_turn()
        began, began_cpu = time.monotonic(), time.process_time()
        try:
            reply = (rid, True, _run(engine, op, kwargs))
        except BaseException as exc:  # every failure goes back to the worker
            reply = (rid, False, _sendable(exc))
        pacer.done(time.process_time() - began_cpu, time.monotonic() - began)
        try:
            conn.send(reply)
        except OSError:  # the worker is gone: so is this process, shortly
            os._exit(0)


if __name__ == "__main__":
    child_main(*(int(arg) for arg in sys.argv[1:4]))
