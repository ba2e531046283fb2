"""The diagnose form's clinical inputs come from the model's schema, as the service publishes it
(PAD-UFES-20's real schema), and the record they give is one the service accepts."""

from __future__ import annotations

import pytest

from serving.schemas import ClinicalFeatureSpec
from ui.clinical import NO, NOT_KNOWN, YES, clinical_input, readable_name, record_from_fields
from ui.errors import InvalidInput
from validation.clinical_schema import check_clinical_record


@pytest.fixture
def pad_schema(tiny_cfg):
    """PAD's clinical schema from the real config, as the UI receives it: through the model
    card's `ClinicalFeatureSpec` and JSON."""
    features = tiny_cfg("dataset=pad_ufes_20")["dataset"]["clinical"]["features"]
    sent = [ClinicalFeatureSpec(**f).model_dump_json() for f in features]
    return features, [ClinicalFeatureSpec.model_validate_json(s).model_dump() for s in sent]


def test_the_form_is_generated_from_the_schema(pad_schema):
    features, schema = pad_schema
    inputs = {entry["name"]: clinical_input(entry) for entry in schema}
    assert list(inputs) == [f["name"] for f in features]  # one input per feature, in order
    for entry in schema:
        field = inputs[entry["name"]]
        kind = type(field).__name__
        if entry["type"] in ("int", "float"):
            assert kind == "Number"
            assert (field.minimum, field.maximum) == (entry.get("min"), entry.get("max"))
            assert field.precision == (0 if entry["type"] == "int" else None)
        else:  # an optional choice can be taken back: "Not known" (sent as missing)
            unknown = [] if entry.get("required", True) else [NOT_KNOWN]
            choices = [c[0] for c in field.choices]
            if entry["type"] == "bool":
                assert kind == "Radio" and choices == [YES, NO, *unknown]
            else:
                assert kind == "Dropdown" and choices == [*entry["allowed"], *unknown]
            assert field.value is None  # nothing is preselected
        assert field.info.endswith("required" if entry.get("required", True) else "optional")
    # PAD's column names read as words; the schema's description and units show
    assert inputs["fitspatrick"].label == "Fitspatrick"
    assert inputs["fitspatrick"].info == "Fitzpatrick skin type · 1 to 6 · optional"
    assert inputs["diameter_1"].label == "Diameter 1 (mm)"
    assert inputs["diameter_1"].info == "0 to 200 · optional"
    assert inputs["background_father"].label == "Background father"
    assert "POMERANIA" in [c[0] for c in inputs["background_father"].choices]
    assert inputs["age"].label == "Age (years)" and inputs["age"].info == "0 to 120 · required"
    assert readable_name("skin_cancer_history") == "Skin cancer history"


def test_the_form_gives_a_record_the_service_accepts(pad_schema):
    features, schema = pad_schema
    filled = {
        "age": 61.0,
        "region": "FACE",
        "fitspatrick": 2.0,
        "diameter_1": 7.5,
        "itch": YES,
        "grew": NOT_KNOWN,
        "gender": NOT_KNOWN,
    }
    values = [filled.get(entry["name"]) for entry in schema]
    record = record_from_fields(schema, values)
    assert record == {
        "age": 61,
        "region": "FACE",
        "fitspatrick": 2,
        "diameter_1": 7.5,
        "itch": True,
    }
    checked = check_clinical_record(record, features)  # what the service runs on it
    assert checked["fitspatrick"] == 2 and checked["grew"] is None
    bad = filled | {"fitspatrick": 7.0, "diameter_1": -1.0, "region": NOT_KNOWN}
    with pytest.raises(InvalidInput) as problems:
        record_from_fields(schema, [bad.get(entry["name"]) for entry in schema])
    text = str(problems.value)
    assert "Fitspatrick must be between 1 and 6" in text
    assert "Diameter 1 (mm) must be between 0 and 200" in text and "Region is required" in text


def test_one_sided_ranges_are_described_and_checked():
    schema = [
        {"name": "pack_years", "type": "float", "min": 0, "required": False},
        {"name": "pregnancies", "type": "int", "max": 20},
    ]
    assert clinical_input(schema[0]).info == "at least 0 · optional"
    assert clinical_input(schema[1]).info == "at most 20 · required"
    with pytest.raises(InvalidInput) as problems:
        record_from_fields(schema, [-2.0, 25.0])
    assert "Pack years must be at least 0" in str(problems.value)
    assert "Pregnancies must be at most 20" in str(problems.value)
