"""Federated (K sites × E local epochs × R rounds) against central training over the same samples.

Both use the project's one training loop (`fit_local` per site / `train_classifier` centrally),
the same model, optimiser, batch size and preprocessing. Comparable compute: central training
runs R × E epochs over the pooled training data (no early stop), as many passes over the same
images as the federation makes. Reported for each: test accuracy, macro-F1, macro AUROC, wall
time; for the federation also the mean time per round; then the federated / central wall-time
ratio. With `--attack`, one site (or `--attackers`) misbehaves and FedAvg is compared with the
robust rules (Krum, Multi-Krum, trimmed mean, median) against the clean FedAvg run; the robust
rules run after nearest-neighbour mixing (`--mixing nnm`, the platform's default) or on the raw
updates (`--mixing none`).

The parts can be run separately (`--parts central,clean,attack`, `--attacked krum,median`) and
in parallel processes, one per core: every run is seeded and deterministic, so a split run
gives the same figures as one invocation (wall times aside).

    python bench/federated_vs_central.py                                  # synthetic, seconds
    python bench/federated_vs_central.py --data brain_tumor_mri --sites 5 --alpha 0.5 \\
        --rounds 10 --epochs 2 --size 64 --attack sign_flip --json bench-fl.json
    python bench/federated_vs_central.py --data brain_tumor_mri --n 150 --size 48 \
        --test-split holdout --attack sign_flip                                    # reduced
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BRAIN_CLASSES = ["glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor"]
HEADLINE = ("accuracy", "macro_f1", "macro_auroc")


def load_synthetic(n_per_class: int, size: int, seed: int):
    from components.data.synthetic import make_synthetic

    d = make_synthetic(n_per_class=n_per_class, size=size, seed=seed)
    x, y = d.images.transpose(0, 3, 1, 2).copy(), d.labels
    a, b = int(len(y) * 0.6), int(len(y) * 0.7)
    return {"train": (x[:a], y[:a]), "val": (x[a:b], y[a:b]), "test": (x[b:], y[b:])}, d.class_names


def _decode(paths: list[Path], size: int) -> np.ndarray:
    from PIL import Image

    from components.data.preprocess import Preprocessing

    prep = Preprocessing(size=size, channels=3)

    def one(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            return prep.to_uint8(image)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return np.stack(list(pool.map(one, paths)))


def load_brain_mri(
    root: Path, size: int, n_per_class: int | None, seed: int, cache: Path, test_split: str
):
    """Training/ -> train + validation (85/15, stratified, seeded); test = Testing/ ("given")
    or a stratified 15% of Training/ held out ("holdout": same distribution as training)."""
    cache.mkdir(parents=True, exist_ok=True)
    key = cache / f"brain_tumor_mri-{size}px-{n_per_class or 'all'}-{seed}-{test_split}.npz"
    if key.exists():
        with np.load(key) as data:
            arrays = {s: (data[f"{s}_x"], data[f"{s}_y"]) for s in ("train", "val", "test")}
        return arrays, BRAIN_CLASSES
    rng = np.random.default_rng(seed)
    pools: dict[str, list[tuple[Path, int]]] = {"train": [], "val": [], "test": []}
    for label, cls in enumerate(BRAIN_CLASSES):
        files = sorted((root / "Training" / cls).glob("*.jpg"))
        files = [files[i] for i in rng.permutation(len(files))][: n_per_class or None]
        cut = max(1, round(len(files) * 0.15))
        pools["val"] += [(f, label) for f in files[:cut]]
        if test_split == "holdout":
            pools["test"] += [(f, label) for f in files[cut : 2 * cut]]
            pools["train"] += [(f, label) for f in files[2 * cut :]]
            continue
        pools["train"] += [(f, label) for f in files[cut:]]
        tests = sorted((root / "Testing" / cls).glob("*.jpg"))
        if n_per_class:
            tests = [tests[i] for i in rng.permutation(len(tests))][: max(10, n_per_class // 4)]
        pools["test"] += [(f, label) for f in tests]
    arrays = {}
    for split, items in pools.items():
        x = _decode([p for p, _ in items], size)
        arrays[split] = (x, np.array([label for _, label in items], dtype=np.int64))
    np.savez(
        key, **{f"{s}_{k}": v for s, (x, y) in arrays.items() for k, v in (("x", x), ("y", y))}
    )
    return arrays, BRAIN_CLASSES


def config(args, strategy: str, attack: str | None) -> dict:
    """The run configuration: the real conf/ tree composed with this bench's overrides."""
    from components.config import compose, to_container

    fed = {
        "strategy": strategy,
        "engine": args.engine,
        "num_sites": args.sites,
        "partition": args.partition,
        "alpha": args.alpha,
        "rounds": args.rounds,
        "local_epochs": args.epochs,
        "evaluate_sites": str(not args.no_site_eval).lower(),
        "resume": "false",
        "simulation.cpus_per_site": 1,
        "simulation.total_cpus": os.cpu_count() or 1,
        "simulation.threads_per_site": 1,
    }
    if strategy != "fedavg":
        fed["num_malicious"] = args.attackers
        fed["mixing"] = args.mixing
    if strategy == "trimmed_mean":
        fed["trim_fraction"] = max(0.2, args.attackers / args.sites + 1e-9)
    if attack:
        fed |= {"attack.behaviour": attack, "attack.sites": args.attackers}
        fed["attack.scale"] = args.scale
    overrides = [
        "training=federated",
        f"seed={args.seed}",
        f"model.name={args.model}",
        f"model.width={args.width}",
        f"model.norm={args.norm}",
        "model.small_input=true",
        f"trainer.batch_size={args.batch_size}",
        f"trainer.lr={args.lr}",
        "trainer.imbalance=none",
        "trainer.augment=false",
        *(f"federation.{key}={value}" for key, value in fed.items()),
    ]
    return to_container(compose(overrides))


def run_federated(args, arrays, classes, out: Path, strategy: str, attack: str | None) -> dict:
    from components.data.preprocess import Preprocessing
    from components.federated.engines import run_prepared
    from components.federated.layout import prepare_federation

    prep = Preprocessing(size=args.size, channels=3)
    layout = prepare_federation(
        config(args, strategy, attack),
        arrays,
        classes,
        prep,
        out / f"{strategy}-{attack or 'clean'}-{args.mixing}",
    )
    started = time.perf_counter()
    result = run_prepared(layout)
    wall = time.perf_counter() - started
    return {
        "strategy": strategy,
        "attack": attack,
        "mixing": args.mixing if strategy not in ("fedavg", "fedprox") else "none",
        "test": {k: result.test_metrics.get(k) for k in HEADLINE},
        "per_round_macro_f1": [
            round(r["server"].get("macro_f1", float("nan")), 4) for r in result.history
        ],
        "mean_round_seconds": result.mean_round_seconds,
        "wall_seconds": wall,
        "rejected_updates": len(result.rejected),
        "site_report": result.site_report,
    }


def run_central(args, arrays, classes, out: Path) -> dict:
    import torch

    from components.data.preprocess import Preprocessing
    from components.federated.task import evaluate_model
    from components.models import build_model
    from components.training.central import train_classifier

    prep = Preprocessing(size=args.size, channels=3)
    torch.manual_seed(args.seed)
    model = build_model(
        args.model, num_classes=len(classes), width=args.width, norm=args.norm, small_input=True
    )
    epochs = args.rounds * args.epochs
    started = time.perf_counter()
    result = train_classifier(
        model,
        arrays["train"],
        arrays["val"],
        prep,
        max_epochs=epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=1e-4,
        early_stopping_patience=epochs,  # no early stop: same number of passes as the federation
        imbalance="none",
        augment=False,
        seed=args.seed,
        out_dir=out / "central",
    )
    wall = time.perf_counter() - started
    metrics = evaluate_model(result.model, *arrays["test"], _spec(args, classes))
    return {
        "test": {k: metrics.get(k) for k in HEADLINE},
        "epochs": result.epochs_run,
        "best_epoch": result.best_epoch,
        "wall_seconds": wall,
    }


def _spec(args, classes):
    from components.data.preprocess import Preprocessing
    from components.federated.task import ModelSpec

    return ModelSpec(
        architecture={"name": args.model, "num_classes": len(classes)},
        preprocessing=Preprocessing(size=args.size, channels=3).to_dict(),
        class_names=list(classes),
    )


# arguments that do not change what a run computes
_VOLATILE = {"parts", "attacked", "mixing", "clean_from", "out", "json", "engine"}


def clean_from(path: Path, args) -> dict:
    """The clean FedAvg run of an earlier report, refused unless it was made with the same
    data and training settings."""
    earlier = json.loads(path.read_text())
    now = {k: str(v) for k, v in vars(args).items() if k not in _VOLATILE}
    then = {k: v for k, v in earlier["args"].items() if k not in _VOLATILE}
    differ = sorted(k for k in now if then.get(k) != now[k])
    if differ or "fedavg" not in earlier:
        raise SystemExit(f"{path} has no clean FedAvg run with these settings (differs: {differ})")
    return earlier["fedavg"]


def _fmt(value) -> str:
    return "  n/a" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=["synthetic", "brain_tumor_mri"], default="synthetic")
    p.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--n", type=int, default=None, help="images per class (subsample)")
    p.add_argument("--size", type=int, default=None)
    p.add_argument(
        "--test-split",
        choices=["given", "holdout"],
        default="given",
        help="brain_tumor_mri test set: the published Testing/ folder, or 15%% of Training/",
    )
    p.add_argument("--sites", type=int, default=5)
    p.add_argument("--partition", choices=["iid", "dirichlet"], default="dirichlet")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    p.add_argument("--engine", choices=["inline", "simulation"], default="inline")
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--norm", choices=["batch", "group"], default="group")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-site-eval", action="store_true", help="skip per-site evaluation")
    p.add_argument("--attack", choices=["sign_flip", "scale", "gaussian", "label_flip", "nan"])
    p.add_argument("--attackers", type=int, default=1)
    p.add_argument("--scale", type=float, default=10.0)
    p.add_argument(
        "--attacked",
        default="fedavg,krum,multikrum,trimmed_mean,median",
        help="rules run with the attackers (comma-separated)",
    )
    p.add_argument("--mixing", choices=["nnm", "none"], default="nnm", help="before robust rules")
    p.add_argument(
        "--parts",
        default="central,clean,attack",
        help="what to run: central, clean (FedAvg), attack (comma-separated)",
    )
    p.add_argument(
        "--clean-from",
        type=Path,
        help="the clean FedAvg run of an earlier --json report with the same data and settings",
    )
    p.add_argument("--out", type=Path, default=None, help="work directory (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from components.telemetry import quiet_environment

    quiet_environment()

    out = args.out or Path(tempfile.mkdtemp(prefix="oncoflow-bench-fl-"))
    if args.data == "synthetic":
        args.size = args.size or 32
        arrays, classes = load_synthetic(args.n or 100, args.size, args.seed)
    else:
        args.size = args.size or 64
        arrays, classes = load_brain_mri(
            args.data_root / "brain_tumor_mri",
            args.size,
            args.n,
            args.seed,
            out / "cache",
            args.test_split,
        )
    sizes = {s: len(arrays[s][1]) for s in arrays}
    print(
        f"data: {args.data} {args.size}px {sizes}; {args.sites} sites {args.partition}"
        f"{f' alpha={args.alpha}' if args.partition == 'dirichlet' else ''}; "
        f"{args.rounds} rounds x {args.epochs} local epochs; engine {args.engine}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )

    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "data": sizes}
    print(f"\n{'run':<28}{'acc':>7}{'F1':>7}{'AUROC':>7}{'wall s':>9}{'s/round':>9}")
    if "central" in parts:
        central = report["central"] = run_central(args, arrays, classes, out)
        print(
            f"{'central (' + str(central['epochs']) + ' epochs)':<28}"
            + "".join(f"{_fmt(central['test'][k]):>7}" for k in HEADLINE)
            + f"{central['wall_seconds']:9.1f}{'':>9}"
        )
    fed = None
    if "clean" in parts:
        fed = report["fedavg"] = run_federated(args, arrays, classes, out, "fedavg", None)
    elif args.clean_from:
        fed = clean_from(args.clean_from, args)
    if fed is not None:
        print(
            f"{'fedavg' + ('' if 'clean' in parts else ' (from ' + args.clean_from.name + ')'):<28}"
            + "".join(f"{_fmt(fed['test'][k]):>7}" for k in HEADLINE)
            + f"{fed['wall_seconds']:9.1f}{fed['mean_round_seconds']:9.1f}"
        )
    if "central" in parts and "clean" in parts:
        ratio = report["ratio_fed_over_central"] = fed["wall_seconds"] / central["wall_seconds"]
        print(f"\nwall-time ratio federated / central: {ratio:.2f}")

    if args.attack and "attack" in parts:
        runs = [
            run_federated(args, arrays, classes, out, name, args.attack)
            for name in args.attacked.split(",")
            if name
        ]
        print(
            f"\nattack: {args.attackers} of {args.sites} sites, {args.attack}"
            f"{f' x{args.scale:g}' if args.attack in ('sign_flip', 'scale') else ''}; "
            f"robust rules after mixing={args.mixing}"
        )
        print(f"{'rule':<16}{'acc':>7}{'F1':>7}{'AUROC':>7}{'dF1 vs clean':>14}{'rejected':>10}")
        for run in runs:
            delta = run["test"]["macro_f1"] - fed["test"]["macro_f1"] if fed else float("nan")
            print(
                f"{run['strategy']:<16}"
                + "".join(f"{_fmt(run['test'][k]):>7}" for k in HEADLINE)
                + f"{delta:+14.3f}{run['rejected_updates']:>10}"
            )
        report["attacked"] = runs
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
