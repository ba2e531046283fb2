"""Process-wide tuning the service applies once at start-up: logging, thread switching, torch."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys

from components.config import ServingConf
from serving.middleware import DropRecords, RedactValidationErrors
from serving.settings import request_limit_bytes
from serving.uploads import keep_uploads_in_memory

#: BentoML loggers that may print a request-validation error (with the offending input).
_VALIDATION_LOGGERS = ("bentoml._internal.server.http_app", "_bentoml_impl.server.app", "bentoml")


def configure_process(settings: ServingConf) -> None:
    """Our log lines in, BentoML's path-bearing access log out; the thread switch interval and
    torch's intra-op threads from `settings`."""
    logging.getLogger("serving").setLevel(logging.INFO)
    logging.getLogger("components").setLevel(logging.INFO)
    access = logging.getLogger("bentoml.access")
    if not any(isinstance(f, DropRecords) for f in access.filters):
        access.addFilter(DropRecords())  # RequestLog writes the access log, without paths
    for name in _VALIDATION_LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(f, RedactValidationErrors) for f in target.filters):
            target.addFilter(RedactValidationErrors())
    # The model thread releases the GIL inside each torch operator and must win it back
    # between operators; with Python's default 5 ms switch interval a busy event loop can keep
    # it waiting that long each time. Compare with
    # `ONCOFLOW_GIL_SWITCH_US=5000 python bench/serve_throughput.py`.
    sys.setswitchinterval(settings.gil_switch_us / 1e6)
    keep_uploads_in_memory(request_limit_bytes(settings))
    single_threaded_blas()
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)


#: Niceness of the explanation process (`serving.explainer`; predictions run at the server's):
#: the lowest priority, so that explanations take only the CPU predictions leave.
EXPLAIN_NICENESS = 19


def lowest_cpu_priority(niceness: int = EXPLAIN_NICENESS) -> None:
    """This thread, and the threads it starts from now on, at `niceness` and, on Linux, in the
    ``SCHED_IDLE`` class: a woken prediction thread preempts them at once, where a nice-19
    thread of the normal class may finish its time slice first."""
    os.setpriority(os.PRIO_PROCESS, 0, niceness)
    with contextlib.suppress(AttributeError, OSError):  # not Linux: niceness alone
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def single_threaded_blas() -> None:
    """numpy's BLAS (OpenBLAS) on one thread in this process. Its helper threads spin for a
    while after each call before they sleep: after every prediction batch (the OOD score's
    matrix products) that kept a core busy, taken from the explanation process and the next
    batch alike, for products of a few hundred numbers that one thread does at once."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


def release_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc ``malloc_trim``; elsewhere a
    no-op). After an explanation: its large temporary arrays are freed but, without this, stay
    in the allocator's arenas and the worker's memory keeps the peak of the largest one."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def release_free_memory_every(seconds: float) -> None:
    """`release_free_memory` every `seconds` on a daemon thread: the request worker's batches
    and uploads free their buffers, but the heap would keep the high-water mark."""
    import threading
    import time

    def loop() -> None:
        while True:
            time.sleep(seconds)
            release_free_memory()

    threading.Thread(target=loop, name="oncoflow-trim", daemon=True).start()
