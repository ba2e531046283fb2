"""`/explain` latency against `/predict` on the same server, model and image; SHAP accuracy.

Serves a model bundle with the real service (``bentoml serve serving.service:DiagnosisService``,
torch threads 1 by default, as bench/serve_throughput.py) and times, with the same image:

- sequential: ``POST /predict``, ``POST /explain`` (Grad-CAM + image SHAP at the service's
  default settings) and ``POST /explain`` with ``shap=false``, interleaved request by request
  so that a drift in the machine's load hits all three alike;
- low concurrency (``--clients``, default 2): each client sends predict and explain requests
  in turn.

It prints p50/p95 of each and the ratio explain p50 / predict p50 (the target is at most 5).
The bundle is a finished run's (``RUN_DIR/bundle``, the image a seeded test-split image of
its manifest) or, without RUN_DIR, a randomly initialised EfficientNet-Lite0 at 96 px with a
random image (speed does not depend on the weights).

``--accuracy`` instead measures, in this process, how close the image SHAP map comes to a
converged reference (shap's own `GradientExplainer` at ``--reference-samples`` samples) for
shap's estimator at its former default (32 random samples) and for the one-pass stratified
estimator `/explain` uses (components/explain/one_pass.py) at several sample counts: relative
L2 error and Pearson correlation per image, mean over ``--images`` test images. It also gives
the correlation of region sums (square blocks of ``BLOCKS`` pixels: what a coarser map would
show) and the share of the reference map's energy those region sums hold.

    python bench/explain_latency.py RUN_DIR --json /tmp/explain.json
    python bench/explain_latency.py                       # random model, ~1 minute
    python bench/explain_latency.py RUN_DIR --accuracy --images 4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from serve_throughput import KEY, Server, make_bench_bundle, percentile, png_images  # noqa: E402

from components.net import free_port  # noqa: E402

BLOCKS = (4, 8)  # --accuracy: side of the square regions whose SHAP sums are also compared
CALLS = {
    "predict": ("/predict", {}),
    "explain": ("/explain", {}),  # the service's default SHAP settings (or --nsamples)
    "explain_cam_only": ("/explain", {"shap": "false"}),
}


def test_images(run_dir: Path, count: int, seed: int) -> list[bytes]:
    """The file bytes of `count` seeded test-split images of the run's manifest."""
    import pandas as pd

    manifest = pd.read_parquet(run_dir / "manifest.parquet")
    test = manifest[manifest["split"] == "test"]
    if test.empty:
        raise SystemExit(f"{run_dir} has no test split in manifest.parquet")
    rows = test.sample(n=min(count, len(test)), random_state=seed)
    return [Path(source).read_bytes() for source in rows["source"]]


def timed(http, base: str, call: str, image: bytes, engine: list[float] | None = None) -> float:
    """Seconds one call takes at the client; `engine` gets the answer's ``latency_ms`` (the
    time inside the engine: for /explain, from the decoded image to the finished answer)."""
    route, data = CALLS[call]
    started = time.perf_counter()
    response = http.post(f"{base}{route}", files={"image": ("u", image, "image/png")}, data=data)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"{call}: HTTP {response.status_code} {response.text[:300]}")
    if engine is not None:
        engine.append(float(response.json()["latency_ms"]) / 1000.0)
    return elapsed


def summary(times: list[float]) -> dict:
    return {
        "requests": len(times),
        "p50_ms": percentile(times, 0.5) * 1000.0,
        "p95_ms": percentile(times, 0.95) * 1000.0,
        "mean_ms": sum(times) / len(times) * 1000.0,
    }


def sequential(base: str, image: bytes, requests: int) -> dict:
    import httpx

    times: dict[str, list[float]] = {call: [] for call in CALLS}
    engine: dict[str, list[float]] = {call: [] for call in CALLS}
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=300.0) as http:
        for call in CALLS:  # warm-up, not counted
            timed(http, base, call, image)
        for _ in range(requests):
            for call in CALLS:
                times[call].append(timed(http, base, call, image, engine[call]))
    return {
        call: summary(t) | {"engine_p50_ms": percentile(engine[call], 0.5) * 1000.0}
        for call, t in times.items()
    }


def concurrent(base: str, image: bytes, requests: int, clients: int) -> dict:
    """`clients` threads, each sending predict and explain in turn, `requests` of each."""
    import httpx

    times: dict[str, list[float]] = {"predict": [], "explain": []}
    errors: list[str] = []
    lock = threading.Lock()

    def client(offset: int) -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=300.0) as http:
            order = ("predict", "explain") if offset % 2 == 0 else ("explain", "predict")
            for _ in range(requests):
                for call in order:
                    try:
                        elapsed = timed(http, base, call, image)
                    except (RuntimeError, httpx.HTTPError) as exc:
                        with lock:
                            errors.append(str(exc)[:200])
                        continue
                    with lock:
                        times[call].append(elapsed)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out = {call: summary(t) for call, t in times.items() if t}
    out["clients"], out["errors"] = clients, errors
    return out


def serve_and_time(args: argparse.Namespace) -> dict:
    from serving.launch import serve_command
    from serving.packaging import import_bundle

    workdir = Path(tempfile.mkdtemp(prefix="oncoflow-explain-bench-"))
    try:
        if args.run_dir:
            bundle = args.run_dir / "bundle"
            image = test_images(args.run_dir, 1, args.seed)[0]
        else:
            bundle = make_bench_bundle(workdir / "bundle", "efficientnet_lite0", 96, 4)
            image = png_images(96, 1)[0]
        bento_home = workdir / "bentoml"
        tag = import_bundle(bundle, bentoml_home=bento_home, assistant_index=False)
        port = free_port()
        env = {
            "BENTOML_HOME": str(bento_home),
            "ONCOFLOW_MODEL_TAG": tag,
            "ONCOFLOW_API_KEYS": KEY,
            "ONCOFLOW_TORCH_THREADS": str(args.threads),
            "ONCOFLOW_CHAT": "0",
            "ONCOFLOW_RATE_LIMIT_PER_MINUTE": "0",  # one key sends the whole load
            "PYTHONPATH": str(ROOT),
        }
        server = Server("oncoflow", serve_command("127.0.0.1", port), env, workdir / "serve.log")
        try:
            base = f"http://127.0.0.1:{port}"
            server.wait_ready(f"{base}/readyz")
            load_start = os.getloadavg()[0]
            seq = sequential(base, image, args.requests)
            conc = concurrent(base, image, max(1, args.requests // args.clients), args.clients)
            load_end = os.getloadavg()[0]
        finally:
            server.stop()
        return {
            "bundle": str(bundle),
            "image_bytes": len(image),
            "torch_threads": args.threads,
            "cpus": os.cpu_count(),
            "loadavg": [load_start, load_end],
            "sequential": seq,
            "concurrent": conc,
            "ratio_p50_sequential": seq["explain"]["p50_ms"] / seq["predict"]["p50_ms"],
            "ratio_p50_concurrent": (
                conc["explain"]["p50_ms"] / conc["predict"]["p50_ms"]
                if "explain" in conc and "predict" in conc
                else None
            ),
        }
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def latency_report(result: dict) -> str:
    lines = [
        f"bundle {result['bundle']}, torch threads {result['torch_threads']}, "
        f"{result['cpus']} CPUs, load average {result['loadavg'][0]:.2f} -> "
        f"{result['loadavg'][1]:.2f}",
        f"{'mode':<16} | {'call':<17} | {'n':>4} | {'p50 ms':>8} | {'p95 ms':>8}",
    ]
    conc = result["concurrent"]
    for mode, block in (("sequential", result["sequential"]), (f"{conc['clients']} clients", conc)):
        for call in CALLS:
            if call in block:
                r = block[call]
                lines.append(
                    f"{mode:<16} | {call:<17} | {r['requests']:>4} | {r['p50_ms']:>8.1f} | "
                    f"{r['p95_ms']:>8.1f}"
                )
    seq = result["sequential"]
    lines.append(
        "sequential, p50 inside the engine (the answer's latency_ms): "
        + ", ".join(f"{call} {seq[call]['engine_p50_ms']:.1f} ms" for call in CALLS)
    )
    lines.append(f"explain/predict p50: sequential {result['ratio_p50_sequential']:.2f}x")
    if result["ratio_p50_concurrent"] is not None:
        lines[-1] += f", {conc['clients']} clients {result['ratio_p50_concurrent']:.2f}x"
    if conc["errors"]:
        lines.append(f"errors at {conc['clients']} clients: {len(conc['errors'])}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ accuracy


def shap_accuracy(args: argparse.Namespace) -> dict:
    """Error of each SHAP estimator against shap's GradientExplainer at many samples."""
    import numpy as np
    import torch

    from components.bundle import ModelBundle
    from components.data.images import decode_bytes
    from components.explain.one_pass import background_probabilities, explain_image
    from components.explain.shap_image import explain_shap_image

    torch.set_num_threads(args.threads)
    if not args.run_dir:
        raise SystemExit("--accuracy needs RUN_DIR (a trained model: a random one is flat)")
    bundle = ModelBundle.load(args.run_dir / "bundle")
    model = bundle.build_model().eval()
    background = bundle.background
    expected = background_probabilities(model, background)
    images = [
        bundle.preprocessing.to_tensor(decode_bytes(raw))
        for raw in test_images(args.run_dir, args.images, args.seed)
    ]
    settings = [("shap GradientExplainer, 32 random", None, 32)]
    settings += [(f"one pass, {n} stratified", "one_pass", n) for n in args.samples]
    regions = [f"r_{k}px" for k in BLOCKS]
    rows: dict[str, dict[str, list[float]]] = {
        name: {"rel_l2": [], "r": []} | {key: [] for key in regions} for name, *_ in settings
    }
    energy: dict[str, list[float]] = {f"{k}px": [] for k in BLOCKS}
    for i, x in enumerate(images):
        reference = explain_shap_image(
            model, x, background, nsamples=args.reference_samples, seed=10_000 + i
        )
        ref_map = reference.attribution.astype(np.float64)
        ref = ref_map.ravel()
        for k in BLOCKS:  # the region means spread over their k * k pixels, against the map
            sums = region_sums(ref_map, k)
            covered = ref_map[: sums.shape[0] * k, : sums.shape[1] * k]
            energy[f"{k}px"].append(float((sums**2).sum() / (k * k) / (covered**2).sum()))
        for name, kind, n in settings:
            for rep in range(args.repeats):
                seed = 100 * i + rep
                if kind is None:
                    got = explain_shap_image(
                        model,
                        x,
                        background,
                        target_class=reference.target_class,
                        nsamples=n,
                        seed=seed,
                    ).attribution
                else:
                    got = explain_image(
                        model,
                        x,
                        background,
                        target_class=reference.target_class,
                        cam=False,
                        nsamples=n,
                        seed=seed,
                        expected=expected,
                    ).shap.attribution
                est = got.ravel().astype(np.float64)
                rows[name]["rel_l2"].append(float(np.linalg.norm(est - ref) / np.linalg.norm(ref)))
                rows[name]["r"].append(float(np.corrcoef(est, ref)[0, 1]))
                for k, key in zip(BLOCKS, regions, strict=True):
                    pair = region_sums(got, k).ravel(), region_sums(ref_map, k).ravel()
                    rows[name][key].append(float(np.corrcoef(*pair)[0, 1]))
        print(f"  image {i + 1}/{len(images)} done", flush=True)
    return {
        "reference": f"shap.GradientExplainer, {args.reference_samples} samples",
        "images": len(images),
        "repeats": args.repeats,
        "background": f"{len(background)} images ({bundle.background_source or 'unrecorded'})",
        "region_energy_share": {k: float(np.mean(v)) for k, v in energy.items()},
        "estimators": {
            name: {k: float(np.mean(v)) for k, v in r.items()}
            | {f"{k}_sd": float(np.std(v)) for k, v in r.items()}
            for name, r in rows.items()
        },
    }


def region_sums(attribution, k: int):
    """Sums of `attribution` (H, W) over k x k blocks (the edge rows and columns that do not
    fill a block are left out): the SHAP values of those regions."""
    import numpy as np

    a = np.asarray(attribution, dtype=np.float64)
    h, w = a.shape[0] // k, a.shape[1] // k
    return a[: h * k, : w * k].reshape(h, k, w, k).sum(axis=(1, 3))


def accuracy_report(result: dict) -> str:
    regions = [f"r_{k}px" for k in BLOCKS]
    lines = [
        f"reference: {result['reference']}; {result['images']} test images x "
        f"{result['repeats']} seeds; background {result['background']}",
        "share of the reference map's energy in its region sums: "
        + ", ".join(f"{k} blocks {v:.3f}" for k, v in result["region_energy_share"].items()),
        f"{'estimator':<34} | {'rel. L2 error':>13} | {'Pearson r':>9} | "
        + " | ".join(f"{key:>7}" for key in regions),
    ]
    for name, r in result["estimators"].items():
        lines.append(
            f"{name:<34} | {r['rel_l2']:>13.3f} | {r['r']:>9.3f} | "
            + " | ".join(f"{r[key]:>7.3f}" for key in regions)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, nargs="?", help="a finished run directory")
    parser.add_argument("--requests", type=int, default=30, help="requests of each kind")
    parser.add_argument("--clients", type=int, default=2, help="the low-concurrency level")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0, help="which test images")
    parser.add_argument("--accuracy", action="store_true", help="SHAP accuracy, no server")
    parser.add_argument("--images", type=int, default=4, help="--accuracy: test images")
    parser.add_argument("--repeats", type=int, default=3, help="--accuracy: seeds per image")
    parser.add_argument("--reference-samples", type=int, default=512)
    parser.add_argument("--samples", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument(
        "--nsamples", type=int, help="SHAP samples per /explain (default: the service's)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the work dir and server log")
    args = parser.parse_args(argv)
    if args.nsamples:
        CALLS["explain"] = ("/explain", {"nsamples": str(args.nsamples)})
    if args.accuracy:
        result = shap_accuracy(args)
        print(accuracy_report(result))
    else:
        result = serve_and_time(args)
        print(latency_report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
