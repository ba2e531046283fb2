"""Federated rounds reach MLflow and Prefect as they end, not after the run.

`RoundWatcher` is a thread that tails the coordinator's files of a running federation
(`ledger.jsonl`, `run_state.json`; see `components.federated.status`) while the round driver
runs. For each new round it calls `on_round(row)`; when a round in progress reports failing
sites, `on_progress(current)`. `LiveMlflow` is the pair of callbacks the pipeline uses: the
round's metrics into the MLflow run opened before training (`step` = round, the round's real
end time as timestamp), tags naming the failing sites with their sanitised reasons, and one
Prefect markdown artifact per round.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from components.federated.checkpoint import LEDGER, read_ledger
from components.federated.status import RUN_STATE, read_status

log = logging.getLogger(__name__)

TAG_STATUS = "federation.status"
TAG_FAILED_SITES = "federation.failed_sites"
TAG_ROUNDS_DONE = "federation.rounds_done"
TAG_REASON = "federation.reason"
TAG_SITE = "federation.site."  # + site name: "<status>" or "<status> (<category>: <message>)"


class RoundWatcher:
    """Polls `out_dir` every `poll_s` seconds in a thread; use as a context manager.

    Callbacks run in the watcher's thread with the starting thread's context variables (so
    Prefect artifacts attach to the running task). A callback that raises is retried at the
    next poll, at most `attempts` times per round, and never stops the training."""

    def __init__(
        self,
        out_dir: str | Path,
        on_round: Callable[[dict[str, Any]], None],
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        *,
        poll_s: float = 0.5,
        attempts: int = 3,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.on_round = on_round
        self.on_progress = on_progress
        self.poll_s = float(poll_s)
        self.attempts = int(attempts)
        self.logged: list[int] = []  # rounds handed to on_round successfully, in order
        self._tries: dict[int, int] = {}
        self._progress_seen: Any = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> RoundWatcher:
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._loop,), name="round-watcher", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> list[int]:
        """Stop the thread, hand over what is left (in this thread), return the rounds done."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(30.0, 10 * self.poll_s))
        self.poll()
        return list(self.logged)

    def __enter__(self) -> RoundWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()

    def poll(self) -> None:
        """Hand every round not yet handed over to `on_round`; report new in-round failures."""
        with self._lock:
            for row in read_ledger(self.out_dir / LEDGER):
                number = int(row["round"])
                if number in self.logged or self._tries.get(number, 0) >= self.attempts:
                    continue
                try:
                    self.on_round(row)
                except Exception as exc:  # MLflow or Prefect hiccup: retry at the next poll
                    self._tries[number] = self._tries.get(number, 0) + 1
                    log.warning("could not record round %d live: %s", number, exc)
                    continue
                self.logged.append(number)
            if self.on_progress is not None and (self.out_dir / RUN_STATE).is_file():
                self._progress()

    def _progress(self) -> None:
        current = read_status(self.out_dir).current
        if not current or not current.get("failures") or current == self._progress_seen:
            return
        try:
            self.on_progress(current)  # type: ignore[misc]
        except Exception as exc:
            log.warning("could not record round %s progress live: %s", current.get("round"), exc)
            return
        self._progress_seen = current


def site_tag(values: dict[str, Any]) -> str:
    """`status` or `status (category: message)` of one site's row."""
    status = str(values.get("status", "unknown"))
    reason = values.get("reason") or (
        {"category": values["category"], "message": values["message"]}
        if values.get("category")
        else None
    )
    return f"{status} ({reason['category']}: {reason['message']})" if reason else status


def round_tags(row: dict[str, Any], state: str = "running") -> dict[str, str]:
    """The run tags after a round: state, rounds done, failing sites, each site's status."""
    failed = [f["site"] for f in row.get("failures", [])]
    tags = {
        TAG_STATUS: state,
        TAG_ROUNDS_DONE: str(row["round"]),
        TAG_FAILED_SITES: ",".join(failed) if failed else "none",
    }
    tags |= {f"{TAG_SITE}{site}": site_tag(values) for site, values in row["sites"].items()}
    return tags


def progress_tags(current: dict[str, Any]) -> dict[str, str]:
    """Tags for the failures of the round in progress (before the round ends)."""
    failures = current.get("failures", [])
    tags = {TAG_FAILED_SITES: ",".join(f["site"] for f in failures) or "none"}
    tags |= {f"{TAG_SITE}{f['site']}": site_tag(f) for f in failures}
    return tags


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value).replace("|", "/")


def round_markdown(row: dict[str, Any]) -> str:
    """One round as a markdown table: server metrics, then one line per site."""
    server = row.get("server", {})
    privacy = row.get("privacy") or {}
    site_eps = privacy.get("site_epsilon", {})
    lines = [
        f"# Federated round {row['round']}",
        "",
        f"accepted {row.get('accepted', 0)}, rejected {row.get('rejected', 0)}, "
        f"failed {row.get('failed', 0)}; {row.get('round_seconds', 0.0):.1f}s",
        "",
        "| server metric | value |",
        "|---|---|",
        *(f"| {k} | {_cell(v)} |" for k, v in server.items() if isinstance(v, int | float)),
    ]
    if "epsilon" in privacy:
        lines.append(f"| ε (central DP) | {_cell(privacy['epsilon'])} |")
    lines += [
        "",
        "| site | status | examples | train loss | val macro-F1 | ε | reason |",
        "|---|---|---|---|---|---|---|",
    ]
    for site, values in sorted(row.get("sites", {}).items()):
        reason = values.get("reason") or {}
        why = f"{reason['category']}: {reason['message']}" if reason else ""
        eps = site_eps.get(site, values.get("dp_epsilon"))
        cells = [
            site,
            values.get("status"),
            values.get("num_examples"),
            values.get("train_loss"),
            values.get("val_macro_f1"),
            eps,
            why,
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


class LiveMlflow:
    """The watcher's callbacks for one MLflow run (and the Prefect artifacts of its task)."""

    def __init__(self, client: Any, run_id: str, artifacts: bool = True) -> None:
        self.client = client
        self.run_id = run_id
        self.artifacts = artifacts

    def on_round(self, row: dict[str, Any]) -> None:
        from components.federated.result import round_metrics

        self.client.log_round(
            self.run_id,
            round_metrics(row),
            step=int(row["round"]),
            timestamp=row.get("ended_at"),
            tags=round_tags(row),
        )
        if self.artifacts:
            from flows import artifacts

            artifacts.markdown(f"federated-round-{int(row['round'])}", round_markdown(row))

    def on_progress(self, current: dict[str, Any]) -> None:
        self.client.set_tags(self.run_id, progress_tags(current))

    def finish(self, out_dir: str | Path, *, failed: bool = False) -> str:
        """Tag the run with the federation's final state (and why, if it did not complete);
        with `failed` (the federation raised), the state is `failed` whatever was recorded."""
        if not Path(out_dir).exists():  # it failed before the round driver started
            self.client.set_tags(self.run_id, {TAG_STATUS: "failed"})
            return "failed"
        status = read_status(out_dir)
        state = "failed" if failed and status.state != "stalled" else status.state
        tags = {TAG_STATUS: state, TAG_ROUNDS_DONE: str(status.rounds_done)}
        if status.reason:
            tags[TAG_REASON] = f"{status.reason['category']}: {status.reason['message']}"
        self.client.set_tags(self.run_id, tags)
        return state


@contextlib.contextmanager
def live_federation(
    client: Any, run_id: str, out_dir: str | Path, *, artifacts: bool = True, poll_s: float = 0.5
) -> Iterator[RoundWatcher]:
    """While the body runs the federation, its rounds go to MLflow run `run_id` as they end.

    On the way out the last rounds are handed over and the run is tagged with the final state;
    if the body raises, the run is also closed as FAILED (the exception propagates)."""
    live = LiveMlflow(client, run_id, artifacts)
    watcher = RoundWatcher(out_dir, live.on_round, live.on_progress, poll_s=poll_s).start()
    try:
        yield watcher
    except BaseException:
        watcher.stop()
        with contextlib.suppress(Exception):
            live.finish(out_dir, failed=True)
        with contextlib.suppress(Exception):
            client.end_run(run_id, "FAILED")
        raise
    watcher.stop()
    live.finish(out_dir)


def failure_reason(out_dir: str | Path) -> str | None:
    """The sanitised reason the round driver recorded for a failed run, or None."""
    if not Path(out_dir).exists():
        return None
    status = read_status(out_dir)
    if status.state in ("failed", "stalled") and status.reason:
        return f"{status.reason['category']}: {status.reason['message']}"
    return None


__all__ = [
    "TAG_FAILED_SITES",
    "TAG_REASON",
    "TAG_SITE",
    "TAG_STATUS",
    "LiveMlflow",
    "RoundWatcher",
    "failure_reason",
    "live_federation",
    "progress_tags",
    "round_markdown",
    "round_tags",
]
