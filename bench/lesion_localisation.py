"""Grad-CAM mass inside the lesion on a run's test images, against honest reference maps.

For each model given (a run directory, which holds `manifest.parquet` and `bundle/`, or a bundle
directory with `--manifest`), every image of the split (`--split`, default test) that has a
lesion mask is explained as `/explain` explains it (`components.explain.one_pass`, Grad-CAM of
the predicted class, or with `--target true` of the true class). A fusion model's image branch is
explained with the image's own clinical record held fixed: the manifest's `clin__<feature>`
columns encoded with the bundle's schema. Each mask (`--masks DIR`, file `--mask-name` from the
image's file-name stem; default `../masks/{stem}_mask.png` from the image, PAD-UFES-20's layout) is
decoded (lesion = the brighter of its two colours: PAD's masks are a two-colour viridis
rendering) and resized to the model's input as preprocessing resizes the image.

`components.explain.localisation` then gives, per model: the mean (median) share of Grad-CAM
mass inside the lesion, the masks' mean area share, the mean share of smooth random heatmaps
(smoothing matched to the CAM layer's grid), the mean share of other patients' Grad-CAM maps on
this image's mask (the method's centre and size bias without this image), the share of the same
architecture re-initialised (`untrained`: what the image alone draws Grad-CAM to; `--no-control`
skips it), and the differences with bootstrap intervals over patients (`group` column) or images.

    python bench/lesion_localisation.py RUN_DIR [RUN_DIR ...]
    python bench/lesion_localisation.py RUN_DIR OTHER/bundle --masks DATA/pad_ufes_20/masks \\
        --json localisation.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

CLINICAL_PREFIX = "clin__"  # the manifest's clinical columns (docs: issue 16 contract)
MASK_NAME = "{stem}_mask.png"


@dataclass(frozen=True)
class ModelSource:
    """Where one model and the split it is scored on come from."""

    name: str
    bundle: Path
    manifest: Path


def resolve(paths: list[Path], manifest: Path | None) -> list[ModelSource]:
    """Run directories (manifest.parquet + bundle/) or bundle directories (need `manifest`)."""
    sources = []
    for path in paths:
        if (path / "bundle" / "bundle.json").is_file():
            rows = manifest or path / "manifest.parquet"
            sources.append(ModelSource(path.name, path / "bundle", rows))
        elif (path / "bundle.json").is_file():
            if manifest is None:
                raise SystemExit(f"{path} is a bundle: give --manifest with the split to score")
            sources.append(ModelSource(path.parent.name or path.name, path, manifest))
        else:
            raise SystemExit(f"{path} is neither a run directory nor a model bundle")
    for source in sources:
        if not source.manifest.is_file():
            raise SystemExit(f"no manifest at {source.manifest}")
    return sources


def load_mask(path: Path) -> np.ndarray:
    """Boolean lesion mask: pixels nearer the brighter of the image's grey levels (0/1, 0/255
    and two-colour colour-mapped masks alike)."""
    from PIL import Image

    with Image.open(path) as image:
        grey = np.asarray(image.convert("L"), dtype=np.float32)
    low, high = float(grey.min()), float(grey.max())
    if high <= low:
        raise ValueError(
            f"mask {path.name} has a single grey level: lesion and skin not told apart"
        )
    return grey >= (low + high) / 2


def mask_path(source: str, masks: Path | None, pattern: str) -> Path:
    """The mask of the image at `source`: `pattern` (fields {stem}, {name}) in `masks`, by
    default the `masks` folder beside the image's folder (PAD-UFES-20: images/, masks/)."""
    image = Path(source)
    folder = masks if masks is not None else image.parent.parent / "masks"
    return folder / pattern.format(stem=image.stem, name=image.name)


def encode_records(rows, schema: list[dict]) -> np.ndarray:
    """float32 (N, D): the rows' `clin__*` values typed by `schema` and encoded by its layout
    (missing values stay missing: the model imputes them as in training)."""
    from components.models.tabular import TabularLayout
    from validation.clinical_schema import is_missing, parse_schema, parse_value

    features = parse_schema(schema)
    absent = [f.name for f in features if CLINICAL_PREFIX + f.name not in rows.columns]
    if absent:
        raise SystemExit(f"the manifest has no clinical column for features {absent}")
    columns = [CLINICAL_PREFIX + f.name for f in features]
    cells = rows[columns].astype(object)
    cells = cells.where(cells.notna(), None)  # NaN, NA and None alike: missing
    records = [
        {
            f.name: None if is_missing(v) else parse_value(f, v)
            for f, v in zip(features, values, strict=True)
        }
        for values in cells.itertuples(index=False, name=None)
    ]
    return TabularLayout.from_schema(schema).encode_rows(records)


def cam_cell(model, inputs: tuple) -> float:
    """Input pixels per cell of the last CAM layer's grid (the scale Grad-CAM is smooth on)."""
    import torch

    shapes: list[tuple[int, int]] = []
    hook = model.cam_target_layers()[-1].register_forward_hook(
        lambda _m, _i, output: shapes.append(tuple(output.shape[-2:]))
    )
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        hook.remove()
    size = inputs[0].shape[-2:]
    return float(np.mean([size[0] / shapes[-1][0], size[1] / shapes[-1][1]]))


def score_model(source: ModelSource, args) -> dict:
    """Per-image Grad-CAM shares and their summary for one model."""
    import pandas as pd
    import torch

    from components.bundle import ModelBundle
    from components.data.images import open_image
    from components.explain import localisation as loc
    from components.explain.faithfulness import randomised_copy
    from components.explain.one_pass import explain_image

    bundle = ModelBundle.load(source.bundle)
    if bundle.architecture == "tabular_mlp":
        raise SystemExit(f"{source.name}: a tabular model has no image to localise")
    fusion = bundle.architecture == "fusion"
    model = bundle.build_model().eval()
    untrained = randomised_copy(model, "full", seed=args.seed) if args.control else None
    manifest = pd.read_parquet(source.manifest)
    rows = manifest[manifest["split"] == args.split]
    if rows.empty:
        raise SystemExit(f"{source.manifest} has no {args.split!r} split")
    paths = [mask_path(str(s), args.masks, args.mask_name) for s in rows["source"]]
    has_mask = np.array([p.is_file() for p in paths])
    if not has_mask.any():
        raise SystemExit(f"no mask found (e.g. {paths[0]}) for the {args.split} images")
    rows = rows[has_mask]
    paths = [p for p, keep in zip(paths, has_mask, strict=True) if keep]
    records = encode_records(rows, bundle.tabular_schema or []) if fusion else None
    classes = {name: i for i, name in enumerate(bundle.class_names)}
    size = bundle.preprocessing.size
    heatmaps = np.zeros((len(rows), size, size), dtype=np.float32)
    masks = np.zeros((len(rows), size, size), dtype=bool)
    control = np.zeros_like(heatmaps)
    correct = 0
    cell = None
    started = time.perf_counter()
    for i, (src, label, path) in enumerate(zip(rows["source"], rows["label"], paths, strict=True)):
        x = bundle.preprocessing.to_tensor(open_image(str(src)))
        record = torch.from_numpy(records[i]) if fusion else None
        if cell is None:
            batch = (x[None], record[None]) if fusion else (x[None],)
            cell = cam_cell(model, batch)
        target = classes.get(str(label)) if args.target == "true" else None
        explained = explain_image(model, x, shap=False, tabular=record, target_class=target)
        correct += int(bundle.class_names[explained.target_class] == str(label))
        heatmaps[i] = explained.cam.heatmap
        if untrained is not None:  # the same class, explained by the re-initialised model
            chosen = explained.target_class
            control[i] = explain_image(
                untrained, x, shap=False, tabular=record, target_class=chosen
            ).cam.heatmap
        masks[i] = loc.resize_mask(load_mask(path), size)
        if args.progress and (i + 1) % args.progress == 0:
            print(f"  {source.name}: {i + 1}/{len(rows)}", flush=True)
    groups = list(rows["group"].astype(str)) if "group" in rows.columns else None
    sigma = cell / math.sqrt(6.0)  # a Gaussian as wide as bilinear's tent over one cell
    maps = loc.random_heatmaps((size, size), args.draws, sigma, seed=args.seed)
    baselines = {
        "area": masks.reshape(len(masks), -1).mean(axis=1),
        "random": loc.random_shares(masks, maps),
        "swapped": loc.swapped_shares(heatmaps, masks, groups),
    }
    if untrained is not None:
        baselines["untrained"] = [loc.mask_share(h, m) for h, m in zip(control, masks, strict=True)]
    shares = [loc.mask_share(h, m) for h, m in zip(heatmaps, masks, strict=True)]
    summary = loc.summarise(shares, baselines, groups, boot=args.boot, seed=args.seed)
    image_architecture = bundle.architecture_kwargs.get("image_architecture")
    return {
        "model": source.name,
        "architecture": bundle.architecture
        + (f"+{image_architecture}" if fusion and image_architecture else ""),
        "split": args.split,
        # which images were scored: models compared on one split must show the same digest
        "split_digest": hashlib.sha256(
            "\n".join(sorted(map(str, rows["id"]))).encode()
        ).hexdigest()[:16],
        "images_without_mask": int((~has_mask).sum()),
        "target": args.target,
        "correct_share": correct / len(rows) if args.target == "predicted" else None,
        "input_size": size,
        "cam_cell_pixels": cell,
        "random_maps": {"draws": args.draws, "sigma_pixels": sigma},
        "grouped_by": "patient (group)" if groups is not None else "image",
        "wall_seconds": round(time.perf_counter() - started, 1),
        **summary,
    }


BASELINES = ("area", "random", "swapped", "untrained")
WIDTH = 56  # the model column


def table(results: list[dict]) -> str:
    """Two tables: the means per model, then share − baseline with its bootstrap interval."""
    level = f"{results[0]['level']:.0%}" if results else "95%"
    names = {r["model"]: f"{r['model']} [{r['architecture']}]"[:WIDTH] for r in results}
    means = [
        f"{'model':<{WIDTH}} {'n':>4} {'share':>6} {'median':>6} "
        + " ".join(f"{b:>9}" for b in BASELINES)
    ]
    gaps = [
        f"{'share - baseline, ' + level + ' CI':<{WIDTH}} "
        + " ".join(f"{b:>24}" for b in BASELINES[1:])
    ]
    for r in results:
        if not r.get("n"):
            means.append(f"{names[r['model']]:<{WIDTH}} {0:>4}  (no image with a non-flat map)")
            continue
        means.append(
            f"{names[r['model']]:<{WIDTH}} {r['n']:>4} "
            f"{r['share_mean']:>6.3f} {r['share_median']:>6.3f} "
            + " ".join(
                f"{r[b + '_mean']:>9.3f}" if b + "_mean" in r else f"{'-':>9}" for b in BASELINES
            )
        )

        def ci(name: str, r: dict = r) -> str:
            d = r.get(f"minus_{name}")
            return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d else "-"

        gaps.append(
            f"{names[r['model']]:<{WIDTH}} " + " ".join(f"{ci(b):>24}" for b in BASELINES[1:])
        )
    notes = [
        f"{r['model']}: {r['flat']} flat map(s) left out, {r['images_without_mask']} image(s) "
        f"without a mask; intervals over {r['groups']} {r['grouped_by']} units"
        for r in results
    ]
    digests = {r.get("split_digest") for r in results}
    if len(digests) > 1:
        notes.append(
            "WARNING: the models were scored on different images (split digests "
            + ", ".join(f"{r['model']} {r['split_digest']}" for r in results)
            + "): compare models only on one test split that none of them trained on"
        )
    return "\n".join([*means, "", *gaps, "", *notes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", type=Path, nargs="+", help="run directories or bundles")
    parser.add_argument("--manifest", type=Path, help="split to score (default: each run's)")
    parser.add_argument("--masks", type=Path, help="mask folder (default: ../masks of each image)")
    parser.add_argument("--mask-name", default=MASK_NAME, help="file name from {stem} / {name}")
    parser.add_argument("--split", default="test")
    parser.add_argument("--target", choices=("predicted", "true"), default="predicted")
    parser.add_argument("--draws", type=int, default=1000, help="random heatmaps")
    parser.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-control",
        dest="control",
        action="store_false",
        help="skip the re-initialised model's maps (halves the time)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--progress", type=int, default=0, help="print every N images")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    results = [score_model(source, args) for source in resolve(args.models, args.manifest)]
    print(table(results))
    if args.json:
        command = " ".join(["python bench/lesion_localisation.py", *(argv or sys.argv[1:])])
        args.json.write_text(json.dumps({"command": command, "results": results}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
