"""Start the diagnosis service (`oncoflow serve`): checks first, then ``bentoml serve``."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from components.config import ServingConf
from components.telemetry import quiet_environment
from serving.middleware import load_api_keys
from serving.settings import load_settings

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SERVICE = "serving.service:DiagnosisService"


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
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    return env


def preflight(env: dict[str, str]) -> ServingConf:
    """Check the settings, keys, the model and the case library (built with this model);
    return the settings, with the model tag resolved (``latest`` -> the version it names now)
    and the case library's path made absolute.

    `bentoml serve` respawns a worker whose start-up fails, so without this check a
    misconfigured server would crash-loop instead of exiting with the reason.
    """
    settings = load_settings(env)
    load_api_keys(env)
    from serving.packaging import use_bentoml_home

    if env.get("BENTOML_HOME"):
        use_bentoml_home(env["BENTOML_HOME"])
    from components.bundle import ModelBundle
    from serving.model_store import load_model_ref

    ref = load_model_ref(settings.model_tag)
    bundle = ModelBundle.load(ref.path)
    bundle.build_model()  # a worker would crash-loop on a broken one
    library = settings.case_library
    if library:
        from components.case_library import load_case_library

        library = str(Path(library).expanduser().resolve())
        load_case_library(library, bundle)  # refused unless built with this very model
    return dataclasses.replace(settings, model_tag=str(ref.tag), case_library=library or None)


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
    process = subprocess.Popen(serve_command(host, port), env=env, cwd=PROJECT_ROOT)
    previous = _forward_sigterm(process)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        try:
            return process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _forward_sigterm(process: subprocess.Popen):
    """Pass SIGTERM on to the server so it never outlives us; returns the old handler."""
    try:
        return signal.signal(signal.SIGTERM, lambda *_: process.terminate())
    except ValueError:  # not the main thread: leave signal handling alone
        return None
