"""Training throughput: oncoflow's Lightning path vs a plain PyTorch loop, same everything else.

For each architecture the same initial weights are trained on the same data, with the same
data loaders (uint8 arrays -> collate + normalise), optimiser (AdamW + cosine), batch size and
number of epochs, augmentation off, validation after every epoch in both. Reported:
training images/s (training batches only, validation excluded), end-to-end wall time, and
the Lightning/plain ratio of images/s (1.0 = no overhead). torch uses 1 CPU thread by default
(`--threads 0` for torch's own default): on a shared 2-core machine two OpenMP threads per
process are many times slower than one. Timings on a shared machine are noisy; `--repeats N`
alternates the two paths N times and keeps each one's best.

    python bench/train_throughput.py                       # synthetic, small_cnn + resnet18, 64 px
    python bench/train_throughput.py --data busi --n 256   # a real-data subsample
    python bench/train_throughput.py --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

REAL_DATA = {
    # name: (glob below the dataset root, class folders)
    "busi": ("{cls}/*.png", ["benign", "malignant", "normal"]),
    "brain_tumor_mri": (
        "Training/{cls}/*.jpg",
        ["glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor"],
    ),
}


def synthetic_data(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Noise images with a bright square in the left or right half (class = side)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(70, 20, size=(n, 3, size, size)).clip(0, 255).astype(np.uint8)
    y = rng.integers(0, 2, size=n).astype(np.int64)
    side = size // 4
    for i in range(n):
        top = rng.integers(0, size - side)
        left = rng.integers(0, size // 2 - side) + (size // 2 if y[i] else 0)
        x[i, :, top : top + side, left : left + side] = 220
    return x, y, ["left", "right"]


def real_data(name: str, root: Path, n: int, size: int, seed: int):
    """A class-balanced subsample of a real dataset, resized with the project's Preprocessing."""
    from PIL import Image

    from components.data.preprocess import Preprocessing

    pattern, classes = REAL_DATA[name]
    prep = Preprocessing(size=size, channels=3)
    rng = np.random.default_rng(seed)
    images, labels = [], []
    per_class = max(1, n // len(classes))
    for label, cls in enumerate(classes):
        files = sorted((root / name).glob(pattern.format(cls=cls)))
        if not files:
            raise SystemExit(f"no images for class {cls!r} under {root / name}")
        for path in rng.permutation(files)[:per_class]:
            with Image.open(path) as image:
                images.append(prep.to_uint8(image))
            labels.append(label)
    order = rng.permutation(len(labels))
    return np.stack(images)[order], np.asarray(labels, dtype=np.int64)[order], classes


def plain_loop(model, data, *, epochs: int, lr: float, weight_decay: float, device) -> dict:
    """The reference: a hand-written PyTorch loop over the same data loaders."""
    import torch
    import torch.nn.functional as F

    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    train_loader, val_loader = data.train_dataloader(), data.val_dataloader()
    train_seconds, images = 0.0, 0
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        t0 = time.perf_counter()
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            images += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - t0
        scheduler.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_loader:
                correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
    wall = time.perf_counter() - start
    return {"images_per_second": images / train_seconds, "wall_seconds": wall}


def lightning_path(model, arrays, prep, *, epochs, batch_size, lr, weight_decay, seed, accelerator):
    from components.training.central import train_classifier

    with tempfile.TemporaryDirectory(prefix="oncoflow-bench-") as tmp:
        start = time.perf_counter()
        result = train_classifier(
            model,
            arrays["train"],
            arrays["val"],
            prep,
            max_epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            early_stopping_patience=epochs + 1,
            imbalance="none",
            augment=False,
            seed=seed,
            out_dir=Path(tmp),
            deterministic=False,
            accelerator=accelerator,
        )
        wall = time.perf_counter() - start
    return {"images_per_second": result.images_per_second, "wall_seconds": wall}


def bench_one(arch: str, arrays, prep, num_classes: int, args) -> dict:
    import torch

    from components.models import build_model
    from components.training.datamodule import ArrayDataModule

    torch.manual_seed(args.seed)
    base = build_model(arch, num_classes=num_classes, in_channels=3, width=args.width)
    device = torch.device(
        "cuda" if args.accelerator != "cpu" and torch.cuda.is_available() else "cpu"
    )
    data = ArrayDataModule(
        arrays["train"],
        arrays["val"],
        prep,
        num_classes=num_classes,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    # warm-up (allocator, kernels) outside both timings
    warm = copy.deepcopy(base).to(device).train()
    x, _ = next(iter(data.train_dataloader()))
    warm(x.to(device)).sum().backward()
    del warm

    common = {"lr": args.lr, "weight_decay": args.weight_decay}
    plains, lits = [], []
    for _ in range(args.repeats):  # alternate the two paths; keep each one's best run
        plains.append(
            plain_loop(copy.deepcopy(base), data, epochs=args.epochs, device=device, **common)
        )
        lits.append(
            lightning_path(
                copy.deepcopy(base),
                arrays,
                prep,
                epochs=args.epochs,
                batch_size=args.batch_size,
                seed=args.seed,
                accelerator=args.accelerator,
                **common,
            )
        )
    plain = max(plains, key=lambda r: r["images_per_second"])
    lit = max(lits, key=lambda r: r["images_per_second"])
    return {
        "architecture": arch,
        "device": str(device),
        "plain": plain,
        "lightning": lit,
        "ratio_images_per_second": lit["images_per_second"] / plain["images_per_second"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["small_cnn", "resnet18"])
    parser.add_argument("--data", default="synthetic", choices=["synthetic", *REAL_DATA])
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--n", type=int, default=96, help="training images")
    parser.add_argument("--n-val", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--width", type=int, default=16, help="small_cnn base width")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs per path (best is kept)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: robust on a shared machine; 0 = torch's default)",
    )
    parser.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--json", type=Path, default=None, help="write results to this file")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING)
    import torch

    from components.data.preprocess import Preprocessing

    if args.threads:
        torch.set_num_threads(args.threads)
    total = args.n + args.n_val
    if args.data == "synthetic":
        x, y, classes = synthetic_data(total, args.size, args.seed)
    else:
        x, y, classes = real_data(args.data, args.data_root, total, args.size, args.seed)
    arrays = {"train": (x[: args.n], y[: args.n]), "val": (x[args.n :], y[args.n :])}
    prep = Preprocessing(size=args.size, channels=3)

    rows = [bench_one(arch, arrays, prep, len(classes), args) for arch in args.archs]
    print(
        f"\ndata={args.data} train={len(arrays['train'][1])} val={len(arrays['val'][1])} "
        f"size={args.size} epochs={args.epochs} batch={args.batch_size} "
        f"torch threads={torch.get_num_threads()} cpus={os.cpu_count()}"
    )
    header = f"{'architecture':<20}{'device':<8}{'plain img/s':>12}{'lightning img/s':>17}"
    header += f"{'ratio':>8}{'plain wall s':>14}{'lightning wall s':>18}"
    print(header)
    for row in rows:
        print(
            f"{row['architecture']:<20}{row['device']:<8}"
            f"{row['plain']['images_per_second']:>12.1f}{row['lightning']['images_per_second']:>17.1f}"
            f"{row['ratio_images_per_second']:>8.2f}"
            f"{row['plain']['wall_seconds']:>14.1f}{row['lightning']['wall_seconds']:>18.1f}"
        )
    if args.json:
        payload = {
            "benchmark": "train_throughput",
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "python": platform.python_version(),
            "results": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
