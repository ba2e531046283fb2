"""Near-duplicates, groups and proximity of one image folder's splits (ingest + split only).

    python bench/leakage_report.py dataset=busi [OVERRIDES...]
    python bench/leakage_report.py dataset=brain_tumor_mri dataset.split.group_by=none
    python bench/leakage_report.py --data /path/to/<class>/folders [OVERRIDES...]

Ingests `--data` (default: the composed `dataset.root`) with the folder adapter (the decode
cache under `--cache` makes a rerun cheap), splits it as the pipeline's split step does with
the composed config's `dataset.split` (and `calibration.fit_on=held_out` when given), and
prints the split report's summary and leakage certificate as JSON; `--montage FILE` also
draws the example pairs.
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


def main(argv: list[str] | None = None) -> dict:
    from components.config import compose, to_container
    from components.data.ingest import ingest_folder
    from components.data.near_duplicates import example_montage
    from components.data.splits import LeakageSettings, assign_splits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="<class>/ or <split>/<class>/ folders")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/oncoflow-leakage-cache"))
    parser.add_argument("--montage", type=Path, help="write example pairs to this PNG")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. seed=1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    preset = [] if any(o.startswith("dataset=") for o in args.overrides) else ["dataset=synthetic"]
    cfg = to_container(compose([*preset, *args.overrides]))
    split, calibration = cfg["dataset"]["split"], cfg["calibration"]
    data = args.data or Path(cfg["dataset"]["root"])
    started = time.perf_counter()
    frame = ingest_folder(data, cache_dir=args.cache)
    ingested = time.perf_counter()
    held_out = calibration["fit_on"] == "held_out"
    _, report = assign_splits(
        frame,
        keep_given=split["keep_given"],
        val_fraction=split["val_fraction"],
        test_fraction=split["test_fraction"],
        seed=cfg["seed"],
        leakage=LeakageSettings.from_config(split),
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
    return result


if __name__ == "__main__":
    main()
