"""Start the diagnosis service (`oncoflow serve`): checks first, then ``bentoml serve``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from components.config import ServingConf
from components.telemetry import quiet_environment
from serving.middleware import load_api_keys
from serving.settings import load_settings

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SERVICE = "serving.service:DiagnosisService"
#: The file a worker that cannot start writes its error to (set by `serve` for its server).
STARTUP_REPORT = "ONCOFLOW_STARTUP_REPORT"


def serve_command(host: str, port: int) -> list[str]:
    """The ``bentoml serve`` command line for the diagnosis service."""
    exe = Path(sys.executable).with_name("bentoml")
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "bentoml"]
    return [
        *cli,
        "serve",
        SERVICE,
        "--working-dir",
        str(PROJECT_ROOT),
        "--host",
        host,
        "--port",
        str(int(port)),
    ]


def serve_env(
    model_tag: str | None,
    bentoml_home: str | os.PathLike | None = None,
    base: dict[str, str] | None = None,
    case_library: str | os.PathLike | None = None,
) -> dict[str, str]:
    """Environment for the server process (model tag, Bento home, the site's case library,
    telemetry off)."""
    env = dict(os.environ if base is None else base)
    if model_tag:
        env["ONCOFLOW_MODEL_TAG"] = model_tag
    if case_library is not None:
        env["ONCOFLOW_CASE_LIBRARY"] = str(Path(case_library).expanduser().resolve())
    if bentoml_home is not None:
        env["BENTOML_HOME"] = str(Path(bentoml_home).expanduser().resolve())
    quiet_environment(env)
    # glibc's default of 8 malloc arenas a core lets a threaded server's heap fragment into
    # several idle copies of its peak; 2 keeps the worker's memory near its working set
    env.setdefault("MALLOC_ARENA_MAX", "2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    return env


def preflight(env: dict[str, str]) -> ServingConf:
    """Check the settings, the keys and that the model exists; return the settings with the
    model tag resolved (``latest`` -> the version it names now) and the case library's path
    made absolute. Quick (no torch): the worker checks the rest (the model builds, the case
    library fits it) and reports a failure through `report_startup_failure`."""
    settings = load_settings(env)
    load_api_keys(env)
    from serving.packaging import use_bentoml_home

    if env.get("BENTOML_HOME"):
        use_bentoml_home(env["BENTOML_HOME"])
    from serving.model_store import load_model_ref

    ref = load_model_ref(settings.model_tag)
    library = settings.case_library
    library = str(Path(library).expanduser().resolve()) if library else None
    return dataclasses.replace(settings, model_tag=str(ref.tag), case_library=library)


def report_startup_failure(exc: BaseException, environ: dict | None = None) -> None:
    """In a worker whose service cannot start: write `exc` where `serve` looks for it.

    A worker that fails to start is restarted, so without this report a broken model would
    crash-loop instead of stopping the server with the reason. (The launcher once built the
    model itself to find out: a second torch import, seconds of CPU beside the starting server,
    and half a gigabyte it kept for the server's whole life.)"""
    path = (os.environ if environ is None else environ).get(STARTUP_REPORT)
    if not path:
        return
    with contextlib.suppress(OSError):
        Path(path).write_text(json.dumps({"type": type(exc).__name__, "message": str(exc)}))


def startup_failure(path: Path) -> Exception | None:
    """The error a worker reported at `path` (its own type when it is an oncoflow error)."""
    from components import errors
    from components.errors import ModelError, OncoflowError

    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    kind = getattr(errors, str(report.get("type")), None)
    message = str(report.get("message"))
    if isinstance(kind, type) and issubclass(kind, OncoflowError):
        return kind(message)
    return ModelError(f"the server could not load the model: {report.get('type')}: {message}")


def serve(
    model_tag: str | None = None,
    host: str | None = None,
    port: int | None = None,
    bentoml_home: str | os.PathLike | None = None,
    case_library: str | os.PathLike | None = None,
) -> int:
    """Run the service in the foreground until interrupted; return the server's exit code.

    `host` and `port` default to ``serving.host`` / ``serving.port``; `case_library` (default
    ``serving.case_library``) is the site-local library `/similar` answers from."""
    env = serve_env(model_tag, bentoml_home, case_library=case_library)
    settings = preflight(env)
    tag = settings.model_tag
    host = settings.host if host is None else host
    port = settings.port if port is None else port
    env["ONCOFLOW_MODEL_TAG"] = tag  # pin the resolved version: `latest` may move meanwhile
    if settings.case_library:
        env["ONCOFLOW_CASE_LIBRARY"] = settings.case_library
    log.info(
        "serving %s on http://%s:%d (similar cases: %s)",
        tag,
        host,
        port,
        "site-local case library" if settings.case_library else "no case library",
    )
    private = Path(tempfile.mkdtemp(prefix="oncoflow-serve-"))
    report = private / "startup-failure.json"
    env[STARTUP_REPORT] = str(report)
    supervisor = Supervisor(guarded(serve_command(host, port)), env)
    done = threading.Event()

    def watch() -> None:  # a worker that cannot start stops the server with its reason
        while not done.wait(0.2):
            if report.exists():
                supervisor.stop()
                return

    threading.Thread(target=watch, name="oncoflow-startup-watch", daemon=True).start()
    try:
        code = supervisor.run()
        done.set()
        failure = startup_failure(report)
    finally:
        shutil.rmtree(private, ignore_errors=True)
    if failure is not None:
        raise failure
    return code


def guarded(command: list[str]) -> list[str]:
    """`command` run so that it dies with this process (`serving.lifeline`)."""
    return [sys.executable, "-m", "serving.lifeline", str(os.getpid()), "--", *command]


class Supervisor:
    """Runs ``bentoml serve`` and restarts it when it or its worker dies.

    BentoML's arbiter respawns a dead worker itself, but keeps the port open meanwhile: clients
    would wait in the listen queue for the whole start-up. Here a dead worker takes the arbiter
    down at once (its waiting clients get a reset, new ones "connection refused") and the server
    starts again; more than `max_restarts` crashes within `window_s` and it gives up.
    SIGTERM/SIGINT stop the server gracefully; the server dies with this process anyway
    (`serving.lifeline`).
    """

    def __init__(
        self,
        command: list[str],
        env: dict[str, str],
        max_restarts: int = 5,
        window_s: float = 300.0,
        poll_s: float = 0.2,
        scan_s: float = 1.0,
    ) -> None:
        self.command = command
        self.env = env
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.poll_s = poll_s  # how often the known workers are checked
        self.scan_s = scan_s  # how often the server's process tree is searched for workers
        self.stopping = False
        self.stopping_since = 0.0
        self.stop_timeout_s = 30.0
        self.process: subprocess.Popen | None = None
        self.crashes: list[float] = []

    def run(self) -> int:
        previous = self._handle_signals()
        try:
            while True:
                code = self._run_once()
                if self.stopping:
                    return code
                now = time.monotonic()
                self.crashes = [t for t in self.crashes if now - t < self.window_s] + [now]
                if len(self.crashes) > self.max_restarts:
                    log.error(
                        "the server crashed %d times in %.0f s; giving up",
                        len(self.crashes),
                        self.window_s,
                    )
                    return code or 1
                log.warning("restarting the server")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _run_once(self) -> int:
        """Start the server; return its exit code once it exits or its worker dies."""
        import psutil

        self.process = subprocess.Popen(
            self.command, env=self.env, cwd=PROJECT_ROOT, start_new_session=True
        )
        server = psutil.Process(self.process.pid)
        workers: dict[int, psutil.Process] = {}
        terminated = False
        scanned = -self.scan_s
        while (code := self.process.poll()) is None:
            if time.monotonic() - scanned >= self.scan_s:  # reads every process on the machine
                try:
                    current = {p.pid: p for p in server.children(recursive=True) if _is_worker(p)}
                except psutil.Error:
                    current = {}
                scanned = time.monotonic()
            else:  # cheap: each known worker's own /proc entry
                current = {pid: p for pid, p in workers.items() if _alive(p)}
            if not self.stopping and set(workers) - set(current):
                log.error("the server's worker died; stopping the server to restart it")
                self._kill(server, workers | current)
                return self.process.wait()
            if self.stopping and not terminated:
                self.process.terminate()  # graceful: the arbiter stops its worker
                terminated = True
            if self.stopping and time.monotonic() - self.stopping_since > self.stop_timeout_s:
                log.warning("the server did not stop in %.0f s; killing it", self.stop_timeout_s)
                self._kill(server, workers | current)
            workers = current
            time.sleep(self.poll_s)
        self._kill(server, workers)  # an arbiter gone: no worker of it stays
        return code

    def _kill(self, server, workers: dict) -> None:
        import psutil

        for process in [server, *workers.values()]:
            with contextlib.suppress(psutil.Error):
                process.kill()

    def stop(self) -> None:
        """Stop the server (gracefully, then killed after `stop_timeout_s`); any thread."""
        if not self.stopping:
            self.stopping, self.stopping_since = True, time.monotonic()

    def _handle_signals(self) -> dict:
        previous = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, lambda *_: self.stop())
        except ValueError:  # not the main thread: leave signal handling alone
            pass
        return previous


def _alive(process) -> bool:
    """Running and not a zombie (a killed worker stays one until the arbiter reaps it)."""
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _is_worker(process) -> bool:
    try:
        return "_bentoml_impl.worker.service" in process.cmdline()
    except Exception:  # gone meanwhile, or no access
        return False
