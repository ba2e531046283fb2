"""Start-up of the diagnosis service: time to ready and where it goes.

Starts ``oncoflow serve`` (`serving.launch.serve`, as bench/soak.py) `--starts` times with the
given model and, for each start, measures from launch: the seconds until ``/readyz`` answers
200 (the model loaded, checked and warm), when each process of the service started and the CPU
seconds it had used by then (launcher, BentoML's arbiter, the request worker, the explanation
process), the
worker's own account of its start-up (its log line: process start to service class, settings
and torch, model, warm-up), and the seconds until ``/explain`` answers too (its process loads
behind the ready model). The machine's load average before each start is printed with it:
on a shared machine, start-up is as slow as the cores are busy.

    BENTOML_HOME=... python bench/startup.py --model oncoflow-model:TAG --starts 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from soak import KEY, images, role, start_server  # noqa: E402

WORKER_LINE = re.compile(r"worker start-up .*")


def processes(server: subprocess.Popen) -> dict[str, dict[str, float]]:
    """Role -> CPU seconds (user + system) so far and when it started, in seconds after the
    launcher (process start times share one clock; psutil's is off from time.time() by up to a
    second), for the server process and its descendants."""
    out: dict[str, dict[str, float]] = {}
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(server.pid)
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                out[role(process)] = {
                    "started_s": round(process.create_time() - root.create_time(), 2),
                    "cpu_s": round(times.user + times.system, 2),
                }
    return out


def one_start(model: str, log: Path, explain: bool) -> dict:
    from components.net import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    load = os.getloadavg()
    began = time.monotonic()
    server = start_server(model, port, log, {"ONCOFLOW_CHAT": "1"})
    try:
        ready_s = None
        while time.monotonic() - began < 300:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with {server.returncode}; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    ready_s = time.monotonic() - began
                    break
            time.sleep(0.05)
        if ready_s is None:
            raise SystemExit("not ready in 300 s")
        at_ready = processes(server)
        explain_s = None
        if explain:
            picture = images(1)[0]
            while time.monotonic() - began < 300:
                answer = httpx.post(
                    base + "/explain",
                    files={"image": ("x.png", picture, "image/png")},
                    data={"shap": "false"},
                    headers={"Authorization": f"Bearer {KEY}"},
                    timeout=120,
                )
                if answer.status_code == 200:
                    explain_s = time.monotonic() - began
                    break
                time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    found = WORKER_LINE.findall(log.read_text(errors="replace"))
    return {
        "loadavg_before": [round(v, 2) for v in load],
        "ready_s": round(ready_s, 2),
        "explain_ready_s": round(explain_s, 2) if explain_s else None,
        "at_ready": at_ready,
        "worker": found[0] if found else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Bento model tag (BENTOML_HOME's store)")
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--no-explain", action="store_true", help="skip the /explain timing")
    parser.add_argument("--log", default="startup-server.log", help="the servers' output")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    runs = []
    for i in range(args.starts):
        log = Path(f"{args.log}.{i}")
        runs.append(one_start(args.model, log, not args.no_explain))
        print(json.dumps(runs[-1]), flush=True)
        time.sleep(3.0)  # the last server's processes gone, its port free
    result = {
        "model": args.model,
        "cpus": os.cpu_count(),
        "ready_s_median": statistics.median(r["ready_s"] for r in runs),
        "runs": runs,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
