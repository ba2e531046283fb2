"""The clinical suite and the single-record check on the Wisconsin breast cancer data."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer

from components.errors import ConfigError, InputError, ValidationFailed
from components.workspace import Workspace
from validation import check_clinical_record, parse_schema, validate_clinical

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

SUBSET = ["mean radius", "mean texture", "mean area", "worst smoothness"]


@pytest.fixture(scope="module")
def cancer() -> pd.DataFrame:
    """All 30 measurements plus typed columns derived from the data: a category (the
    diagnosis), a bool (malignant) and an int (texture grade 1-3 by tertile)."""
    data = load_breast_cancer(as_frame=True)
    table = data.frame.drop(columns=["target"])
    table["diagnosis"] = np.where(data.target == 1, "benign", "malignant")
    table["malignant"] = data.target == 0
    table["texture grade"] = pd.qcut(table["mean texture"], 3, labels=[1, 2, 3]).astype("int64")
    return table


def _schema(table: pd.DataFrame, numeric: list[str]) -> list[dict]:
    """Ranges from the data with a 10% margin on either side."""
    schema = []
    for name in numeric:
        low, high = float(table[name].min()), float(table[name].max())
        margin = 0.1 * (high - low)
        schema.append(
            {"name": name, "type": "float", "min": low - margin, "max": high + margin, "unit": ""}
        )
    schema += [
        {"name": "diagnosis", "type": "category", "allowed": ["benign", "malignant"]},
        {"name": "malignant", "type": "bool"},
        {"name": "texture grade", "type": "int", "min": 1, "max": 3},
    ]
    return schema


@pytest.fixture
def small(cancer):
    table = cancer[[*SUBSET, "diagnosis", "malignant", "texture grade"]].copy()
    return table, _schema(cancer, SUBSET)


def _named(report: dict, check: str, key: str = "index") -> set:
    return {o[key] for o in report["expectations"][check].get("offenders", [])}


def test_clean_table_passes_and_comes_back_typed(small):
    table, schema = small
    outcome = validate_clinical(table, schema)
    assert outcome.passed and outcome.quarantined.empty
    assert len(outcome.validated) == len(table) == 569
    validated = outcome.validated
    assert validated["mean radius"].dtype == "float64"
    assert str(validated["texture grade"].dtype) == "Int64"
    assert str(validated["malignant"].dtype) == "boolean"
    assert set(validated["diagnosis"]) == {"benign", "malignant"}
    assert outcome.report["row_key"] == "index"


def test_planted_problems_are_named_by_row(small):
    table, schema = small
    table = table.astype({"mean radius": object, "malignant": object, "texture grade": object})
    table.loc[5, "mean radius"] = "twelve"  # wrong type
    table.loc[7, "mean area"] = 1e6  # out of range
    table.loc[8, "mean texture"] = -3.0  # out of range (below)
    table.loc[9, "worst smoothness"] = np.nan  # required value missing
    table.loc[11, "diagnosis"] = "unknown"  # not an allowed category
    table.loc[12, "malignant"] = "maybe"  # not a boolean
    table.loc[13, "texture grade"] = 2.5  # not a whole number
    table.loc[14, "malignant"] = "yes"  # a readable boolean: fine
    with pytest.raises(ValidationFailed) as caught:
        validate_clinical(table, schema)
    report = caught.value.report
    assert set(report["failed"]) == {
        "type_of_mean radius",
        "range_of_mean area",
        "range_of_mean texture",
        "required_worst smoothness",
        "allowed_diagnosis",
        "type_of_malignant",
        "type_of_texture grade",
    }
    assert _named(report, "type_of_mean radius") == {5}
    assert _named(report, "range_of_mean area") == {7}
    assert _named(report, "range_of_mean texture") == {8}
    assert _named(report, "required_worst smoothness") == {9}
    assert _named(report, "allowed_diagnosis") == {11}
    assert _named(report, "type_of_malignant") == {12}
    assert _named(report, "type_of_texture grade") == {13}
    entry = report["expectations"]["range_of_mean area"]
    assert entry["column"] == "mean area" and entry["offenders"][0]["value"] == 1e6
    assert report["expectations"]["type_of_mean radius"]["offenders"][0]["value"] == "twelve"
    message = str(caught.value)
    assert "range_of_mean area" in message and "index=7" in message


def test_quarantine_keeps_every_other_row_with_its_index(small):
    table, schema = small
    table = table.set_axis([f"P{i:04d}" for i in range(len(table))]).astype({"mean area": object})
    table.loc["P0003", "mean area"] = "n/a"
    table.loc["P0100", "mean radius"] = 1000.0
    table.loc["P0200", "diagnosis"] = None  # required category missing
    outcome = validate_clinical(table, schema, on_failure="quarantine")
    assert list(outcome.quarantined.index) == ["P0003", "P0100", "P0200"]
    assert dict(outcome.quarantined["reason"]) == {
        "P0003": "type_of_mean area (mean area='n/a')",
        "P0100": "range_of_mean radius (mean radius=1000.0)",
        "P0200": "required_diagnosis (diagnosis missing)",
    }
    assert len(outcome.validated) == len(table) - 3
    assert not outcome.validated.index.isin(outcome.quarantined.index).any()
    assert outcome.validated["mean area"].dtype == "float64"
    assert not outcome.passed and outcome.report["after_quarantine"]["passed"]


def test_offenders_named_by_id_column(small):
    table, schema = small
    table = table.assign(id=[f"case-{i}" for i in range(len(table))])
    table.loc[20, "texture grade"] = 7
    with pytest.raises(ValidationFailed) as caught:
        validate_clinical(table, schema)
    assert _named(caught.value.report, "range_of_texture grade", key="id") == {"case-20"}


def test_optional_features_may_miss_up_to_their_limit(small):
    table, schema = small
    schema = [{**f, "required": False} if f["name"] == "mean texture" else f for f in schema]
    table = table.copy()
    table.loc[table.index[:57], "mean texture"] = np.nan  # 10% missing
    for mode in ("stop", "quarantine"):  # a missing fraction is not fixed by dropping rows
        with pytest.raises(ValidationFailed, match="missing_fraction_mean texture"):
            validate_clinical(table, schema, on_failure=mode, max_missing_fraction=0.05)
    assert validate_clinical(table, schema, max_missing_fraction=0.2).passed
    per_feature = validate_clinical(table, schema, max_missing_fraction={"mean texture": 0.15})
    assert per_feature.passed
    assert per_feature.validated["mean texture"].isna().sum() == 57


def test_missing_column_stops(small, tmp_path):
    table, schema = small
    workspace = Workspace(tmp_path / "ws")
    with pytest.raises(ValidationFailed, match="column_mean area_exists") as caught:
        validate_clinical(
            table.drop(columns=["mean area"]), schema, on_failure="quarantine", workspace=workspace
        )
    assert caught.value.report["failed"] == ["column_mean area_exists"]
    assert (workspace.data_docs / "index.html").is_file()
    assert list(workspace.reports.glob("clinical-validation-*.json"))


def test_all_thirty_features_quarantine(cancer):
    table = cancer.drop(columns=["diagnosis", "malignant", "texture grade"]).copy()
    schema = [f for f in _schema(cancer, list(table.columns)) if f.get("type") == "float"]
    assert len(schema) == 30
    table.loc[[10, 400], "worst area"] = [1e7, np.nan]
    outcome = validate_clinical(table, schema, on_failure="quarantine")
    assert list(outcome.quarantined.index) == [10, 400]
    assert len(outcome.validated) == 567


def test_bad_schema_is_a_config_error():
    with pytest.raises(ConfigError, match="type"):
        parse_schema([{"name": "age", "type": "number"}])
    with pytest.raises(ConfigError, match="allowed"):
        parse_schema([{"name": "sex", "type": "category"}])
    with pytest.raises(ConfigError, match="min 5"):
        parse_schema([{"name": "age", "type": "int", "min": 5, "max": 1}])
    with pytest.raises(ConfigError, match="twice"):
        parse_schema([{"name": "a", "type": "bool"}, {"name": "a", "type": "bool"}])


RECORD_SCHEMA = [
    {"name": "age", "type": "int", "min": 18, "max": 110, "unit": "years"},
    {"name": "tumour size", "type": "float", "min": 0, "max": 200, "unit": "mm"},
    {"name": "birads", "type": "category", "allowed": [1, 2, 3, 4, 5, 6]},
    {"name": "family history", "type": "bool", "required": False},
]


def test_check_clinical_record_returns_typed_values():
    record = {"age": "54", "tumour size": 12, "birads": "4", "family history": "yes"}
    assert check_clinical_record(record, RECORD_SCHEMA) == {
        "age": 54,
        "tumour size": 12.0,
        "birads": 4,
        "family history": True,
    }
    minimal = check_clinical_record({"age": 60, "tumour size": 3.5, "birads": 2}, RECORD_SCHEMA)
    assert minimal["family history"] is None


def test_check_clinical_record_names_every_bad_field():
    record = {
        "age": 250,
        "tumour size": "large",
        "family history": "perhaps",
        "smoker": True,
    }
    with pytest.raises(InputError) as caught:
        check_clinical_record(record, RECORD_SCHEMA)
    fields = caught.value.fields
    assert set(fields) == {"age", "tumour size", "birads", "family history", "smoker"}
    assert "above maximum 110 years" in fields["age"]
    assert fields["tumour size"].startswith("wrong type")
    assert fields["birads"] == "missing (required)"
    assert "unknown field" in fields["smoker"]
    message = str(caught.value)
    for name in fields:
        assert name in message

    with pytest.raises(InputError) as caught:
        check_clinical_record(
            {"age": 40.5, "tumour size": float("nan"), "birads": 9}, RECORD_SCHEMA
        )
    assert set(caught.value.fields) == {"age", "tumour size", "birads"}
    assert caught.value.fields["birads"].startswith("not allowed")
    assert caught.value.fields["tumour size"] == "missing (required)"
    with pytest.raises(InputError, match="JSON object"):
        check_clinical_record(["age", 40], RECORD_SCHEMA)
    with pytest.raises(InputError, match="boolean"):
        check_clinical_record({"age": True, "tumour size": 1, "birads": 1}, RECORD_SCHEMA)
