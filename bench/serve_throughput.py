"""Predict throughput and latency: the BentoML service vs a plain FastAPI baseline, one run.

Both servers serve the same model bundle on 127.0.0.1 with the same torch thread count:

- oncoflow: ``bentoml serve serving.service:DiagnosisService`` (API key, upload checks,
  in-process micro-batching on the model copy rewritten for inference);
- baseline: bench/baseline_fastapi.py (FastAPI + torch, one request at a time, no auth, the
  model as trained).

For 1, 8 and 32 concurrent clients each server gets a fixed number of ``POST /predict``
requests (split evenly between the clients; every client sends its next request when the last
one is answered), in two halves run in the order baseline, oncoflow, oncoflow, baseline so that
a drift in the machine's load hits both servers alike. The default counts give every client 50
(1 client), 50 (8) and 30 (32) requests per half: steady state. With only a handful per client
(e.g. 320 requests at 32 clients = 5 each) the start, where every client's first request
arrives at once, and the drain, where the last batches run nearly empty, are a large part of
the run: on the same quiet machine the service's 32-client figure came out 14 % lower that way
(109 vs 128 requests/s; the baseline, which has no batches to fill, 64 vs 58).

Reported per level: throughput (requests/s), p50/p99 latency, CPU time per request (all the
server's processes, and the load generator), errors, the ratios oncoflow/baseline, oncoflow's
mean batch and the load average; with a closed loop of N clients, latency is about
N / throughput, so at 8 and 32 clients it follows throughput, and at 1 client it is one
request's own cost. Then the latency of ``POST /explain`` (Grad-CAM + image SHAP, and Grad-CAM
only), sequential requests. The model is randomly initialised (speed does not depend on the
weights): by default EfficientNet-Lite0 at 96 px, the platform's default model.

The service's per-key rate limit is off (``ONCOFLOW_RATE_LIMIT_PER_MINUTE=0``): one key sends
the whole load, which the limit would otherwise answer with 429s. Failed requests are counted
with their HTTP status.

The load generator runs in this process (asyncio + aiohttp, every request body encoded once)
and shares the CPU with both servers, so it is kept cheap (see `drive`); on a shared machine
the figures are noisy, so the load average is printed with them.

    python bench/serve_throughput.py                       # ~2-3 minutes
    python bench/serve_throughput.py --arch resnet18 --json /tmp/serve.json
    python bench/serve_throughput.py --tta crop,hflip      # 4 views a prediction (brain MRI)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from components.net import free_port  # noqa: E402
from components.telemetry import TELEMETRY_OFF  # noqa: E402

KEY = "bench-key"
LEVELS = (1, 8, 32)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# ------------------------------------------------------------------------------ set-up


def make_bench_bundle(
    out: Path, arch: str, size: int, classes: int, tta: tuple[str, ...] = ()
) -> Path:
    """A randomly initialised bundle (with SHAP background and case index) for timing; `tta`:
    its test-time views (`dataset.tta`)."""
    import numpy as np
    import torch

    from components.bundle_builder import make_bundle
    from components.data.preprocess import Preprocessing
    from components.models import build_model

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4 * classes, 3, size, size), dtype=np.uint8)
    y = np.arange(len(x)) % classes
    architecture = {"name": arch, "num_classes": classes, "in_channels": 3}
    if arch == "small_cnn":
        architecture["width"] = 16
    else:
        architecture["small_input"] = size <= 64
    torch.manual_seed(0)
    model = build_model(**architecture).eval()
    return make_bundle(
        model,
        architecture=architecture,
        class_names=[f"class_{i}" for i in range(classes)],
        preprocessing=Preprocessing(size=size, channels=3, tta=tta),
        train_x=x,
        train_y=y,
        metrics={},
        data_fingerprint="bench",
        config={},
        background_size=2 * classes,
        out_dir=out,
    )


def png_images(size: int, count: int = 16) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


class Server:
    """A server subprocess in its own process group, output to a log file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command,
            env={**os.environ, **TELEMETRY_OFF, **env},
            cwd=ROOT,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, url: str, timeout_s: float = 300.0) -> float:
        import httpx

        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
            except ProcessLookupError:
                pass
        self._out.close()


# ------------------------------------------------------------------------------ load


def multipart_bodies(images: list[bytes]) -> list[tuple[bytes, str]]:
    """Each image as the multipart body (and its Content-Type) of one ``POST /predict``: file
    field ``image``, encoded once, so every server gets byte-identical requests."""
    import httpx

    bodies = []
    for image in images:
        request = httpx.Request(
            "POST", "http://bench/predict", files={"image": ("upload", image, "image/png")}
        )
        bodies.append((request.read(), request.headers["content-type"]))
    return bodies


async def drive(
    url: str, bodies: list[tuple[bytes, str]], clients: int, total: int, headers: dict
) -> dict:
    """`clients` concurrent clients sending `total` requests in all; latency per request.

    The load generator shares the CPU with the servers, so it must cost little per request:
    aiohttp with pre-encoded bodies uses about 0.3 ms of CPU a request here, httpx's async
    client 4-6 ms (which capped it near 200 requests/s even against a server that does
    nothing, and took CPU from the servers under test).
    """
    import aiohttp

    per_client = max(1, total // clients)
    latencies: list[float] = []
    errors = 0
    statuses: Counter[str] = Counter()  # what the failed requests got: status or exception
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=120.0)
    async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout) as http:

        async def client(offset: int) -> None:
            nonlocal errors
            for i in range(per_client):
                body, content_type = bodies[(offset + i) % len(bodies)]
                started = time.perf_counter()
                try:
                    async with http.post(
                        url, data=body, headers={"Content-Type": content_type}
                    ) as response:
                        await response.read()
                        ok, what = response.status == 200, str(response.status)
                except (TimeoutError, aiohttp.ClientError) as exc:
                    ok, what = False, type(exc).__name__
                latencies.append(time.perf_counter() - started)
                errors += not ok
                if not ok:
                    statuses[what] += 1

        started = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        elapsed = time.perf_counter() - started
    return {
        "requests": per_client * clients,
        "errors": errors,
        "error_statuses": statuses,
        "seconds": elapsed,
        "latencies": latencies,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` and all its descendants so far."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def own_cpu_seconds() -> float:
    """CPU time of this process (the load generator) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def merge(clients: int, runs: list[dict]) -> dict:
    """One row from several runs of a level: total requests over total time, pooled latency."""
    latencies = [t for run in runs for t in run["latencies"]]
    done = sum(run["requests"] for run in runs)
    seconds = sum(run["seconds"] for run in runs)
    return {
        "clients": clients,
        "requests": done,
        "errors": sum(run["errors"] for run in runs),
        "error_statuses": dict(sum((Counter(run["error_statuses"]) for run in runs), Counter())),
        "seconds": seconds,
        "throughput_rps": done / seconds,
        "p50_ms": percentile(latencies, 0.5) * 1000.0,
        "p99_ms": percentile(latencies, 0.99) * 1000.0,
        "server_cpu_ms": sum(run["server_cpu_s"] for run in runs) / done * 1000.0,
        "client_cpu_ms": sum(run["client_cpu_s"] for run in runs) / done * 1000.0,
    }


def explain_latency(base: str, image: bytes, repeats: int, shap: bool) -> dict:
    import httpx

    times = []
    headers = {"Authorization": f"Bearer {KEY}"}
    data = {"shap": "true" if shap else "false"}
    with httpx.Client(headers=headers, timeout=300.0) as http:
        for _ in range(repeats + 1):  # the first one warms up
            started = time.perf_counter()
            response = http.post(
                f"{base}/explain", files={"image": ("u", image, "image/png")}, data=data
            )
            response.raise_for_status()
            times.append(time.perf_counter() - started)
    times = times[1:]
    return {
        "shap": shap,
        "requests": len(times),
        "p50_ms": percentile(times, 0.5) * 1000.0,
        "max_ms": max(times) * 1000.0,
        "mean_ms": statistics.fmean(times) * 1000.0,
    }


def batch_sizes(base: str) -> dict:
    """Mean predict batch size so far, from the service's Prometheus histogram."""
    import httpx

    text = httpx.get(f"{base}/metrics", timeout=10).text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("oncoflow_predict_batch_size_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("oncoflow_predict_batch_size_count"):
            count += float(line.rsplit(" ", 1)[1])
    return {"batches": count, "rows": total, "mean_batch": total / count if count else 0.0}


# ------------------------------------------------------------------------------ main


def parse_totals(text: str) -> dict[int, int]:
    totals = {}
    for part in text.split(","):
        level, _, total = part.partition("=")
        totals[int(level)] = int(total)
    if sorted(totals) != list(LEVELS):
        raise SystemExit(f"--requests must name the levels {LEVELS}, e.g. 1=40,8=160,32=320")
    return totals


def run(args: argparse.Namespace) -> dict:
    from serving.launch import serve_command

    workdir = Path(tempfile.mkdtemp(prefix="oncoflow-serve-bench-"))
    bento_home = workdir / "bentoml"
    bundle = make_bench_bundle(workdir / "bundle", args.arch, args.size, args.classes, args.tta)
    from serving.packaging import import_bundle

    tag = import_bundle(bundle, bentoml_home=bento_home, assistant_index=False)
    threads = str(args.threads)
    bento_port, base_port = free_port(), free_port()
    servers = []
    try:
        bento = Server(
            "oncoflow",
            serve_command("127.0.0.1", bento_port),
            {
                "BENTOML_HOME": str(bento_home),
                "ONCOFLOW_MODEL_TAG": tag,
                "ONCOFLOW_API_KEYS": KEY,
                "ONCOFLOW_TORCH_THREADS": threads,
                "ONCOFLOW_CHAT": "0",
                "ONCOFLOW_MAX_BATCH": str(args.max_batch),
                "ONCOFLOW_RATE_LIMIT_PER_MINUTE": "0",  # one key sends the whole load
                "PYTHONPATH": str(ROOT),
            },
            workdir / "bento.log",
        )
        servers.append(bento)
        baseline = Server(
            "baseline",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "--app-dir",
                str(ROOT / "bench"),
                "baseline_fastapi:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(base_port),
                "--log-level",
                "warning",
            ],
            {"ONCOFLOW_BASELINE_BUNDLE": str(bundle), "ONCOFLOW_TORCH_THREADS": threads},
            workdir / "baseline.log",
        )
        servers.append(baseline)
        bento_url, base_url = f"http://127.0.0.1:{bento_port}", f"http://127.0.0.1:{base_port}"
        started = {
            "oncoflow_s": bento.wait_ready(f"{bento_url}/readyz"),
            "baseline_s": baseline.wait_ready(f"{base_url}/readyz"),
        }
        print(f"servers ready (oncoflow {started['oncoflow_s']:.0f} s)", flush=True)
        images = png_images(args.size)
        bodies = multipart_bodies(images)
        targets = {
            "baseline": (f"{base_url}/predict", {}, baseline),
            "oncoflow": (f"{bento_url}/predict", {"Authorization": f"Bearer {KEY}"}, bento),
        }
        for url, headers, _ in targets.values():  # warm-up
            asyncio.run(drive(url, bodies, 4, 40, headers))
        load_start = os.getloadavg()
        levels = []
        for clients in LEVELS:
            runs: dict[str, list[dict]] = {"baseline": [], "oncoflow": []}
            half = max(clients, args.totals[clients] // 2)
            batched = {"batches": 0.0, "rows": 0.0}
            load = os.getloadavg()[0]
            for name in ("baseline", "oncoflow", "oncoflow", "baseline"):  # ABBA: drift cancels
                url, headers, server = targets[name]
                before = batch_sizes(bento_url)
                cpu_before = (cpu_seconds(server.process.pid), own_cpu_seconds())
                run_ = asyncio.run(drive(url, bodies, clients, half, headers))
                run_["server_cpu_s"] = cpu_seconds(server.process.pid) - cpu_before[0]
                run_["client_cpu_s"] = own_cpu_seconds() - cpu_before[1]
                runs[name].append(run_)
                if name == "oncoflow":
                    after = batch_sizes(bento_url)
                    for key in batched:
                        batched[key] += after[key] - before[key]
            row = {"clients": clients, "loadavg": load}
            row.update({n: merge(clients, r) for n, r in runs.items()})
            row["oncoflow"]["mean_batch"] = batched["rows"] / max(batched["batches"], 1.0)
            row["throughput_ratio"] = (
                row["oncoflow"]["throughput_rps"] / row["baseline"]["throughput_rps"]
            )
            row["p50_ratio"] = row["oncoflow"]["p50_ms"] / row["baseline"]["p50_ms"]
            row["p99_ratio"] = row["oncoflow"]["p99_ms"] / row["baseline"]["p99_ms"]
            levels.append(row)
            print(
                f"  {clients:>2} clients: baseline {row['baseline']['throughput_rps']:.1f} req/s,"
                f" oncoflow {row['oncoflow']['throughput_rps']:.1f} req/s",
                flush=True,
            )
        batching = batch_sizes(bento_url)
        explain = [
            explain_latency(bento_url, images[0], args.explain_requests, shap=True),
            explain_latency(bento_url, images[0], args.explain_requests, shap=False),
        ]
        return {
            "arch": args.arch,
            "size": args.size,
            "tta": list(args.tta),
            "torch_threads": args.threads,
            "max_batch": args.max_batch,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "startup": started,
            "levels": levels,
            "batching": batching,
            "explain": explain,
        }
    finally:
        for server in servers:
            server.stop()
        if args.keep:
            print(f"kept {workdir} (bundle, Bento store, server logs)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def report(result: dict) -> str:
    views = "+".join(result.get("tta") or []) or "none"
    lines = [
        f"model {result['arch']} at {result['size']} px, test-time views {views}, "
        f"torch threads {result['torch_threads']}, "
        f"{result['cpus']} CPUs, load average {result['loadavg_start'][0]:.2f} at start, "
        f"{result['loadavg_end'][0]:.2f} at end",
        "",
        "CPU ms/req: CPU time per request of the server's processes and of the load generator",
        "",
        f"{'clients':>7} | {'server':<9} | {'req/s':>7} | {'p50 ms':>8} | {'p99 ms':>8} | "
        f"{'CPU ms/req':>10} | {'client':>6} | errors",
    ]
    for row in result["levels"]:
        for name in ("baseline", "oncoflow"):
            r = row[name]
            lines.append(
                f"{row['clients']:>7} | {name:<9} | {r['throughput_rps']:>7.1f} | "
                f"{r['p50_ms']:>8.1f} | {r['p99_ms']:>8.1f} | {r['server_cpu_ms']:>10.2f} | "
                f"{r['client_cpu_ms']:>6.2f} | {r['errors']}/{r['requests']}"
                + (f" {r['error_statuses']}" if r.get("error_statuses") else "")
            )
        lines.append(
            f"{row['clients']:>7} | ratio     | {row['throughput_ratio']:>6.2f}x | "
            f"{row['p50_ratio']:>7.2f}x | {row['p99_ratio']:>7.2f}x | "
            f"mean batch {row['oncoflow']['mean_batch']:.1f}, load average {row['loadavg']:.2f}"
        )
    b = result["batching"]
    lines += [
        "",
        f"micro-batching, whole run (warm-up included): {b['rows']:.0f} rows in "
        f"{b['batches']:.0f} model calls (mean batch {b['mean_batch']:.2f})",
    ]
    for e in result["explain"]:
        what = "Grad-CAM + image SHAP" if e["shap"] else "Grad-CAM only"
        lines.append(
            f"explain ({what}): p50 {e['p50_ms']:.0f} ms, mean {e['mean_ms']:.0f} ms, "
            f"max {e['max_ms']:.0f} ms over {e['requests']} sequential requests"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument(
        "--requests",
        default="1=100,8=800,32=1920",
        help="requests per concurrency level, split between its clients",
    )
    parser.add_argument("--explain-requests", type=int, default=5)
    parser.add_argument(
        "--tta",
        default="",
        help="test-time views of the bundle, both servers (dataset.tta), e.g. crop,hflip",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the work dir and server logs")
    args = parser.parse_args(argv)
    args.tta = tuple(v for v in args.tta.split(",") if v)
    args.totals = parse_totals(args.requests)
    result = run(args)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
