"""How well a run's out-of-distribution check tells its own test images from other images.

Reads a finished run directory (`runs/<stamp>-<dataset>/`: `bundle/` and `manifest.parquet`),
loads the bundle as the service does (`serving.engine.DiagnosisEngine`: same decoding, size
checks, preprocessing and calibrated forward pass) and scores
- in distribution: the run's own `test` rows;
- other datasets: images of every other dataset under `--data` (brain_tumor_mri, busi,
  pad_ufes_20 images, cric_pap_smear; the run's own dataset is skipped);
- synthetic junk: blank images (several grey levels), pixel noise, one random pixel upscaled,
  a tiny image, a huge blank image, and the run's test images inverted.

For each source it prints the detector's AUROC (in-distribution test images vs that source)
for three scores: the bundle's Mahalanobis score (when the bundle has its statistics), the
energy score and, as a baseline, 1 − max softmax probability; and the share of the source
the served check flags at its threshold (inputs the service refuses, such as the tiny image,
count as flagged; their AUROC treats them as scoring above everything). Nothing is changed.

    python bench/ood_detection.py .oncoflow/runs/20260101T000000-brain_tumor_mri
    python bench/ood_detection.py RUN_DIR --per-source 100 --json ood.json   # or --json -

Measured (2-core CPU, loaded) on a short run, `oncoflow run dataset=brain_tumor_mri
model=efficientnet_lite0 model.pretrained=true dataset.image_size=64 trainer.max_epochs=1
dataset.max_per_class=150` (val macro-F1 0.38), `--per-source 150 --junk 10`: Mahalanobis
AUROC busi 0.995, pad_ufes_20 0.999, cric_pap_smear 0.988, noise 0.989, inverted 0.868;
energy 0.910 / 0.500 / 0.365 / 0.268 / 0.644; max-softmax below 0.5 on all of them. Blank,
one-pixel-upscaled, tiny and huge blank inputs are refused (422) before scoring. With the
threshold set on validation images the check flagged 26 % of the shifted Testing folder. The
same run with `calibration.fit_on=held_out` (threshold on 146 held-out Testing images) flags
3.6 % of the other 168 test images; Mahalanobis AUROC busi 0.977, pad_ufes_20 1.000,
cric_pap_smear 1.000, noise 0.824, inverted 0.882 (energy 0.41 / 0.44 / 0.10 / 0.18 / 0.39),
but its higher threshold flags only 2 of 10 noise and 2 of 10 inverted images.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATASETS = {  # folder under --data -> where its images are
    "brain_tumor_mri": "**/*.jpg",
    "busi": "**/*.png",
    "pad_ufes_20": "images/*.jpg",
    "cric_pap_smear": "**/*.png",
}
SCORES = ("mahalanobis", "energy", "max_softmax")
BATCH = 64


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def junk(test_files: list[Path], n: int, seed: int) -> dict[str, list[bytes]]:
    """Synthetic inputs no clinician would send as a scan, `n` of each kind (fewer huge ones)."""
    from PIL import Image, ImageOps

    rng = np.random.default_rng(seed)
    side = 256
    out: dict[str, list[bytes]] = {
        "blank": [
            png(np.full((side, side), int(v), np.uint8)) for v in np.linspace(0, 255, n).round()
        ],
        "noise": [png(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)],
        "one_pixel_upscaled": [
            png(np.broadcast_to(rng.integers(0, 256, (1, 1, 3), dtype=np.uint8), (side, side, 3)))
            for _ in range(n)
        ],
        "tiny": [png(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)) for _ in range(n)],
        "huge_blank": [png(np.zeros((7000, 7000), np.uint8))],
        "inverted": [],
    }
    for path in test_files[:n]:
        buffer = io.BytesIO()
        ImageOps.invert(Image.open(path).convert("RGB")).save(buffer, format="PNG")
        out["inverted"].append(buffer.getvalue())
    return out


def score_inputs(engine, blobs: list[bytes]) -> tuple[dict[str, np.ndarray], int, np.ndarray]:
    """Per-score values of the accepted inputs, how many the service refused, and whether the
    served check flags each accepted one."""
    import torch

    from components.calibration.ood import energy_scores, mahalanobis_scores
    from components.errors import OncoflowError
    from serving.engine import _features_and_logits

    rows, refused = [], 0
    for blob in blobs:
        try:
            rows.append(engine.pack(engine.prepare(blob, display=False)))
        except OncoflowError:
            refused += 1
    scores: dict[str, list[np.ndarray]] = {name: [] for name in SCORES}
    flagged: list[np.ndarray] = []
    stats = engine.bundle.ood_stats
    for start in range(0, len(rows), BATCH):
        x = torch.from_numpy(np.concatenate(rows[start : start + BATCH]))
        with torch.inference_mode():
            features, logits = _features_and_logits(engine.model, engine._unpack(x))
        z, f = logits.float().numpy(), features.float().numpy()
        probs = np.exp(z - z.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        scores["energy"].append(energy_scores(z))
        scores["max_softmax"].append(1.0 - probs.max(1))
        if stats:
            scores["mahalanobis"].append(mahalanobis_scores(f, stats["means"], stats["precision"]))
        if engine.ood is not None:
            served = engine.infer_rows(x.numpy())[:, len(engine.classes)]
            flagged.append(engine.ood.is_out(served))
    joined = {k: np.concatenate(v) for k, v in scores.items() if v}
    return joined, refused, np.concatenate(flagged) if flagged else np.zeros(0, bool)


def auroc_with_refusals(inside: np.ndarray, outside: np.ndarray, refused: int) -> float:
    from components.calibration.ood import auroc

    top = max(float(np.max(inside)), float(np.max(outside)) if len(outside) else 0.0) + 1.0
    return auroc(inside, np.concatenate([outside, np.full(refused, top)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--per-source", type=int, default=200, help="images per other dataset")
    parser.add_argument("--junk", type=int, default=20, help="synthetic inputs of each kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the figures as JSON to this file ('-': stdout)")
    args = parser.parse_args(argv)

    import pandas as pd

    from serving.engine import DiagnosisEngine
    from serving.schemas import ModelRef

    started = time.perf_counter()
    engine = DiagnosisEngine.from_dir(
        args.run_dir / "bundle", ModelRef(name="bench", version="", tag="")
    )
    dataset = str(engine.bundle.config.get("dataset", {}).get("name", ""))
    manifest = pd.read_parquet(args.run_dir / "manifest.parquet")
    test_files = [Path(s) for s in manifest.loc[manifest["split"] == "test", "source"]]
    rng = np.random.default_rng(args.seed)

    sources: dict[str, list[bytes]] = {}
    for name, pattern in DATASETS.items():
        if name == dataset or not (args.data / name).is_dir():
            continue
        files = sorted((args.data / name).glob(pattern))
        picked = rng.choice(len(files), min(args.per_source, len(files)), replace=False)
        sources[name] = [files[i].read_bytes() for i in sorted(picked)]
    sources.update(junk(test_files, args.junk, args.seed))

    inside, inside_refused, inside_flagged = score_inputs(
        engine, [p.read_bytes() for p in test_files]
    )
    served = engine.ood.score if engine.ood is not None else None
    result = {
        "run_dir": str(args.run_dir),
        "dataset": dataset,
        "served_score": served,
        "threshold": engine.ood.threshold if engine.ood is not None else None,
        "in_distribution": {
            "n": len(test_files),
            "refused": inside_refused,
            "flagged_rate": float(inside_flagged.mean()) if len(inside_flagged) else None,
        },
        "sources": {},
    }
    for name, blobs in sources.items():
        scores, refused, flagged = score_inputs(engine, blobs)
        row = {"n": len(blobs), "refused": refused}
        for score in inside:
            row[f"auroc_{score}"] = auroc_with_refusals(
                inside[score], scores.get(score, np.zeros(0)), refused
            )
        row["flagged_rate"] = (
            float((flagged.sum() + refused) / len(blobs)) if engine.ood is not None else None
        )
        result["sources"][name] = row
    result["wall_seconds"] = round(time.perf_counter() - started, 1)

    present = [s for s in SCORES if s in inside]
    print(
        f"OOD detection for {args.run_dir.name} (served: {served}, threshold "
        f"{result['threshold']}); in-distribution test images: {len(test_files)}, "
        f"flagged {result['in_distribution']['flagged_rate']}"
    )
    header = f"{'source':22s} {'n':>5s} {'refused':>7s} " + " ".join(
        f"{'AUROC ' + s:>18s}" for s in present
    )
    print(header + f" {'flagged':>8s}")
    for name, row in result["sources"].items():
        flagged = "" if row["flagged_rate"] is None else f"{row['flagged_rate']:.3f}"
        print(
            f"{name:22s} {row['n']:5d} {row['refused']:7d} "
            + " ".join(f"{row[f'auroc_{s}']:18.3f}" for s in present)
            + f" {flagged:>8s}"
        )
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
