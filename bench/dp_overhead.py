"""DP-SGD overhead: step time and peak memory of Opacus DP-SGD against non-private training.

One model (`build_model(arch, norm="group")`, made DP-compatible with
`make_private_compatible`, the same initial weights), one optimiser (AdamW, as
`ClassifierModule`), the same batches and batch size for every variant:

- `non_private`: forward, cross-entropy, backward, AdamW step;
- `dp_hooks`: `components.privacy.dp.DPSGD` (Opacus `GradSampleModule` hooks + `DPOptimizer`:
  per-sample gradients, flat clipping to C, Gaussian noise), as central and federated training
  use it;
- `dp_functorch`: the same with `grad_sample_mode="functorch"` (per-sample gradients from
  `torch.func` for every layer);
- `dp_ghost`: `PrivacyEngine.make_private(grad_sample_mode="ghost")` with its
  `DPLossFastGradientClipping` criterion: per-sample gradient norms without keeping per-sample
  gradients (ghost norms for layers Opacus has a norm sampler for, e.g. Linear; fast gradient
  clipping for the others, e.g. Conv2d), then a second, re-weighted backward pass.

A step is forward + backward + optimiser step + zero_grad on pre-normalised batches (data loading
is not timed; the DP loaders' Poisson sampling is replaced by fixed batches of the expected size,
so every variant sees the same tensors). Each variant runs in its own Python process; after
model, data and wrapping are set up, the process' RSS is the baseline, and the peak memory of the
steps is `ru_maxrss` at the end minus that baseline ("RSS": includes the first step's one-off
costs, e.g. lazily loaded kernels, common to all variants). "step RSS" is the timed steps alone:
after warm-up, freed heap pages go back to the OS (`malloc_trim`) and the resident high-water
mark is reset (`/proc/self/clear_refs`), so it is the resident memory a steady-state step adds
(Linux only). "tensor": one extra step under `torch.profiler` (`--no-profile-memory` skips it),
the peak of live CPU tensor bytes allocated during that step (deterministic, allocator-free).
"cpu s" is the CPU time the process used per step (median), much less sensitive to
other processes on the machine than the wall time. Ratios are DP / non-private. torch uses 1
CPU thread by default (`--threads`); the machine's load average is printed because timings on
a shared machine are noisy (`--repeats N` alternates the variants and keeps each variant's
fastest run).

    python bench/dp_overhead.py                          # synthetic, 64 px, about a minute
    python bench/dp_overhead.py --data brain_tumor_mri --batch-size 64 --json dp.json
    python bench/dp_overhead.py --arch efficientnet_lite0 --size 32 --steps 5
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger(__name__)

BASELINE = "non_private"
VARIANTS: dict[str, str] = {
    "non_private": "AdamW, no per-sample gradients",
    "dp_hooks": "DPSGD: Opacus GradSampleModule hooks + DPOptimizer",
    "dp_functorch": "DPSGD with grad_sample_mode=functorch",
    "dp_ghost": "PrivacyEngine ghost clipping (DPLossFastGradientClipping)",
}
MIB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """Everything a variant's process needs besides the data."""

    arch: str = "small_cnn"
    batch_size: int = 32
    steps: int = 20
    warmup: int = 3
    threads: int = 1
    width: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    seed: int = 0
    profile_memory: bool = True


# ---------------------------------------------------------------------------------------------
# In the variant's own process
# ---------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _maxrss_bytes() -> int:
    import resource

    # Linux reports KiB (macOS bytes; this bench targets the Linux training hosts)
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _hwm_bytes() -> int | None:
    """The process' resident high-water mark (VmHWM), Linux only."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Give freed heap pages back to the OS and restart the high-water mark at the current RSS
    (Linux: `malloc_trim(0)` + `/proc/self/clear_refs` "5"), so the next peak is the steps' own.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, AttributeError):
        return False
    return True


def _batches(x: np.ndarray, y: np.ndarray, batch_size: int):
    """Normalised float batches of exactly `batch_size` images (the pool is cut to a multiple)."""
    import torch

    from components.data.preprocess import Preprocessing

    usable = (len(y) // batch_size) * batch_size
    if usable == 0:
        raise SystemExit(f"need at least {batch_size} images for one batch, got {len(y)}")
    prep = Preprocessing(size=int(x.shape[-1]), channels=int(x.shape[1]))
    images = prep.normalise(torch.from_numpy(np.ascontiguousarray(x[:usable])))
    labels = torch.from_numpy(np.asarray(y[:usable], dtype=np.int64))
    return [
        (images[i : i + batch_size].contiguous(), labels[i : i + batch_size])
        for i in range(0, usable, batch_size)
    ], (images, labels)


def _setup(variant: str, model, optimizer, dataset, settings: Settings):
    """Wrap model/optimiser for `variant`; returns (forward_model, optimizer, loss_fn, info)."""
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=settings.batch_size)
    if variant == BASELINE:
        return model, optimizer, F.cross_entropy, {}
    if variant in ("dp_hooks", "dp_functorch"):
        from types import SimpleNamespace

        from components.privacy.dp import DPSGD, PrivacyLedger

        hooks = DPSGD(
            settings.noise_multiplier,
            settings.max_grad_norm,
            PrivacyLedger(),
            grad_sample_mode="functorch" if variant == "dp_functorch" else "hooks",
        )
        hooks.loader_hook(loader)  # sets the sampling rate and expected batch size
        dp_optimizer = hooks.optimizer_hook(SimpleNamespace(model=model), optimizer)
        info = {"expected_batch_size": hooks.expected_batch_size, "dpsgd": hooks}
        return model, dp_optimizer, F.cross_entropy, info
    if variant == "dp_ghost":
        from opacus import PrivacyEngine
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.utils.module_utils import trainable_modules

        ghost = sum(
            type(m) in GradSampleModuleFastGradientClipping.NORM_SAMPLERS
            for _, m in trainable_modules(model)
        )
        total = sum(1 for _ in trainable_modules(model))
        wrapped, dp_optimizer, criterion, _ = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            criterion=nn.CrossEntropyLoss(),
            data_loader=loader,
            noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            grad_sample_mode="ghost",
        )
        info = {
            "expected_batch_size": dp_optimizer.expected_batch_size,
            "ghost_norm_layers": ghost,
            "fast_gradient_clipping_layers": total - ghost,
        }
        return wrapped, dp_optimizer, criterion, info
    raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def _peak_tensor_bytes(step) -> int | None:
    """Peak of live CPU tensor bytes allocated during one `step()` (torch.profiler events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:  # private API moved: report nothing rather than a wrong number
        return None
    memory = sorted(
        (e.start_ns(), int(e.nbytes())) for e in events if e.name() == "[memory]" and e.nbytes()
    )
    live = peak = 0
    for _, nbytes in memory:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure_variant(variant: str, x: np.ndarray, y: np.ndarray, num_classes: int, s: Settings):
    """Time `s.steps` training steps of `variant` after `s.warmup`; measure peak memory.

    Meant to run alone in a fresh process (RSS figures are per process).
    """
    import gc

    import torch

    from components.models import build_model
    from components.privacy.dp import make_private_compatible

    if s.threads:
        torch.set_num_threads(s.threads)
    warnings.filterwarnings("ignore", message=r".*Secure RNG turned off.*")
    warnings.filterwarnings("ignore", message=r".*Full backward hook is firing.*")
    warnings.filterwarnings("ignore", message=r".*Using a non-full backward hook.*")
    import opacus  # noqa: F401  (imported before the baseline by every variant alike)

    batches, (images, labels) = _batches(x, y, s.batch_size)
    torch.manual_seed(s.seed)
    model = build_model(s.arch, num_classes=num_classes, in_channels=3, norm="group", width=s.width)
    make_private_compatible(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    dataset = torch.utils.data.TensorDataset(images, labels)
    try:
        net, opt, loss_fn, info = _setup(variant, model, optimizer, dataset, s)
    except Exception as exc:  # an unsupported model is a result ("n/a"), not a crash
        return {"variant": variant, "status": "n/a", "reason": f"{type(exc).__name__}: {exc}"}
    dpsgd = info.pop("dpsgd", None)
    counter = {"step": 0, "loss": math.nan}

    def step() -> None:
        xb, yb = batches[counter["step"] % len(batches)]
        loss = loss_fn(net(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        counter["step"] += 1
        counter["loss"] = float(loss.item())

    gc.collect()
    base_rss, base_maxrss = _rss_bytes(), _maxrss_bytes()
    times, cpu_times = [], []
    try:  # a model the variant cannot train (e.g. in-place ops on hooked outputs) fails here
        for _ in range(s.warmup):
            step()
        warm_maxrss = _maxrss_bytes()
        gc.collect()
        steady_rss = _rss_bytes() if _reset_peak_rss() else None
        for _ in range(s.steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    except Exception as exc:
        reason = f"step {counter['step'] + 1} failed: {type(exc).__name__}: {exc}"
        return {"variant": variant, "status": "n/a", "reason": reason[:500]}
    peak_rss = max(warm_maxrss, _maxrss_bytes())
    hwm = _hwm_bytes() if steady_rss is not None else None
    tensor_peak = _peak_tensor_bytes(step) if s.profile_memory else None
    times.sort()
    median = statistics.median(times)
    result: dict[str, Any] = {
        "variant": variant,
        "status": "ok",
        "description": VARIANTS[variant],
        "steps_timed": len(times),
        "step_seconds_median": median,
        "step_seconds_p90": times[min(len(times) - 1, math.ceil(0.9 * len(times)) - 1)],
        "step_seconds_min": times[0],
        "step_seconds_mean": statistics.fmean(times),
        "images_per_second": s.batch_size / median,
        # CPU seconds the process used per step (all its threads): barely affected by other
        # processes competing for the cores, unlike wall time
        "cpu_seconds_median": statistics.median(cpu_times),
        "rss_baseline_mib": base_rss / MIB,
        # ru_maxrss is a high-water mark: a step peak below an earlier peak would be invisible;
        # `rss_setup_peak_slack_mib` says how far above the baseline that earlier peak was
        "rss_setup_peak_slack_mib": max(0, base_maxrss - base_rss) / MIB,
        "rss_peak_growth_mib": max(0, peak_rss - base_rss) / MIB,
        # the timed steps alone: freed heap returned and the high-water mark reset after warm-up
        "rss_step_peak_mib": None if hwm is None else max(0, hwm - steady_rss) / MIB,
        "tensor_peak_mib": None if tensor_peak is None else tensor_peak / MIB,
        "last_loss": counter["loss"],
        "optimizer_steps": counter["step"],
        **info,
    }
    if dpsgd is not None:
        result["dp_steps_recorded"] = dpsgd.steps
        dpsgd.close()
    return result


def _worker(job_path: Path) -> int:
    job = json.loads(job_path.read_text())
    with np.load(job["data"]) as data:
        x, y = data["x"], data["y"]
    result = measure_variant(job["variant"], x, y, job["num_classes"], Settings(**job["settings"]))
    Path(job["out"]).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def machine_facts(threads: int) -> dict[str, Any]:
    import opacus
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "torch_version": torch.__version__,
        "opacus_version": opacus.__version__,
        "torch_threads": threads or torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _run_isolated(
    variant: str, data_path: Path, num_classes: int, s: Settings, tmp: Path, timeout: float
) -> dict[str, Any]:
    out = tmp / f"result-{variant}.json"
    job = tmp / f"job-{variant}.json"
    job.write_text(
        json.dumps(
            {
                "variant": variant,
                "data": str(data_path),
                "num_classes": num_classes,
                "settings": asdict(s),
                "out": str(out),
            }
        )
    )
    out.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(s.threads or os.cpu_count() or 1)}
    env["PYTHONWARNINGS"] = "ignore"
    try:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(job)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=str(ROOT),
        )
    except subprocess.TimeoutExpired:
        return {"variant": variant, "status": "failed", "reason": f"timed out after {timeout}s"}
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"variant": variant, "status": "failed", "reason": " | ".join(tail)}
    return json.loads(out.read_text())


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or not den > 0:
        return None
    return num / den


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """DP / non-private for time and memory, per DP variant that ran."""
    base = results.get(BASELINE, {})
    if base.get("status") != "ok":
        return {}
    out = {}
    for name, r in results.items():
        if name == BASELINE or r.get("status") != "ok":
            continue
        out[name] = {
            "step_time_median": _ratio(r["step_seconds_median"], base["step_seconds_median"]),
            "step_time_p90": _ratio(r["step_seconds_p90"], base["step_seconds_p90"]),
            "cpu_time_median": _ratio(r["cpu_seconds_median"], base["cpu_seconds_median"]),
            "rss_peak_growth": _ratio(r["rss_peak_growth_mib"], base["rss_peak_growth_mib"]),
            "rss_step_peak": _ratio(r["rss_step_peak_mib"], base["rss_step_peak_mib"]),
            "tensor_peak": _ratio(r["tensor_peak_mib"], base["tensor_peak_mib"]),
        }
    return out


def run_benchmark(
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    settings: Settings,
    variants: tuple[str, ...] = tuple(VARIANTS),
    repeats: int = 1,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Run every variant in its own process on uint8 images `x` (N,3,H,W) and labels `y`.

    Returns `{"settings", "machine", "results": {variant: ...}, "ratios": {dp_variant: ...}}`;
    with `repeats > 1` the variants alternate and each keeps its fastest (median) run.
    """
    if BASELINE not in variants:
        variants = (BASELINE, *variants)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    machine = machine_facts(settings.threads)
    best: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="oncoflow-dp-bench-") as tmp_name:
        tmp = Path(tmp_name)
        data_path = tmp / "data.npz"
        np.savez(data_path, x=np.ascontiguousarray(x, dtype=np.uint8), y=np.asarray(y))
        for _ in range(max(1, repeats)):
            for variant in variants:
                r = _run_isolated(variant, data_path, num_classes, settings, tmp, timeout)
                kept = best.get(variant)
                if kept is None or (
                    r["status"] == "ok"
                    and (
                        kept["status"] != "ok"
                        or r["step_seconds_median"] < kept["step_seconds_median"]
                    )
                ):
                    best[variant] = r
    machine["load_average_after"] = list(os.getloadavg())
    return {
        "benchmark": "dp_overhead",
        "settings": {
            **asdict(settings),
            "size": int(x.shape[-1]),
            "images": len(y),
            "repeats": repeats,
        },
        "machine": machine,
        "results": best,
        "ratios": ratios(best),
    }


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def render(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["machine"]
    lines = [
        f"arch={s['arch']} size={s['size']} batch={s['batch_size']} steps={s['steps']} "
        f"(+{s['warmup']} warm-up) σ={s['noise_multiplier']} C={s['max_grad_norm']} "
        f"images={s['images']}",
        f"cpus={m['cpu_count']} torch threads={m['torch_threads']} torch {m['torch_version']} "
        f"opacus {m['opacus_version']} load avg before={m['load_average'][0]:.2f} "
        f"after={m['load_average_after'][0]:.2f}",
        f"{'variant':<14}{'median s':>9}{'p90 s':>8}{'cpu s':>8}{'img/s':>7}{'RSS MiB':>9}"
        f"{'step RSS':>9}{'tensor MiB':>11}{'time x':>8}{'cpu x':>7}{'RSS x':>7}"
        f"{'step RSS x':>11}{'tensor x':>9}",
    ]
    for name, r in report["results"].items():
        if r["status"] != "ok":
            lines.append(f"{name:<14}{r['status']}: {r['reason']}")
            continue
        q = report["ratios"].get(name, {})

        def ratio(key: str, q=q, name=name) -> str:
            return _fmt(1.0 if name == BASELINE else q.get(key), ".2f")

        lines.append(
            f"{name:<14}{r['step_seconds_median']:>9.4f}{r['step_seconds_p90']:>8.4f}"
            f"{r['cpu_seconds_median']:>8.4f}{r['images_per_second']:>7.1f}"
            f"{r['rss_peak_growth_mib']:>9.1f}{_fmt(r['rss_step_peak_mib'], '.1f'):>9}"
            f"{_fmt(r['tensor_peak_mib'], '.1f'):>11}{ratio('step_time_median'):>8}"
            f"{ratio('cpu_time_median'):>7}{ratio('rss_peak_growth'):>7}"
            f"{ratio('rss_step_peak'):>11}{ratio('tensor_peak'):>9}"
        )
    ghost = report["results"].get("dp_ghost", {})
    if ghost.get("status") == "ok":
        lines.append(
            f"dp_ghost: {ghost['ghost_norm_layers']} layer(s) with ghost norms, "
            f"{ghost['fast_gradient_clipping_layers']} with fast gradient clipping"
        )
    return "\n".join(lines)


def load_data(args) -> tuple[np.ndarray, np.ndarray, int]:
    if args.data == "synthetic":
        from bench.federated_vs_central import load_synthetic

        per_class = -(-args.n // 3)
        arrays, classes = load_synthetic(per_class, args.size, args.seed)
        x = np.concatenate([arrays[s][0] for s in ("train", "val", "test")])
        y = np.concatenate([arrays[s][1] for s in ("train", "val", "test")])
        return x[: args.n], y[: args.n], len(classes)
    from bench.federated_vs_central import load_brain_mri

    arrays, classes = load_brain_mri(
        args.data_root / "brain_tumor_mri",
        args.size,
        args.n_per_class,
        args.seed,
        args.cache,
        "holdout",
    )
    x, y = arrays["train"]
    return x, y, len(classes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic", choices=["synthetic", "brain_tumor_mri"])
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "oncoflow-bench-cache"
    )
    parser.add_argument("--n", type=int, default=128, help="synthetic images")
    parser.add_argument(
        "--n-per-class", type=int, default=64, help="brain MRI files per class (train: ~70%%)"
    )
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--width", type=int, default=16, help="small_cnn base width")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant (fastest kept)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)"
    )
    parser.add_argument("--no-profile-memory", dest="profile_memory", action="store_false")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per variant run")
    parser.add_argument("--json", type=Path, default=None, help="write results to this file")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return _worker(args.worker)

    logging.basicConfig(level=logging.WARNING)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        parser.error("--steps and --batch-size must be positive, --warmup non-negative")
    x, y, num_classes = load_data(args)
    settings = Settings(
        arch=args.arch,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        threads=args.threads,
        width=args.width,
        lr=args.lr,
        noise_multiplier=args.noise_multiplier,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        profile_memory=args.profile_memory,
    )
    report = run_benchmark(
        x, y, num_classes, settings, tuple(args.variants), args.repeats, args.timeout
    )
    report["settings"]["data"] = args.data
    print(render(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0 if all(r["status"] != "failed" for r in report["results"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
