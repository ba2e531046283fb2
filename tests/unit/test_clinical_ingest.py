"""The table adapter: a clinical table joined to its images by a configured key, column roles,
join errors, tabular-only rows, patient keys that never hold the patient id."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from tiny_config import tiny_cfg

from components.data import manifest
from components.data.clinical import TableSpec, load_rows
from components.data.ingest import ingest
from components.errors import ConfigError, DataError
from components.workspace import Workspace

FEATURES = "[{name:age,type:int,min:0,max:120},{name:smoker,type:bool,required:false}]"
ROWS = [  # patient, image key (the original .png), age, smoker, diagnosis
    ("PAT_1", "PAT_1_a.png", "61", "True", "BCC"),
    ("PAT_1", "PAT_1_b.png", "61", "True", "BCC"),
    ("PAT_2", "PAT_2_a.png", "34", "", "NEV"),
    ("PAT_3", "PAT_3_a.png", "45", "UNK", "NEV"),
    ("PAT_4", "PAT_4_a.png", "70", "False", "SEK"),
]


def _write(root: Path, rows=ROWS, images: bool = True, columns=None) -> None:
    """PAD-like layout: metadata.csv naming `.png` keys, the images as `images/<stem>.jpg`."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    columns = columns or ["patient_id", "img_id", "age", "smoker", "diagnostic"]
    pd.DataFrame(rows, columns=columns).to_csv(root / "metadata.csv", index=False)
    for i, row in enumerate(rows):
        if images:
            colour = (40 * i % 255, 90, 160)
            Image.new("RGB", (24, 24), colour).save(root / "images" / f"{Path(row[1]).stem}.jpg")


def _clinical(root: Path, *overrides: str, **clinical) -> dict:
    """The composed `dataset.clinical` section of PAD's config, pointed at the test table."""
    cfg = tiny_cfg(
        "dataset=pad_ufes_20",
        f"dataset.clinical.features={FEATURES}",
        "dataset.clinical.exclude=[]",
        *overrides,
        dataset={
            "root": str(root),
            "classes": ["BCC", "NEV", "SEK"],
            "dangerous": ["BCC"],
            "clinical": clinical,
        },
    )
    return cfg["dataset"]


def _ingest(root: Path, ds: dict) -> pd.DataFrame:
    return ingest(
        "table", ds["root"], ds["classes"], Workspace(root / "ws"), clinical=ds["clinical"]
    )


def test_rows_join_their_images_by_the_configured_name(tmp_path):
    _write(tmp_path)
    frame = _ingest(tmp_path, _clinical(tmp_path, group="patient_id"))
    assert len(frame) == 5 and (frame["decode_error"] == "").all()
    assert [Path(s).name for s in frame["source"]] == [f"{Path(r[1]).stem}.jpg" for r in ROWS]
    assert list(frame["label"]) == [r[4] for r in ROWS]
    assert (frame["width"] == 24).all() and (frame["thumbnail"] != "").all()
    # one column per feature, raw values; the dataset's missing tokens ("", UNK) are None
    assert list(frame.columns[-2:]) == ["clin__age", "clin__smoker"]
    assert list(frame["clin__age"]) == ["61", "61", "34", "45", "70"]
    assert list(frame["clin__smoker"]) == ["True", "True", None, None, "False"]
    # the patient is a keyed hash: equal for one patient, never the id itself
    groups = list(frame["group"])
    assert groups[0] == groups[1] and len(set(groups)) == 4
    assert all(re.fullmatch(r"[0-9a-f]{16}", g) for g in groups)
    assert not any("PAT" in g for g in groups)
    manifest.save(frame, tmp_path / "m.parquet")  # survives the manifest round trip
    assert list(manifest.load(tmp_path / "m.parquet")["group"]) == groups


def test_label_names_map_raw_values_to_classes(tmp_path):
    rows = [(p, k, a, s, {"BCC": "1", "NEV": "0", "SEK": "0"}[d]) for p, k, a, s, d in ROWS]
    _write(tmp_path, rows)
    ds = _clinical(tmp_path, group="patient_id")
    ds["classes"] = ["negative", "positive"]  # as dataset=cervical_risk_uci maps its Biopsy
    ds["clinical"]["label_names"] = {"0": "negative", "1": "positive"}
    frame = _ingest(tmp_path, ds)
    assert list(frame["label"]) == ["positive", "positive", "negative", "negative", "negative"]


def test_a_missing_key_column_is_named(tmp_path):
    columns = ["patient_id", "image", "age", "smoker", "diagnostic"]
    _write(tmp_path, columns=columns)
    with pytest.raises(DataError, match=r"lacks the key column 'img_id'"):
        _ingest(tmp_path, _clinical(tmp_path, group="patient_id", exclude=["image"]))


def test_a_duplicate_key_names_the_lines_not_the_value(tmp_path):
    rows = [*ROWS, ("PAT_5", "PAT_2_a.png", "50", "False", "NEV")]
    _write(tmp_path, rows[:-1])
    pd.DataFrame(rows, columns=["patient_id", "img_id", "age", "smoker", "diagnostic"]).to_csv(
        tmp_path / "metadata.csv", index=False
    )
    with pytest.raises(DataError, match=r"repeats values: 2 rows .* \(lines 4, 7\)") as caught:
        _ingest(tmp_path, _clinical(tmp_path, group="patient_id"))
    assert "PAT_2" not in str(caught.value)


def test_a_row_whose_image_is_missing_is_an_error(tmp_path):
    _write(tmp_path)
    (tmp_path / "images" / "PAT_3_a.jpg").unlink()
    with pytest.raises(DataError, match=r"1 rows of metadata.csv name an image .* \(lines 5\)"):
        _ingest(tmp_path, _clinical(tmp_path, group="patient_id"))


def test_an_image_without_a_row_is_an_error(tmp_path):
    _write(tmp_path)
    Image.new("RGB", (24, 24)).save(tmp_path / "images" / "PAT_9_z.jpg")
    (tmp_path / "images" / "notes.txt").write_text("not an image of the table's kind")
    with pytest.raises(DataError, match=r"1 \.jpg files in .*images have no row in metadata"):
        _ingest(tmp_path, _clinical(tmp_path, group="patient_id"))


def test_a_label_outside_the_classes_is_an_error(tmp_path):
    _write(tmp_path, [*ROWS[:4], ("PAT_4", "PAT_4_a.png", "70", "False", "MEL")])
    with pytest.raises(DataError, match=r"'MEL' \(1 rows\) are not dataset.classes.*label_names"):
        _ingest(tmp_path, _clinical(tmp_path, group="patient_id"))


def test_a_column_without_a_role_is_named(tmp_path):
    _write(tmp_path)
    with pytest.raises(ConfigError, match=r"columns without a role: \['patient_id'\]"):
        _ingest(tmp_path, _clinical(tmp_path, "dataset.clinical.group=null"))  # no role


def test_tabular_only_rows_have_no_image_and_hash_their_record(tmp_path):
    rows = [(a, s, d) for _, _, a, s, d in ROWS]
    tmp_path.mkdir(exist_ok=True)
    pd.DataFrame(rows, columns=["age", "smoker", "diagnostic"]).to_csv(
        tmp_path / "metadata.csv", index=False
    )
    frame = _ingest(
        tmp_path, _clinical(tmp_path, "dataset.clinical.key=null", "dataset.clinical.group=null")
    )
    assert len(frame) == 5 and (frame["source"] == "").all() and (frame["width"] == 0).all()
    assert "group" not in frame.columns
    assert frame["id"].is_unique
    # identical records share their hash (like identical images), others do not
    assert frame["sha256"][0] == frame["sha256"][1] and frame["sha256"].nunique() == 4


def test_table_spec_resolves_the_table_under_the_root(tmp_path):
    spec = TableSpec.from_config(_clinical(tmp_path)["clinical"], tmp_path)
    assert spec.table == tmp_path / "metadata.csv"
    assert spec.image_path("PAT_1_a.png") == tmp_path / "images" / "PAT_1_a.jpg"


def test_missing_labels_are_named_by_line(tmp_path):
    _write(tmp_path, [*ROWS[:4], ("PAT_4", "PAT_4_a.png", "70", "False", "")])
    spec = TableSpec.from_config(_clinical(tmp_path, group="patient_id")["clinical"], tmp_path)
    with pytest.raises(DataError, match=r"1 rows of metadata.csv have no 'diagnostic' .*line"):
        load_rows(spec, ["BCC", "NEV", "SEK"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dataset.clinical.table="], "needs dataset.clinical.table"),
        (["dataset.clinical.features=[]"], "at least one feature"),
        (["dataset.clinical.on_leakage=warn"], "on_leakage"),
        (["dataset.clinical.leakage_max_score=0.4"], "leakage_max_score"),
        (["dataset.clinical.exclude=[age]"], "two roles"),
        (["dataset.clinical.image_name=images/all.jpg"], "image_name"),
        (["dataset=busi", "dataset.clinical.table=x.csv"], "adapter=table"),
    ],
)
def test_config_checks_the_clinical_roles(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_cfg("dataset=pad_ufes_20", f"dataset.clinical.features={FEATURES}", *overrides)


@pytest.mark.parametrize("dataset", ["pad_ufes_20", "cervical_risk_uci"])
def test_the_real_dataset_files_give_every_column_a_role(dataset):
    """The shipped configs against the shipped tables' headers (no data read beyond them)."""
    ds = tiny_cfg(f"dataset={dataset}")["dataset"]
    spec = TableSpec.from_config(ds["clinical"], ds["root"])
    if not spec.table.is_file():
        pytest.skip(f"{spec.table} is not here")
    columns = list(pd.read_csv(spec.table, nrows=0).columns)
    assert sorted(spec.roles) == sorted(columns)


def test_keys_naming_files_beside_the_table(tmp_path):
    """`image_name: {key}`: the images sit beside the table; the table itself is no stray."""
    rows = [(p, f"{Path(k).stem}.jpg", a, s, d) for p, k, a, s, d in ROWS]
    _write(tmp_path, rows)
    for row in rows:
        (tmp_path / "images" / row[1]).rename(tmp_path / row[1])
    ds = _clinical(tmp_path, "dataset.clinical.image_name='{key}'")
    assert len(_ingest(tmp_path, ds)) == 5
    Image.new("RGB", (24, 24)).save(tmp_path / "extra.jpg")
    with pytest.raises(DataError, match=r"1 \.jpg files in .* have no row"):
        _ingest(tmp_path, ds)
