"""Label leakage: the per-feature score, its GX expectation (stop and drop), and the clinical
suite in `validate_task` on a PAD-like and a tabular-only dataset composed from the real
config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from prefect.logging import disable_run_logger
from tiny_config import tiny_cfg

from components.errors import ValidationFailed
from components.workspace import Workspace
from flows.tasks import RunContext, ingest_task, split_task, validate_task
from validation import parse_schema, validate_clinical
from validation.leakage import leakage_scores

CLASSES = ["ACK", "BCC", "MEL", "NEV"]
DANGEROUS = ["BCC", "MEL"]
SCHEMA = [
    {"name": "age", "type": "int", "min": 0, "max": 120},
    {"name": "region", "type": "category", "allowed": ["ARM", "BACK", "FACE", "LEG", "RARE"]},
    {"name": "biopsed", "type": "bool"},
    {"name": "marker", "type": "float"},
    {"name": "history", "type": "bool", "required": False, "max_missing_fraction": 0.5},
]


def leaky_table(n: int = 600, seed: int = 0) -> pd.DataFrame:
    """`biopsed` is true for every dangerous row and for a quarter of the others (PAD's
    pattern); `marker` separates NEV almost perfectly; `age` and `region` are noisy;
    `history` is missing for 40 % of rows, none of them dangerous (a collection artefact)."""
    rng = np.random.default_rng(seed)
    label = rng.choice(CLASSES, size=n, p=[0.25, 0.3, 0.15, 0.3])
    dangerous = np.isin(label, DANGEROUS)
    region = rng.choice(["ARM", "BACK", "FACE", "LEG"], size=n)
    region[:3] = "RARE"  # a tiny cell of one class: too small to mean anything
    label[:3] = "ACK"
    dangerous[:3] = False
    history = np.where(rng.random(n) < 0.5, "True", "False").astype(object)
    history[(~dangerous) & (rng.random(n) < 0.7)] = None
    return pd.DataFrame(
        {
            "id": [f"r{i}" for i in range(n)],
            "label": label,
            "split": rng.choice(["train", "val", "test"], size=n, p=[0.7, 0.15, 0.15]),
            "age": (50 + 10 * dangerous + rng.normal(0, 15, n)).clip(1, 99).round().astype(int),
            "region": region,
            "biopsed": np.where(dangerous | (rng.random(n) < 0.25), "True", "False"),
            "marker": np.where(label == "NEV", 0.0, 6.0) + rng.normal(0, 1, n),
            "history": history,
        }
    )


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return leaky_table()


def _scores(table: pd.DataFrame) -> dict:
    features = parse_schema(SCHEMA)
    names = [f.name for f in features]
    return {s.feature: s for s in leakage_scores(table[names], table["label"], features, DANGEROUS)}


def test_a_value_that_always_accompanies_the_dangerous_classes_leaks(table):
    biopsed = _scores(table)["biopsed"]
    assert biopsed.score > 0.95 and biopsed.measure == "exclusion"
    assert biopsed.target == "dangerous"
    assert "biopsed=False" in biopsed.reason and "are never a dangerous class" in biopsed.reason
    assert biopsed.auroc < 0.9  # a plain single-feature AUROC would not see it


def test_a_near_perfect_separator_leaks_by_auroc(table):
    marker = _scores(table)["marker"]
    assert marker.measure == "auroc" and marker.score > 0.95 and marker.target == "NEV"
    assert "cross-validated AUROC" in marker.reason


def test_noisy_features_and_tiny_pure_cells_do_not(table):
    scores = _scores(table)
    assert scores["age"].score < 0.8 and scores["region"].score < 0.8
    assert scores["history"].score < 0.8  # judged on the rows that have a value
    assert scores["history"].missingness > 0.95  # ... its missingness is reported apart
    assert "with no value" in scores["history"].missingness_reason


def test_the_leakage_expectation_stops_the_run_naming_the_feature(table, tmp_path):
    workspace = Workspace(tmp_path / "ws")
    with pytest.raises(ValidationFailed) as caught:
        validate_clinical(table, SCHEMA, leakage=_settings("stop"), workspace=workspace)
    message = str(caught.value)
    assert "no_label_leakage" in message and "2 offending features" in message
    assert "biopsed (score 0.9" in message and "are never a dangerous class" in message
    report = caught.value.report
    assert report["failed"] == ["no_label_leakage"] and "value checks skipped" in report["skipped"]
    offenders = report["expectations"]["no_label_leakage"]["offenders"]
    assert {o["feature"] for o in offenders} == {"biopsed", "marker"}
    assert report["leakage"]["rows_held_out"] == int((table["split"] == "test").sum())
    assert (workspace.data_docs / "index.html").is_file()  # in GX's own results and docs


def test_drop_removes_leaking_features_and_records_them(table):
    outcome = validate_clinical(table, SCHEMA, leakage=_settings("drop"))
    assert outcome.features == ["age", "region", "history"]
    report = outcome.report
    assert [d["feature"] for d in report["features_dropped"]] == ["biopsed", "marker"]
    assert not outcome.passed and report["after_quarantine"]["passed"]
    assert "no_label_leakage" in report["failed"]
    assert any("history" in w for w in report["leakage"]["warnings"])
    assert "dropped feature biopsed" in outcome.summary()


def test_held_out_rows_never_decide(table):
    """A feature that gives the label away only on the test rows is not judged by them."""
    only_test = table.assign(
        biopsed=np.where(
            table["split"] == "test",
            np.where(table["label"].isin(DANGEROUS), "True", "False"),
            np.where(np.arange(len(table)) % 2 == 0, "True", "False"),
        )
    )
    test_rows = only_test[only_test["split"] == "test"]
    assert _scores(test_rows)["biopsed"].score > 0.95  # on the test rows it leaks
    outcome = validate_clinical(
        only_test, [f for f in SCHEMA if f["name"] != "marker"], leakage=_settings("stop")
    )
    assert outcome.passed


def _settings(on_leakage: str):
    from validation.leakage import LeakageSettings

    return LeakageSettings(max_score=0.95, on_leakage=on_leakage, dangerous=tuple(DANGEROUS))


# ------------------------------------------------------------------ validate_task, composed

PAD_FEATURES = (
    "[{name:age,type:int,min:0,max:120},{name:region,type:category,allowed:[ARM,BACK,FACE,LEG,"
    "RARE]},{name:biopsed,type:bool}]"
)


def _pad_like(root: Path, n: int = 500) -> None:
    """metadata.csv + images/<stem>.jpg, 1-2 images per patient, PAD's biopsed pattern."""
    table = leaky_table(n, seed=1)
    (root / "images").mkdir(parents=True)
    table["patient_id"] = [f"PAT_{i // 2 if i % 5 else i}" for i in range(n)]
    table["img_id"] = [f"PAT_{i}_{i}.png" for i in range(n)]
    table["lesion_id"] = range(n)
    rng = np.random.default_rng(0)
    for key in table["img_id"]:
        pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{Path(key).stem}.jpg")
    columns = ["patient_id", "lesion_id", "img_id", "age", "region", "biopsed", "label"]
    table[columns].rename(columns={"label": "diagnostic"}).to_csv(
        root / "metadata.csv", index=False
    )


@pytest.fixture(autouse=True)
def no_prefect_artifacts(monkeypatch):
    """The tasks' Prefect artifacts outside a flow would start a Prefect server (seconds);
    their JSON files in the run directory are what these tests read."""
    from flows import artifacts

    for name in ("markdown", "image"):
        monkeypatch.setattr(artifacts, name, lambda *args, **kwargs: None)


@pytest.fixture(scope="module")
def pad_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pad")
    _pad_like(root)
    return root


def _run(tmp_path: Path, *overrides: str, root: Path | None = None) -> tuple[RunContext, object]:
    cfg = tiny_cfg(
        "dataset=pad_ufes_20",
        f"dataset.clinical.features={PAD_FEATURES}",
        "dataset.clinical.exclude=[lesion_id]",
        *overrides,
        dataset={"root": str(root or tmp_path), "classes": CLASSES, "dangerous": DANGEROUS},
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    workspace = Workspace((root or tmp_path) / "ws")  # one decode cache for the module
    ctx = RunContext(cfg=cfg, workspace=workspace, run_dir=run_dir)
    with disable_run_logger():
        split = split_task.fn(ctx, ingest_task.fn(ctx))
        return ctx, validate_task.fn(ctx, split.frame)


def test_validate_task_stops_on_a_leaking_feature(tmp_path, pad_root):
    with pytest.raises(ValidationFailed, match=r"no_label_leakage.*biopsed"):
        _run(tmp_path, root=pad_root)
    report = json.loads((tmp_path / "run" / "clinical_validation_report.json").read_text())
    assert report["failed"] == ["no_label_leakage"]
    assert (tmp_path / "run" / "validation_report.json").is_file()  # the manifest suite passed


def test_validate_task_drops_it_when_told_and_the_schema_follows(tmp_path, pad_root):
    ctx, result = _run(tmp_path, "dataset.clinical.on_leakage=drop", root=pad_root)
    assert [f["name"] for f in result.features] == ["age", "region"]
    assert "clin__biopsed" not in result.frame.columns
    assert result.frame["clin__age"].map(type).eq(int).all()  # typed after validation
    assert result.report["clinical"]["features_dropped"][0]["feature"] == "biopsed"
    assert "patient_in_one_split" in result.report["expectations"]
    saved = pd.read_parquet(ctx.run_dir / "manifest.parquet")
    assert "clin__biopsed" not in saved.columns and "group" in saved.columns


def test_validate_task_on_a_tabular_only_dataset(tmp_path):
    table = leaky_table(300, seed=2).drop(columns=["id", "split", "marker", "biopsed"])
    table.loc[5, "age"] = 140  # out of range: quarantined
    table.rename(columns={"label": "diagnostic"}).to_csv(tmp_path / "metadata.csv")
    _, result = _run(
        tmp_path,
        "dataset.clinical.key=null",
        "dataset.clinical.group=null",
        "dataset.clinical.exclude=[Unnamed: 0]",
        "dataset.clinical.features=[{name:age,type:int,min:0,max:120},{name:region,"
        "type:category,allowed:[ARM,BACK,FACE,LEG,RARE]},{name:history,type:bool,"
        "required:false,max_missing_fraction:0.6}]",
        "validation.on_failure=quarantine",
    )
    assert (result.frame["source"] == "").all()
    clinical = result.report["clinical"]
    assert result.quarantined == clinical["rows_quarantined"] == 1
    assert len(result.frame) == clinical["rows"] - 1  # rows left after identical records
    assert "width_in_range" not in result.report["expectations"]
    assert [s["feature"] for s in clinical["leakage"]["scores"]] != []
    assert {s["feature"] for s in clinical["leakage"]["scores"]} == {"age", "region", "history"}
