"""Test-time augmentation (TTA) on a finished run's validation split (test: only when asked).

Scores the run's bundle (uncalibrated, as model selection sees it) on its validation images as
they are and with the logits averaged over test-time views (`dataset.tta`, the code the
pipeline and the service run), and prints macro-F1, macro AUROC, balanced accuracy and ECE for
each scheme:

- ``none``: the image as it is (``dataset.tta=[]``);
- ``hflip``: the image and its mirror image (``[hflip]``, only where the dataset allows
  flips, its ``dataset.hflip``);
- ``crops``: the image and a centre crop of ``--crop`` of its side, resized back (the
  training recipe's random-resized crops at test time), and where flips are allowed their
  mirror images (``[crop, hflip]``).

Each view costs one more forward pass per image at serving time: a scheme is worth keeping only
if validation says so by more than its noise (bootstrap CI of the macro-F1 difference).
``--split test`` reports, once a scheme has been chosen on validation, what it does on the
run's test split (uncalibrated); it is not for choosing.

    python bench/tta.py RUN_DIR [--crop 0.875] [--split val|test] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


SCHEMES = {"none": (), "hflip": ("hflip",), "crops": ("crop", "hflip")}


def scheme_views(scheme: str, hflip: bool) -> tuple[str, ...]:
    """The `dataset.tta` list a scheme stands for, without mirror images where not allowed."""
    return tuple(v for v in SCHEMES[scheme] if hflip or v != "hflip")


def macro_f1_gain_ci(y, p_base, p_tta, classes, rounds: int = 1000, seed: int = 0) -> list[float]:
    """95 % bootstrap interval of macro-F1(tta) - macro-F1(base) over resampled images."""
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(seed)
    labels = list(range(len(classes)))
    gains = []
    for _ in range(rounds):
        i = rng.integers(0, len(y), len(y))
        gains.append(
            f1_score(y[i], p_tta[i].argmax(1), labels=labels, average="macro", zero_division=0)
            - f1_score(y[i], p_base[i].argmax(1), labels=labels, average="macro", zero_division=0)
        )
    return [float(np.percentile(gains, 2.5)), float(np.percentile(gains, 97.5))]


def measure(run_dir: Path, crop: float, cache: Path, split: str = "val") -> dict:
    from dataclasses import replace

    from components.bundle import ModelBundle
    from components.data import manifest
    from components.data.cache import load_split_arrays
    from components.evaluation.metrics import evaluate
    from components.evaluation.predict import predict_proba

    bundle = ModelBundle.load(run_dir / "bundle")
    dataset = (bundle.config or {}).get("dataset", {})
    hflip = bool(dataset.get("hflip", True))
    frame = manifest.load(run_dir / "manifest.parquet")
    rows = frame[(frame["split"] == split) & (frame["decode_error"] == "")]
    val = load_split_arrays(
        rows, bundle.class_names, bundle.preprocessing, cache, schema=bundle.tabular_schema
    ).get(split)
    if val is None or val.x is None or not len(val):
        raise SystemExit(f"{run_dir} has no {split} images")
    model = bundle.build_model()
    classes = list(bundle.class_names)
    out: dict = {
        "run": str(run_dir),
        "split": split,
        "images": len(val),
        "hflip_allowed": hflip,
        "crop": crop,
    }
    probs = {}
    for scheme in SCHEMES:
        if scheme == "hflip" and not hflip:
            continue
        pre = replace(bundle.preprocessing, tta=scheme_views(scheme, hflip), tta_crop=crop)
        probs[scheme] = predict_proba(model, val, pre)
        metrics = evaluate(val.y, probs[scheme], classes)
        out[scheme] = {
            "views": pre.view_count,
            "dataset.tta": list(pre.tta),
            **{k: metrics[k] for k in ("macro_f1", "macro_auroc", "balanced_accuracy", "ece")},
        }
        if scheme != "none":
            out[scheme]["macro_f1_gain_ci95"] = macro_f1_gain_ci(
                val.y, probs["none"], probs[scheme], classes
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run directory")
    parser.add_argument("--crop", type=float, default=0.875, help="centre crop, share of side")
    parser.add_argument("--cache", type=Path, default=None, help="decode cache (default: temp)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument(
        "--split", choices=("val", "test"), default="val", help="test: report a choice only"
    )
    args = parser.parse_args(argv)
    if not 0.5 <= args.crop < 1.0:
        parser.error("--crop must lie in [0.5, 1)")
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.run_dir, args.crop, args.cache or Path(tmp), args.split)
    note = "(test split not read)" if args.split == "val" else "(report only: choose on val)"
    print(f"{result['run']}: {result['images']} {args.split} images {note}")
    header = ("scheme", "views", "macro-F1", "AUROC", "bal.acc", "ECE")
    print("{:8} {:>5} {:>9} {:>7} {:>8} {:>6}  gain CI95".format(*header))
    for scheme in ("none", "hflip", "crops"):
        if scheme in result:
            r = result[scheme]
            ci = r.get("macro_f1_gain_ci95")
            print(
                f"{scheme:8} {r['views']:>5} {r['macro_f1']:>9.4f} {r['macro_auroc']:>7.4f} "
                f"{r['balanced_accuracy']:>8.4f} {r['ece']:>6.4f}  "
                + (f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")
            )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
