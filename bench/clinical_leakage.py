"""Label-leakage scores of a clinical dataset's features, as the validation step computes them.

    python bench/clinical_leakage.py dataset=pad_ufes_20
    python bench/clinical_leakage.py dataset=pad_ufes_20 --put-back biopsed:bool
    python bench/clinical_leakage.py dataset=cervical_risk_uci \
        --put-back Hinselmann:bool Schiller:bool Cytology:bool

Ingests the composed dataset (`adapter: table`), splits it as the pipeline does, and scores
every feature on the development rows (all but test and calibration) with
`validation.leakage.leakage_scores`; `--put-back COLUMN:TYPE` scores an excluded column as if
it were a feature of that type. Prints one line per feature, highest score first, then the
reason of every feature above `dataset.clinical.leakage_max_score` and the missingness
warnings, and returns the scores as a dict. `--validate` then runs the clinical suite as the
pipeline's validate step does (`dataset.clinical.on_leakage=stop|drop`) and prints its summary:

    python bench/clinical_leakage.py dataset=pad_ufes_20 --put-back biopsed:bool --validate
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> dict:
    from components.config import compose, to_container
    from components.data.ingest import ingest
    from components.data.manifest import CLINICAL_PREFIX
    from components.data.splits import split_by_config
    from components.workspace import Workspace
    from validation.clinical_schema import parse_schema
    from validation.leakage import LeakageSettings as Leakage
    from validation.leakage import development_rows, leakage_scores

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--put-back", nargs="*", default=[], metavar="COLUMN:TYPE")
    parser.add_argument(
        "--workspace", type=Path, default=Path(tempfile.gettempdir()) / "oncoflow-leakage"
    )
    parser.add_argument("--validate", action="store_true", help="then run the clinical suite")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. dataset=pad_ufes_20")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    cfg = to_container(compose(args.overrides))
    ds = cfg["dataset"]
    clinical = ds["clinical"]
    extra = [
        dict(zip(("name", "type"), item.rsplit(":", 1), strict=True)) for item in args.put_back
    ]
    names = {f["name"] for f in extra}
    clinical["exclude"] = [c for c in clinical["exclude"] if c not in names]
    clinical["features"] = [*clinical["features"], *extra]
    frame = ingest(
        ds["adapter"],
        ds["root"],
        ds["classes"],
        Workspace(args.workspace),
        seed=cfg["seed"],
        options=ds["synthetic"],
        clinical=clinical,
    )
    frame, _ = split_by_config(frame, ds["split"], cfg["seed"])
    rows = development_rows(frame, Leakage())
    features = parse_schema(clinical["features"])
    table = rows[[f"{CLINICAL_PREFIX}{f.name}" for f in features]]
    table.columns = [f.name for f in features]
    scores = leakage_scores(table, rows["label"], features, ds["dangerous"])  # as validation
    limit = clinical["leakage_max_score"]
    print(f"{ds['name']}: {len(rows)} development rows of {len(frame)}; leaking above {limit}")
    print(f"{'feature':40s} {'score':>6s} {'measure':9s} {'target':10s} {'missing':>7s}")
    for s in sorted(scores, key=lambda s: -s.score):
        flag = "  LEAKS" if s.score > limit else ""
        print(
            f"{s.feature:40s} {s.score:6.4f} {s.measure:9s} {s.target:10s} "
            f"{s.missingness:7.4f}{flag}"
        )
    for s in scores:
        if s.score > limit:
            print(f"\n{s.feature} leaks: {s.reason}")
    tied = sorted({s.missingness_reason for s in scores if s.missingness > limit})
    missing = [s.feature for s in scores if s.missingness > limit]
    if missing:
        print(f"\nmissingness tied to the label ({', '.join(missing)}): {'; '.join(tied)}")
    if args.validate:
        _validate(frame, cfg)
    return {s.feature: s.to_dict() for s in scores}


def _validate(frame, cfg: dict) -> None:
    """The clinical suite on the split manifest, as `validate_task` runs it (no workspace)."""
    from components.errors import ValidationFailed
    from validation.clinical_suite import validate_clinical_manifest

    ds = cfg["dataset"]
    clinical = ds["clinical"]
    print("\nclinical suite:")
    try:
        outcome = validate_clinical_manifest(
            frame,
            clinical["features"],
            dangerous=ds["dangerous"],
            max_score=clinical["leakage_max_score"],
            on_leakage=clinical["on_leakage"],
            on_failure=cfg["validation"]["on_failure"],
        )
    except ValidationFailed as exc:
        print(exc)
        return
    print(outcome.summary())
    print(f"features kept: {len(outcome.features or [])} of {len(clinical['features'])}")


if __name__ == "__main__":
    main()
