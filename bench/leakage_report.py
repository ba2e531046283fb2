"""Near-duplicates, groups and proximity of one image folder's splits (ingest + split only),
or of an already trained run's splits with its test score without near-matched images.

    python bench/leakage_report.py dataset=busi [OVERRIDES...]
    python bench/leakage_report.py dataset=brain_tumor_mri dataset.split.group_by=none
    python bench/leakage_report.py --data /path/to/<class>/folders [OVERRIDES...]
    python bench/leakage_report.py --run WORKSPACE/runs/<stamp>-<dataset> [--json OUT]

Ingests `--data` (default: the composed `dataset.root`) with the folder adapter (the decode
cache under `--cache` makes a rerun cheap), splits it as the pipeline's split step does with
the composed config's `dataset.split` (and `calibration.fit_on=held_out` when given), and
prints the split report's summary and leakage certificate as JSON; `--montage FILE` also
draws the example pairs.

`--run RUN_DIR` trains and splits nothing: it reads the run's `manifest.parquet` (the splits
it was trained on), finds the held-out images with a training image correlating at least
`dataset.split.match_similarity` (the bundle's config, else the schema default) with the
split step's own `proximity`, scores the run's bundle (its calibration applied, as the
evaluate step does) on the whole test split and on the test images without a near-match,
and prints both rows, the near-duplicate pairs across the final splits, whether the run's
split kept near-duplicates together as the current split code does, and how the figures
compare with what the run recorded itself. `--json OUT` writes the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_report(run_dir: Path, cache: Path) -> dict:
    """The leakage certificate's view of an already trained run (see the module docstring)."""
    from dataclasses import asdict

    from components.bundle import ModelBundle
    from components.calibration.record import Calibration
    from components.config import SplitConf
    from components.data import manifest
    from components.data.cache import load_split_arrays
    from components.data.splits import LeakageSettings, near_duplicate_labels, proximity
    from components.evaluation.leakage import clean_subset_metrics
    from components.evaluation.metrics import evaluate
    from components.evaluation.predict import predict_proba

    bundle = ModelBundle.load(run_dir / "bundle")
    dataset = (bundle.config or {}).get("dataset", {})
    recorded = dataset.get("split") or {}
    split_conf = {**asdict(SplitConf()), **recorded}
    settings = LeakageSettings.from_config(split_conf)
    frame = manifest.load(run_dir / "manifest.parquet")
    placed = frame[(frame["split"] != "") & (frame["decode_error"] == "")].reset_index(drop=True)
    block, near_ids = proximity(placed, settings)

    test = load_split_arrays(
        placed[placed["split"] == "test"],
        bundle.class_names,
        bundle.preprocessing,
        cache,
        schema=bundle.tabular_schema,
    )["test"]
    probs = predict_proba(bundle.build_model(), test, bundle.preprocessing)
    calibration = Calibration.from_dict(bundle.calibration)
    if calibration is not None:
        probs = calibration.recalibrate(probs)
    classes = list(bundle.class_names)
    full = evaluate(test.y, probs, classes, dangerous=dataset.get("dangerous") or [])
    scores = clean_subset_metrics(test.ids, test.y, probs, classes, set(near_ids), full)

    groups = near_duplicate_labels(placed, settings.near_similarity)
    spread = placed.groupby(groups.to_numpy())["split"].nunique()
    across = spread[spread > 1].index
    own = _read_json(run_dir / "split_report.json")
    return {
        "run": str(run_dir),
        "dataset": dataset.get("name", ""),
        "architecture": bundle.architecture,
        "calibration": None
        if calibration is None
        else {"method": calibration.method, "temperature": calibration.temperature},
        "split_settings": {
            "used": split_conf,
            "schema_defaults_for": sorted(set(split_conf) - set(recorded)),
            "current_defaults": _current_split_defaults(dataset.get("name", "")),
        },
        "images": {str(k): int(v) for k, v in placed["split"].value_counts().items()},
        "rows_without_thumbnail": int((placed["thumbnail"].astype(str) == "").sum()),
        "proximity": block,
        **scores,
        "near_duplicate_grouping": {
            "in_run_split": bool(own.get("near_duplicates")),
            "groups_across_final_splits": len(across),
            "images_in_them": int(groups.isin(across).sum()),
        },
        "recorded": _recorded(run_dir, own, scores),
    }


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _current_split_defaults(name: str) -> dict | None:
    """`dataset.split` as the current config composes it for the run's dataset (None when
    the preset no longer exists)."""
    from components.config import PROJECT_ROOT, compose, to_container

    if not name or not (PROJECT_ROOT / "conf" / "dataset" / f"{name}.yaml").exists():
        return None
    return to_container(compose([f"dataset={name}"]))["dataset"]["split"]


def _recorded(run_dir: Path, own_split: dict, scores: dict) -> dict:
    """What the run recorded itself beside what was recomputed: its test metrics, its split
    report's near-matched test count and, for runs made since the certificate existed, its
    `leakage` block (largest absolute difference over the headline metrics of both rows)."""
    metrics = _read_json(run_dir / "test_metrics.json")
    summary = _read_json(run_dir / "summary.json")
    out = {
        "quarantined": summary.get("quarantined"),
        "split_report_test_near_matched": (
            own_split.get("proximity", {}).get("splits", {}).get("test", {}).get("near_matched")
        ),
        "test_metrics_max_abs_difference": _max_difference(metrics, scores["test_full"]),
    }
    leakage = metrics.get("leakage")
    if leakage:
        out["leakage_test_near_matched"] = leakage.get("test_near_matched")
        out["leakage_max_abs_difference"] = max(
            _max_difference(leakage.get(row) or {}, scores.get(row) or {})
            for row in ("test_full", "test_without_near_matches")
        )
    return out


def _max_difference(recorded: dict, computed: dict) -> float:
    """Largest absolute difference over the metrics both hold as numbers (nan: none shared)."""
    shared = [
        abs(float(recorded[k]) - float(v))
        for k, v in computed.items()
        if isinstance(v, int | float) and isinstance(recorded.get(k), int | float)
    ]
    return max(shared) if shared else float("nan")


def _lines(result: dict) -> list[str]:
    """The `--run` report as text."""
    from components.evaluation.leakage import HEADLINE

    near = result["test_near_matched"]
    rows = [("all test images", result["test_images"], result["test_full"])]
    if "test_without_near_matches" in result:
        rows.append(
            (
                "without near-matches",
                result["test_images"] - near,
                result["test_without_near_matches"],
            )
        )
    prox = result["proximity"]
    settings = result["split_settings"]["used"]
    lines = [
        f"run {result['run']} ({result['dataset']}, {result['architecture']}, calibration "
        + (
            f"{result['calibration']['method']} T={result['calibration']['temperature']:.3f})"
            if result["calibration"]
            else "none)"
        ),
        f"{'test split':<22}{'n':>5}" + "".join(f"{k:>19}" for k in HEADLINE),
    ]
    for name, n, values in rows:
        cells = "".join(
            f"{'-' if values.get(k) is None else format(values[k], '.4f'):>19}" for k in HEADLINE
        )
        lines.append(f"{name:<22}{n:>5}{cells}")
    shares = ", ".join(f"{s} {v['near_matched']}/{v['images']}" for s, v in prox["splits"].items())
    pairs = prox["near_duplicate_pairs_by_final_split"]
    crossing = {k: v for k, v in pairs.items() if len(set(k.split("/"))) > 1}
    lines += [
        f"near-matched to a training image (similarity >= {prox['min_similarity']}): {shares}",
        f"near-duplicate pairs (similarity >= {settings['near_similarity']}) by final split "
        f"pair: {', '.join(f'{k} {v}' for k, v in pairs.items()) or 'none'}; across splits: "
        f"{sum(crossing.values())}",
    ]
    grouping = result["near_duplicate_grouping"]
    if not grouping["in_run_split"]:
        lines.append(
            "NOTE: this run predates near-duplicate grouping in the split: the current split code "
            f"would keep {grouping['groups_across_final_splits']} groups "
            f"({grouping['images_in_them']} images) that span its splits in one split"
        )
    else:
        lines.append(
            "the run's split kept near-duplicates together: "
            f"{grouping['groups_across_final_splits']} groups span its final splits"
        )
    current = result["split_settings"]["current_defaults"]
    if current is not None:
        changed = {k: (v, current.get(k)) for k, v in settings.items() if current.get(k) != v}
        lines.append(
            "split settings "
            + (
                "as the current defaults"
                if not changed
                else "differ from the current defaults: "
                + ", ".join(f"{k} {a} (now {b})" for k, (a, b) in changed.items())
            )
        )
    recorded = result["recorded"]
    lines.append(
        f"against the run's own records: test_metrics.json differs by at most "
        f"{recorded['test_metrics_max_abs_difference']:.2g}; its split report counted "
        f"{recorded['split_report_test_near_matched']} near-matched test images "
        f"({recorded['quarantined']} rows quarantined after the split are not in the manifest)"
    )
    if "leakage_max_abs_difference" in recorded:
        lines.append(
            f"its leakage block: {recorded['leakage_test_near_matched']} near-matched, "
            f"headline rows differ by at most {recorded['leakage_max_abs_difference']:.2g}"
        )
    return lines


def main(argv: list[str] | None = None) -> dict:
    from components.config import compose, to_container
    from components.data.ingest import ingest_folder
    from components.data.near_duplicates import example_montage
    from components.data.patients import with_name_patients
    from components.data.splits import split_by_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="<class>/ or <split>/<class>/ folders")
    parser.add_argument("--run", type=Path, help="a trained run's directory (no ingest, no split)")
    parser.add_argument("--json", type=Path, help="also write the result to this JSON file")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/oncoflow-leakage-cache"))
    parser.add_argument("--montage", type=Path, help="write example pairs to this PNG")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. seed=1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if args.run is not None:
        if args.data or args.montage or args.overrides:
            parser.error(
                "--run reads the run's own manifest and config: no --data, --montage or overrides"
            )
        result = run_report(args.run, args.cache)
        print("\n".join(_lines(result)))
        _write(args.json, result)
        return result

    preset = [] if any(o.startswith("dataset=") for o in args.overrides) else ["dataset=synthetic"]
    cfg = to_container(compose([*preset, *args.overrides]))
    split, calibration = cfg["dataset"]["split"], cfg["calibration"]
    data = args.data or Path(cfg["dataset"]["root"])
    started = time.perf_counter()
    frame = ingest_folder(data, cache_dir=args.cache)
    if cfg["dataset"]["patient_from_name"]:
        frame = with_name_patients(frame, cfg["dataset"]["patient_from_name"])
    ingested = time.perf_counter()
    held_out = calibration["fit_on"] == "held_out"
    _, report = split_by_config(
        frame,
        split,
        cfg["seed"],
        calibration_fraction=calibration["held_out_fraction"] if held_out else 0.0,
    )
    done = time.perf_counter()
    if args.montage:
        example_montage(report.example_pairs, args.montage)
    result = {
        "data": str(data),
        "images": len(frame),
        "ingest_seconds": round(ingested - started, 2),
        "split_seconds": round(done - ingested, 2),
        "summary": report.summary(),
        "certificate": report.certificate(),
        "final_counts": {s: sum(c.values()) for s, c in report.final_counts.items()},
    }
    print(json.dumps(result, indent=2))
    _write(args.json, result)
    return result


def _write(path: Path | None, result: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
