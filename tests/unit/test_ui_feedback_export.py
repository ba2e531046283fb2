"""Feedback export (read back by the folder ingest with the same labels, versioned, hashed,
audited, admins only) and the operations figures of the admin dashboard."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from argon2 import PasswordHasher
from PIL import Image

from components.data.ingest import ingest_folder
from ui import analytics
from ui.accounts import AccountStore
from ui.cases import CaseStore
from ui.db import Database
from ui.errors import InvalidInput, PermissionDenied
from ui.feedback_export import export_feedback

CLASSES = ["glioma", "meningioma", "none"]


def png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (shade, 255 - shade, 40)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def site(tmp_path):
    db = Database(tmp_path / "ui.db")
    accounts = AccountStore(db, hasher=PasswordHasher(time_cost=1, memory_cost=1024))
    admin = accounts.create_admin("chief", "admin-pass-0001")
    doctor = accounts.create_user(admin, "dr.a", "clinic-pass-0001", "clinician")
    return CaseStore(db), admin, doctor


def add(cases, user, label, image, kind="png", latency=10.0):
    probs = {c: 0.1 for c in CLASSES} | {label: 0.8}
    return cases.record(
        user,
        label=label,
        probabilities=probs,
        model_name="m",
        model_version="1",
        model_tag="m:1",
        input_kind=kind,
        latency_ms=latency,
        image=image,
    )


def test_export_round_trips_through_the_folder_ingest(site, tmp_path):
    cases, admin, doctor = site
    agreed = add(cases, doctor, "glioma", png(10))
    corrected = add(cases, doctor, "glioma", png(90))
    unrated = add(cases, doctor, "none", png(170))
    dicom = add(cases, doctor, "none", b"\0" * 128 + b"DICM" + b"\0" * 64, kind="dicom")
    cases.add_feedback(doctor, agreed.id, agree=True)
    cases.add_feedback(doctor, corrected.id, agree=False, true_label="meningioma")
    cases.add_feedback(doctor, dicom.id, agree=True)
    with pytest.raises(PermissionDenied):
        export_feedback(cases, doctor, tmp_path / "out", "north")

    result = export_feedback(cases, admin, tmp_path / "out", "north")
    assert result.path.name == "north-feedback-v1" and result.files == 2
    assert result.classes == {"glioma": 1, "meningioma": 1}
    assert result.skipped == {"dicom (not for the folder adapter)": 1}
    frame = ingest_folder(result.path)  # what `dataset.adapter=folder` runs
    manifest = json.loads((result.path / "manifest.json").read_text())
    labels = {f["sha256"]: f["label"] for f in manifest["files"]}
    assert sorted(frame["label"]) == ["glioma", "meningioma"]
    assert not frame["decode_error"].fillna("").astype(bool).any()
    read_back = {
        hashlib.sha256(Path(src).read_bytes()).hexdigest(): label
        for src, label in zip(frame["source"], frame["label"], strict=True)
    }
    assert read_back == labels  # every file, with the label the clinician confirmed
    lines = "".join(f"{f['path']} {f['label']} {f['sha256']}\n" for f in manifest["files"])
    assert manifest["content_hash"] == hashlib.sha256(lines.encode()).hexdigest()
    for f in manifest["files"]:  # no case number, case id or date: names are content hashes
        assert set(f) == {"path", "label", "sha256"} and Path(f["path"]).stem == f["sha256"][:16]
    assert unrated.label not in result.classes  # unrated cases stay out

    again = export_feedback(cases, admin, tmp_path / "out", "north")
    assert again.version == 2 and again.content_hash == result.content_hash
    exports = [e for e in cases.audit.entries() if e.action == "feedback.export"]
    assert [json.loads(e.details)["version"] for e in exports] == [1, 2]
    with pytest.raises(InvalidInput, match="site name"):
        export_feedback(cases, admin, tmp_path / "out", "../etc")


def test_processing_time_percentiles_are_nearest_rank():
    cases = [SimpleNamespace(latency_ms=float(v)) for v in range(1, 101)]
    speed = analytics.processing_time(cases)
    assert (speed.n, speed.p50, speed.p95) == (100, 50.0, 95.0)
    assert analytics.processing_time([]).p50 is None


def test_drift_alert_on_total_variation_distance():
    reference = analytics.test_distribution(
        {"per_class": {"glioma": {"support": 50}, "none": {"support": 50}}}
    )
    assert reference == {"glioma": 0.5, "none": 0.5}

    def mix(glioma: int, none: int):
        labels = ["glioma"] * glioma + ["none"] * none
        return [SimpleNamespace(label=x, created_at=i, id=i) for i, x in enumerate(labels)]

    same = analytics.drift(mix(20, 20), reference)
    assert same.distance == pytest.approx(0.0) and not same.alert
    shifted = analytics.drift(mix(36, 4), reference)  # 90% glioma: TV = 0.4
    assert shifted.distance == pytest.approx(0.4) and shifted.alert
    assert "ABOVE" in shifted.message and "0.20" in shifted.message
    edge = analytics.drift(mix(28, 12), reference)  # 70%: TV = 0.2, not above
    assert edge.distance == pytest.approx(0.2) and not edge.alert
    few = analytics.drift(mix(10, 0), reference)
    assert few.distance is None and not few.alert and "starts at 30" in few.message


def test_activity_counts_staff_actions_from_the_audit_log():
    entries = [
        SimpleNamespace(action="case.predict", actor_id=2, actor_role="clinician"),
        SimpleNamespace(action="case.predict", actor_id=2, actor_role="clinician"),
        SimpleNamespace(action="case.release", actor_id=3, actor_role="clinician"),
        SimpleNamespace(action="question.ask", actor_id=9, actor_role="patient"),
        SimpleNamespace(action="login.success", actor_id=2, actor_role="clinician"),
    ]
    rows = dict(analytics.activity(entries, {2: "dr.a", 3: "dr.b"}))
    assert rows["dr.a"]["Predictions"] == 2 and rows["dr.a"]["Released"] == 0
    assert rows["dr.b"]["Released"] == 1 and len(rows) == 2
