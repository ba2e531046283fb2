"""Soak the diagnosis service: N clients for a while; worker memory, errors and latency.

Starts ``oncoflow serve`` (`serving.launch.serve`) on a free port with the given model, lets
`--clients` clients send ``POST /predict`` back to back (a few distinct images) and, with
`--explain-clients`, others send ``POST /explain`` at the same time; samples the RSS of every
process of the service every few seconds: the launcher (``oncoflow serve``), BentoML's arbiter,
the request worker and its explanation process (`serving.explainer`). Prints one JSON summary:
each process's RSS at ready (before load), start, middle and end of the soak and its maximum
(and the sum over all of them), how many processes of each kind were seen (a restart shows as
two), answers by status, /predict and /explain latency percentiles and the request rate.

    BENTOML_HOME=... python bench/soak.py --model oncoflow-model:TAG               # 10 min
    BENTOML_HOME=... python bench/soak.py --model TAG --duration 120 --explain-clients 4

What concurrent explanations cost predictions (their number is capped by
serving.explain_concurrency; the rest are answered 429 at once): `--alternate 30` turns the
explanation clients off and on every 30 s and reports /predict latency with them off and on,
and for each phase (phases of the same kind differ too: that is the noise to judge the
difference by), on the same server under the same background load (a shared machine's load
drifts between runs). `explanations_cost` compares each explaining phase with the mean of
the phases either side of it (a steady drift cancels) and gives the mean change with a 95 %
t-interval. With `--explain-clients 0` the two kinds of phase are alike: that run shows the
measurement's own noise. `--warmup 60` loads the server with predictions before measuring.

    BENTOML_HOME=... python bench/soak.py --model TAG --duration 480 --alternate 30 \
        --warmup 60 --explain-clients 4

The rate limit is switched off for the soak (``ONCOFLOW_RATE_LIMIT_PER_MINUTE=0``): all
clients share one key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

KEY = "soak-key"


def images(count: int = 8, size: int = 224) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 256, (size, size, 3), dtype="uint8")
        Image.fromarray(pixels).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


def start_server(model: str, port: int, log_path: Path, env_extra: dict[str, str]):
    from components.telemetry import TELEMETRY_OFF

    code = f"from serving.launch import serve; raise SystemExit(serve({model!r}, port={port}))"
    env = {
        **os.environ,
        **TELEMETRY_OFF,
        "ONCOFLOW_API_KEYS": KEY,
        "ONCOFLOW_RATE_LIMIT_PER_MINUTE": "0",
        **env_extra,
    }
    log = open(log_path, "wb")  # noqa: SIM115 - the server's whole life
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def role(process: psutil.Process) -> str:
    """What a process of the service is, from its command line."""
    command = " ".join(process.cmdline())
    if "_bentoml_impl.worker.service" in command:
        return "worker"
    if "serving.explainer" in command:
        return "explainer"
    if "serving.lifeline" in command or "bentoml" in command:
        return "arbiter"
    return "launcher" if "serving.launch" in command else process.name()


def service_rss(server: subprocess.Popen) -> dict[str, tuple[int, int]]:
    """Role -> (pid, RSS bytes) of the server process and all its descendants."""
    out: dict[str, tuple[int, int]] = {}
    try:
        root = psutil.Process(server.pid)
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                out[role(process)] = (process.pid, process.memory_info().rss)
    except psutil.Error:
        pass
    return out


def wait_ready(base: str, server: subprocess.Popen, timeout_s: float = 300) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server was not ready in time")


class Phases:
    """With `every_s`, explanations alternate: off for `every_s` seconds, on for as long, ...
    (None: always on). Predictions are told apart by the phase they were sent in."""

    def __init__(self, began: float, every_s: float | None) -> None:
        self.began, self.every_s = began, every_s

    def index(self) -> int:
        """The phase now: 0, 1, 2, ... (always 0 without alternation); odd ones explain."""
        if not self.every_s:
            return 0
        return int((time.monotonic() - self.began) / self.every_s)

    @staticmethod
    def explains(index: int) -> bool:
        """Whether phase `index` is one with the explanation clients on (the odd ones)."""
        return index % 2 == 1

    def explaining(self) -> bool:
        return not self.every_s or self.explains(self.index())

    async def wait_for_explaining(self, deadline: float) -> None:
        while not self.explaining() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)


async def client_loop(
    http, path, pictures, deadline, statuses, latencies, data=None, phases=None, explains=False
):
    """Requests back to back until `deadline`; latencies[phase] gets each 200's seconds
    (phase: the `Phases.index` it was sent in)."""
    i = 0
    while time.monotonic() < deadline:
        if explains and phases is not None:
            await phases.wait_for_explaining(deadline)
            if time.monotonic() >= deadline:
                break
        picture = pictures[i % len(pictures)]
        i += 1
        phase = phases.index() if phases is not None else 0
        began = time.perf_counter()
        try:
            response = await http.post(
                path, files={"image": ("x.png", picture, "image/png")}, data=data
            )
            statuses[(path, response.status_code)] += 1
            if response.status_code == 200:
                latencies[phase].append(time.perf_counter() - began)
            elif response.status_code == 429:
                await asyncio.sleep(float(response.headers.get("retry-after", "1")))
        except httpx.HTTPError as exc:
            statuses[(path, type(exc).__name__)] += 1
            await asyncio.sleep(0.5)


async def sample_rss(server, samples, deadline, every_s):
    while time.monotonic() < deadline:
        samples.append(await asyncio.to_thread(service_rss, server))
        await asyncio.sleep(every_s)


async def soak(base, server, args) -> dict:
    pictures = images()
    statuses: Counter = Counter()
    predict_s: defaultdict[int, list[float]] = defaultdict(list)
    explain_s: defaultdict[int, list[float]] = defaultdict(list)
    samples: list[dict[str, tuple[int, int]]] = []
    limits = httpx.Limits(max_connections=args.clients + args.explain_clients + 4)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(
        base_url=base, headers=headers, timeout=120, limits=limits
    ) as http:
        if args.warmup:  # predictions only, not counted: a fresh server speeds up at first
            until = time.monotonic() + args.warmup
            unused: defaultdict[int, list[float]] = defaultdict(list)
            await asyncio.gather(
                *(
                    client_loop(http, "/predict", pictures, until, Counter(), unused)
                    for _ in range(args.clients)
                )
            )
        began = time.monotonic()
        deadline = began + args.duration
        phases = Phases(began, args.alternate)
        tasks = [
            client_loop(http, "/predict", pictures, deadline, statuses, predict_s, None, phases)
            for _ in range(args.clients)
        ]
        explain = {"nsamples": str(args.nsamples)}
        tasks += [
            client_loop(
                http, "/explain", pictures, deadline, statuses, explain_s, explain, phases, True
            )
            for _ in range(args.explain_clients)
        ]
        tasks.append(sample_rss(server, samples, deadline, args.sample_every))
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - began
    out = {
        "elapsed_s": round(elapsed, 1),
        "statuses": dict(sorted((f"{path} {status}", n) for (path, status), n in statuses.items())),
        "predict": _latency(_joined(predict_s), elapsed),
        "explain": _latency(_joined(explain_s), elapsed),
        "rss_samples": samples,
    }
    if args.alternate:  # each phase took about half the time
        off = {i: v for i, v in predict_s.items() if not Phases.explains(i)}
        on = {i: v for i, v in predict_s.items() if Phases.explains(i)}
        out["predict_explanations_off"] = _latency(_joined(off), elapsed / 2)
        out["predict_explanations_on"] = _latency(_joined(on), elapsed / 2)
        # each phase on its own: how much phases of the same kind differ (the noise)
        out["predict_by_phase"] = [
            {"phase": i, "explaining": Phases.explains(i)}
            | _latency(predict_s[i], min(args.alternate, elapsed - i * args.alternate))
            for i in sorted(predict_s)
        ]
        out["explanations_cost"] = phase_effect(out["predict_by_phase"])
    return out


def phase_effect(phases: list[dict]) -> dict:
    """Each explaining phase against the mean of the phases before and after it (which cancels
    a steady drift, e.g. a server still warming up): the relative change of /predict throughput
    and p50, their mean over phases and a 95 % t-interval of that mean."""
    from scipy import stats

    by_index = {p["phase"]: p for p in phases if p.get("ok")}
    changes: dict[str, list[float]] = {"per_s": [], "p50_ms": []}
    for i, phase in by_index.items():
        if Phases.explains(i) and i - 1 in by_index and i + 1 in by_index:
            for key, values in changes.items():
                around = (by_index[i - 1][key] + by_index[i + 1][key]) / 2
                values.append(phase[key] / around - 1)
    out: dict = {"pairs": len(changes["per_s"])}
    for key, values in changes.items():
        if len(values) < 2:
            continue
        mean, sem = float(np.mean(values)), float(stats.sem(values))
        half = float(stats.t.ppf(0.975, len(values) - 1)) * sem
        out[key] = {
            "mean": round(mean, 4),
            "ci95": [round(mean - half, 4), round(mean + half, 4)],
            "each": [round(v, 4) for v in values],
        }
    return out


def _joined(by_phase: dict[int, list[float]]) -> list[float]:
    return [value for values in by_phase.values() for value in values]


def _latency(values: list[float], elapsed: float) -> dict:
    if not values:
        return {"ok": 0}
    ms = np.asarray(values) * 1000
    return {
        "ok": len(values),
        "per_s": round(len(values) / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
    }


def explain_ready(base: str, wanted: int, timeout_s: float = 300) -> None:
    """Wait until /explain answers (its process loads behind the ready model)."""
    if not wanted:
        return
    picture = images(1)[0]
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        response = httpx.post(
            base + "/explain",
            files={"image": ("x.png", picture, "image/png")},
            data={"shap": "false"},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=120,
        )
        if response.status_code == 200:
            return
        time.sleep(1.0)
    raise SystemExit("/explain did not answer in time")


def rss_table(ready: dict, samples: list[dict]) -> dict[str, dict]:
    """MB per process kind (and their sum): at ready, soak start, middle, end, and the max."""
    names = sorted({*ready, *(name for s in samples for name in s)})

    def mb(sample: dict, name: str | None) -> float | None:
        if name is None:
            return round(sum(rss for _, rss in sample.values()) / 2**20) if sample else None
        return round(sample[name][1] / 2**20) if name in sample else None

    table = {}
    for name in [*names, None]:
        series = [v for v in (mb(s, name) for s in samples) if v is not None]
        table[name or "all"] = {
            "ready": mb(ready, name),
            "start": series[0] if series else None,
            "middle": series[len(series) // 2] if series else None,
            "end": series[-1] if series else None,
            "max": max(series) if series else None,
        }
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Bento model tag (BENTOML_HOME's store)")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--clients", type=int, default=32, help="/predict clients")
    parser.add_argument("--explain-clients", type=int, default=0, help="/explain clients")
    parser.add_argument("--nsamples", type=int, default=32, help="SHAP samples per /explain")
    parser.add_argument("--sample-every", type=float, default=5.0, help="RSS sampling, s")
    parser.add_argument(
        "--alternate",
        type=float,
        help="explanation clients off and on in turns of this many seconds; /predict latency "
        "is reported for each phase (the same server and background load: what explanations "
        "cost predictions)",
    )
    parser.add_argument(
        "--warmup", type=float, default=0.0, help="seconds of /predict load before the soak"
    )
    parser.add_argument("--chat", default="1", help="ONCOFLOW_CHAT for the server (1/0)")
    parser.add_argument("--log", default="soak-server.log", help="the server's output")
    args = parser.parse_args(argv)

    from components.net import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(args.model, port, Path(args.log), {"ONCOFLOW_CHAT": args.chat})
    try:
        ready_s = wait_ready(base, server)
        explain_ready(base, args.explain_clients)
        time.sleep(2.0)  # let the extras (assistant) finish loading
        ready = service_rss(server)
        result = asyncio.run(soak(base, server, args))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    samples = result.pop("rss_samples")
    summary = {
        "model": args.model,
        "clients": args.clients,
        "explain_clients": args.explain_clients,
        "nsamples": args.nsamples,
        "ready_after_s": round(ready_s, 1),
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "rss_mb": rss_table(ready, samples),
        "processes_seen": {
            name: len({s[name][0] for s in samples if name in s})
            for name in sorted({name for s in samples for name in s})
        },
        **result,
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
