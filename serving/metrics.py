"""The service's own Prometheus metrics (served on BentoML's /metrics)."""

from __future__ import annotations

import functools
from collections.abc import Callable


@functools.cache  # one per process: prometheus_client refuses a second registration
def batch_size_recorder() -> Callable[[float], None]:
    """Record each predict batch size in ``oncoflow_predict_batch_size``."""
    import prometheus_client  # after BentoML has set up multi-process metrics

    histogram = prometheus_client.Histogram(
        "oncoflow_predict_batch_size",
        "Rows per model call of POST /predict and /predict_tabular (micro-batching)",
        buckets=(1, 2, 4, 8, 16, 32, 64, 128),
    )
    return histogram.observe
