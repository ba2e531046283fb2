"""The UI's handlers without a browser: a fake diagnosis service at the HTTP edge (a tiny
threaded server on 127.0.0.1), a service that is down, role checks, and the import rule."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from argon2 import PasswordHasher

from ui import messages
from ui.accounts import AccountStore
from ui.context import UiContext
from ui.settings import UiConfig

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["benign", "malignant", "normal"]
CARD = {
    "model": {"name": "oncoflow-test", "version": "4", "tag": "oncoflow-model:abc"},
    "architecture": "small_cnn",
    "classes": CLASSES,
    "preprocessing": {"size": 32, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3},
    "metrics": {"macro_f1": 0.71, "accuracy": 0.8},
    "privacy": {"epsilon": 8.0, "delta": 1e-5},
    "intended_use": "Decision support for trained clinicians.",
    "similar_cases": 10,
    "similar_source": "site-local case library",
    "contents": {
        "weights": True,
        "background": "constant grey levels (not patient data)",
        "case_index": 0,
        "training_images": False,
    },
}


def test_ui_never_imports_torch_or_components():
    """The UI imports of components/ only the stdlib-only audit chain it shares with the
    service (components/audit.py)."""
    allowed = "('components', 'components.audit')"
    code = (
        "import sys, ui.app, ui.__main__, serving.client\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'components'))"
        f" and m not in {allowed}]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------- a fake service


class FakeService(BaseHTTPRequestHandler):
    """Answers like the diagnosis service; `behaviour` picks the /predict reply."""

    behaviour = "ok"
    seen: ClassVar[list[dict]] = []

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/readyz":
            self._send(200, {})
        elif self.path == "/model_card":
            self._send(200, CARD)
        else:
            self._send(404, {"error": {"type": "NotFound", "message": "no route"}})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        FakeService.seen.append(
            {"path": self.path, "auth": self.headers.get("authorization"), "body": body}
        )
        extra = {
            "/explain": self._explain,
            "/similar": self._similar,
            "/report": self._report,
            "/chat/stream": self._chat,
        }
        if self.path in extra:
            extra[self.path]()
        elif self.path != "/predict":
            self._send(404, {"error": {"type": "HTTPError", "message": "Not Found"}})
        elif FakeService.behaviour == "bad-image":
            self._send(400, {"error": {"type": "InputError", "message": "not an image"}})
        elif FakeService.behaviour == "crash":
            self._send(500, {"error": {"type": "ModelError", "message": "boom at line 3"}})
        else:
            self._send(
                200,
                {
                    "label": "malignant",
                    "probabilities": {"benign": 0.2, "malignant": 0.7, "normal": 0.1},
                    "model": CARD["model"],
                    "latency_ms": 42.0,
                },
            )

    def _explain(self) -> None:
        self._send(
            200,
            {
                "label": "malignant",
                "probabilities": PROBS,
                "target": "malignant",
                "method": "gradcam",
                "overlay_png": b64png((32, 32)),
                "heatmap_png": b64png((16, 16)),
                "heat": {"text": "The heat is focal, centred in the upper left.", "flat": False},
                "shap_png": b64png((16, 16)),
                "shap_image": {
                    "expected": 0.3,
                    "probability": 0.7,
                    "total": 0.4,
                    "nsamples": 8,
                    "background_size": 4,
                },
                "warnings": [],
                "model": CARD["model"],
                "latency_ms": 80.0,
            },
        )

    def _similar(self) -> None:
        if FakeService.behaviour == "no-library":
            message = "this server has no site-local case library; build one with ..."
            self._send(404, {"error": {"type": "NoCaseLibrary", "message": message}})
            return
        self._send(
            200,
            {
                "label": "malignant",
                "neighbours": [
                    {
                        "rank": 2,
                        "label": "benign",
                        "distance": 0.2,
                        "thumbnail_png": b64png((8, 8)),
                    },
                    {
                        "rank": 1,
                        "label": "malignant",
                        "distance": 0.1,
                        "thumbnail_png": b64png((8, 8)),
                    },
                ],
                "index_size": 10,
                "source": "site-local case library",
                "model": CARD["model"],
                "latency_ms": 5.0,
            },
        )

    def _report(self) -> None:
        data = b"%PDF-1.4 fake report"
        self.send_response(200)
        self.send_header("content-type", "application/pdf")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chat(self) -> None:
        answer = {
            "text": "Grad-CAM shows where the model looked. [1] Not medical advice.",
            "citations": [
                {
                    "n": 1,
                    "note_id": "gradcam",
                    "title": "Grad-CAM",
                    "section": "Reading the map",
                    "sources": [],
                }
            ],
            "refused": False,
            "disclaimer": "Not medical advice.",
            "backend": "fake",
            "session_id": "s",
        }
        events = (
            'event: delta\ndata: {"text": "Grad-CAM shows "}\n\n'
            'event: delta\ndata: {"text": "where the model looked."}\n\n'
            f"event: answer\ndata: {json.dumps(answer)}\n\n"
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-length", str(len(events)))
        self.end_headers()
        self.wfile.write(events)


PROBS = {"benign": 0.2, "malignant": 0.7, "normal": 0.1}


def b64png(size) -> str:
    import base64

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def fake_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeService)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def closed_port_url() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens after close


def make_app(tmp_path, url):
    from ui.app import build_app

    config = UiConfig(
        service_url=url,
        api_key="k-123",
        workspace=tmp_path,
        db_path=tmp_path / "ui.db",
        request_timeout_s=5,
    )
    ctx = UiContext.create(config, env={})
    ctx.accounts = AccountStore(
        ctx.db, hasher=PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    )
    ctx.sessions.accounts = ctx.accounts
    ctx.care.accounts = ctx.accounts
    admin = ctx.accounts.create_admin("chief", "admin-pass-0001")
    ctx.accounts.create_user(admin, "dr.lee", "clinic-pass-0001", "clinician")
    return build_app(ctx)


def png_file(tmp_path) -> str:
    from PIL import Image

    path = tmp_path / "Jane_Doe_MRN123.png"  # a name that must never leave the UI
    Image.new("RGB", (40, 30), (120, 60, 30)).save(path)
    return str(path)


def sign_in(app, name, password):
    return app.login(name, password)[app.token]


class NoProgress:
    def __call__(self, *args, **kwargs) -> None:
        pass


def analyse(app, token, path, case_ref=""):
    d = app.diagnose
    return d.analyse(NoProgress(), token, None, path, case_ref, [])


def text(value) -> str:
    return str(value)


@pytest.fixture(scope="module")
def built(tmp_path_factory, fake_url):
    tmp = tmp_path_factory.mktemp("ui")
    return make_app(tmp, fake_url), tmp


def test_login_refuses_a_wrong_password_and_signs_in(built):
    app, _ = built
    out = app.login("dr.lee", "wrong-password")
    assert any("wrong password" in text(v) for v in out.values())
    assert app.ctx.sessions.user(sign_in(app, "dr.lee", "clinic-pass-0001")).username == "dr.lee"


def test_prediction_is_stored_and_shown(built):
    app, tmp = built
    FakeService.behaviour, FakeService.seen = "ok", []
    token = sign_in(app, "dr.lee", "clinic-pass-0001")
    out = analyse(app, token, png_file(tmp), "TB-0412")
    d = app.diagnose
    assert set(out) <= set(d._result_outputs())  # Gradio refuses undeclared outputs
    assert "Malignant" in out[d.result] and "70.0%" in out[d.result]
    case = out[d.case]
    assert case.prediction.label == "malignant" and case.case_ref == "TB-0412"
    stored = app.ctx.cases.search(app.ctx.sessions.user(token))
    assert [(c.id, c.label, c.input_kind, c.case_ref) for c in stored] == [
        (case.case_id, "malignant", "png", "TB-0412")
    ]
    request = FakeService.seen[-1]
    assert request["auth"] == "Bearer k-123"
    assert b"Jane_Doe" not in request["body"] and b"MRN123" not in request["body"]

    feedback = d.give_feedback(token, case, "Disagree", "benign", "looks benign")
    assert "saved" in feedback
    [rated] = app.ctx.cases.search(app.ctx.sessions.user(token))
    assert (rated.feedback_agree, rated.true_label) == (False, "benign")


def test_service_errors_become_plain_language(built):
    app, tmp = built
    token = sign_in(app, "dr.lee", "clinic-pass-0001")
    d = app.diagnose
    FakeService.behaviour = "bad-image"
    out = analyse(app, token, png_file(tmp))
    assert "could not use this input: not an image" in out[d.notice]
    assert set(out) <= set(d._result_outputs())
    assert out[d.case] is None
    FakeService.behaviour = "crash"
    out = analyse(app, token, png_file(tmp))
    assert messages.INTERNAL[:40] in out[d.notice] and "line 3" not in out[d.notice]
    FakeService.behaviour = "ok"


def test_service_down_gives_a_friendly_message(tmp_path):
    app = make_app(tmp_path, closed_port_url())
    token = sign_in(app, "dr.lee", "clinic-pass-0001")
    out = analyse(app, token, png_file(tmp_path))
    assert messages.UNREACHABLE in out[app.diagnose.notice].replace("&#x27;", "'")
    assert messages.UNREACHABLE in app.model.refresh(token).replace("&#x27;", "'")
    assert app.ctx.cases.search(app.ctx.sessions.user(token)) == []  # nothing half-stored


def test_timeouts_and_auth_failures_have_their_own_messages():
    from serving.client import ServiceError

    assert messages.friendly(ServiceError(0, "Timeout", "POST /predict timed out")) == (
        messages.TIMEOUT
    )
    assert messages.friendly(ServiceError(401, "Unauthorized", "bad key")) == (
        messages.NOT_AUTHORISED
    )
    assert messages.friendly(ServiceError(503, "Overloaded", "busy")) == messages.STARTING
    assert messages.friendly(RuntimeError("secret internals")) == messages.UNEXPECTED


def test_clinician_is_refused_by_admin_handlers(built):
    app, _ = built
    token = sign_in(app, "dr.lee", "clinic-pass-0001")
    notice = app.analytics.refresh(token, 0.6)[0]
    assert "administrators only" in notice
    notice = app.users.create(token, "mallory", "some-password-9", "admin")[0]
    assert "administrators only" in notice
    assert app.ctx.accounts.find("mallory") is None
    out = app.login("dr.lee", "clinic-pass-0001")
    tabs = {k.elem_id: v.visible for k, v in out.items() if type(v).__name__ == "Tab"}
    hidden = ("of-tab-analytics", "of-tab-users", "of-tab-audit", "of-tab-patient")
    assert all(tabs[t] is False for t in hidden)  # admin and patient tabs stay hidden
    assert tabs["of-tab-worklist"] is True and tabs["of-tab-diagnose"] is True
    assert "administrators only" in app.audit.refresh(token)[0]


def test_admin_sees_analytics_and_creates_users(built):
    app, _ = built
    token = sign_in(app, "chief", "admin-pass-0001")
    notice, kpis, *_ = app.analytics.refresh(token, 0.6)
    assert notice == "" and "Predictions" in kpis
    out = app.users.create(token, "dr.new", "fresh-password-1", "clinician")
    assert "created" in out[0]
    assert app.ctx.accounts.find("dr.new").role == "clinician"


def test_expired_session_is_refused(built):
    app, tmp = built
    token = sign_in(app, "dr.lee", "clinic-pass-0001")
    app.ctx.sessions.revoke(token)
    out = analyse(app, token, png_file(tmp))
    assert "sign in" in out[app.diagnose.notice]
    state = app.check_session(token)
    assert any("expired" in text(v) for v in state.values())


def test_explanations_similar_cases_report_and_assistant(built):
    app, tmp = built
    FakeService.behaviour, FakeService.seen = "ok", []
    token = sign_in(app, "dr.lee", "clinic-pass-0001")
    d = app.diagnose
    case = analyse(app, token, png_file(tmp), "TB-0412")[d.case]

    overlay, heatmap, cam_text, shap, shap_words, warn, case = d.explain(
        token, case, 0.5, "gradcam", "malignant", NoProgress()
    )
    assert overlay.size == (40, 30)  # blended over the upload itself, not the service's copy
    assert max(heatmap.size) == 360 and max(shap.size) == 360  # enlarged for display
    assert "focal" in cam_text and "Malignant" in cam_text and warn == ""
    assert "30.0%" in shap_words and "70.0%" in shap_words
    lighter = d.reblend(case, 0.1)  # opacity changes need no new request
    assert lighter.size == overlay.size and lighter.getpixel((5, 5)) != overlay.getpixel((5, 5))
    assert [r["path"] for r in FakeService.seen].count("/explain") == 1

    items, notice, case = d.find_similar(token, case)
    assert [caption for _, caption in items] == ["Malignant · 0.90", "Benign · 0.80"]
    assert "From this hospital&#x27;s own case library (10 cases)." in notice
    FakeService.behaviour = "no-library"  # a server without a site-local case library
    items, notice, case = d.find_similar(token, case)
    assert items is None and "info" in notice and "own case library" in notice
    assert "oncoflow case-library build" in notice and "no patient images" in notice
    FakeService.behaviour = "ok"
    card = app.model.refresh(token).replace("&#x27;", "'")
    assert "10 cases from this hospital's own case library" in card
    assert "SHAP reference: constant grey levels (not patient data)" in card
    assert "no similar-case index; no training images" in card

    update, notice = d.make_report(token, case, "gradcam", None, NoProgress())
    pdf = Path(update["value"])
    assert pdf.read_bytes().startswith(b"%PDF") and "ready" in notice
    report_request = next(r for r in FakeService.seen if r["path"] == "/report")
    assert b"TB-0412" in report_request["body"] and b"Jane_Doe" not in report_request["body"]

    answers = list(app.assistant.ask(token, None, "What does Grad-CAM show?", [], case, True))
    history = answers[-1][0]
    assert history[0] == {"role": "user", "content": "What does Grad-CAM show?"}
    assert history[-1]["content"].startswith("Grad-CAM shows where the model looked.")
    assert "Sources:** [1] Grad-CAM — Reading the map" in history[-1]["content"]
    chat = json.loads(next(r for r in FakeService.seen if r["path"] == "/chat/stream")["body"])
    assert chat["case"]["predicted_label"] == "malignant"
    assert chat["case"]["gradcam_summary"].startswith("The heat is focal")


def test_history_shows_own_cases_and_admins_see_all(built):
    app, tmp = built
    lee = sign_in(app, "dr.lee", "clinic-pass-0001")
    analyse(app, lee, png_file(tmp), "HX-1")
    frame, summary, *_ = app.history.search(lee, "HX-1", "", "any", "", "", "")
    assert list(frame.value["headers"])[:3] == ["Case #", "Date (UTC)", "Case id"]
    assert "Clinician" not in frame.value["headers"]
    assert [row[2] for row in frame.value["data"]] == ["HX-1"] and "1 case" in summary
    chief = sign_in(app, "chief", "admin-pass-0001")
    frame, summary, *_ = app.history.search(chief, "", "", "any", "", "", "")
    assert "Clinician" in frame.value["headers"] and "all users" in summary
    assert "dr.lee" in {row[3] for row in frame.value["data"]}
    frame, summary, *_ = app.history.search(lee, "", "", "any", "not-a-date", "", "")
    assert "date like" in summary


def test_clinical_fields_become_a_record():
    from ui.clinical import record_from_fields
    from ui.errors import InvalidInput

    schema = [
        {"name": "age", "type": "int", "min": 18, "max": 110, "unit": "years"},
        {"name": "smoker", "type": "bool", "required": False},
        {"name": "site", "type": "category", "allowed": ["left", "right"]},
        {"name": "size_mm", "type": "float", "min": 0, "max": 100, "required": False},
    ]
    assert record_from_fields(schema, [54.0, "Yes", "left", None]) == {
        "age": 54,
        "smoker": True,
        "site": "left",
    }
    with pytest.raises(InvalidInput) as problems:
        record_from_fields(schema, [12, None, "middle", 250.0])
    text = str(problems.value)
    assert "Age (years) must be between 18 and 110" in text
    assert "Site must be one of left, right" in text and "Size mm" in text


def test_dicom_preview_without_the_service():
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    from ui.cases import input_kind
    from ui.images import preview

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.set_pixel_data((np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 6), "MONOCHROME2", 12)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    assert input_kind(data) == "dicom"
    picture = preview(data)
    assert picture.size == (30, 20) and picture.mode == "RGB"
    assert picture.getpixel((0, 0)) == (0, 0, 0) and picture.getpixel((29, 19)) == (255, 255, 255)


def test_care_workflow_through_the_handlers(built):
    """Clinician: analyse, invite, review, release; patient: sign up, read, ask; clinician
    answers; a second patient gets nothing; the admin's audit view says the chain is intact."""
    import re

    app, tmp = built
    FakeService.behaviour = "ok"
    w, p = app.worklist, app.patient
    doctor = sign_in(app, "dr.lee", "clinic-pass-0001")
    case = analyse(app, doctor, png_file(tmp), "TB-0500")[app.diagnose.case]
    number = str(case.case_id)
    frame, summary = w.refresh(doctor, "open", False, "", "")
    assert case.case_id in list(frame["Case #"]) and "riskiest first" in summary
    code = re.search(r"<b>([A-Z0-9-]{17})</b>", w.invite(doctor, number)[3]).group(1)
    assert "before release" in w.release(doctor, number, "")[3]  # new: review first
    assert "reviewed" in w.review(doctor, number)[3]
    assert "released" in w.release(doctor, number, "Follow-up in June.")[3]

    out = app.sign_up(code, "pat.care", "patient-pass-01", "patient-pass-01")
    patient = out[app.token]
    table, _ = p.refresh(patient)
    assert list(table["Case #"]) == [case.case_id]
    card, download, thread, notice = p.open_case(patient, number)
    assert "A clinician reviewed this result" in card and "Follow-up in June." in card
    assert Path(download["value"]).read_bytes().startswith(b"%PDF") and notice == ""
    assert "You asked" in p.ask(patient, number, "Is this serious?")[0]
    _, doctor_thread, question, _ = w.open_case(doctor, number)
    assert "Is this serious?" in doctor_thread
    w.send_answer(doctor, number, question["value"], "No, it is a routine check.")
    assert "No, it is a routine check." in p.open_case(patient, number)[2]

    # a second patient: nothing of the first one's case, whatever they send
    other = sign_in(app, "chief", "admin-pass-0001")
    doctor_case = analyse(app, doctor, png_file(tmp), "TB-0501")[app.diagnose.case]
    code2 = re.search(r"<b>([A-Z0-9-]{17})</b>", w.invite(doctor, doctor_case.case_id)[3])
    intruder = app.sign_up(code2.group(1), "pat.other", "patient-pass-02", "patient-pass-02")
    intruder = intruder[app.token]
    card, download, thread, notice = p.open_case(intruder, number)
    assert card == "" and thread == "" and "not found" in notice
    assert "not found" in p.ask(intruder, number, "hello")[1]
    refused = analyse(app, intruder, png_file(tmp))[app.diagnose.notice]
    assert "cannot open this page" in refused  # staff handlers refuse patient sessions
    assert "cannot open this page" in w.open_case(intruder, number)[3]
    status, entries = app.audit.refresh(other)
    assert "Chain intact" in status and "question.answer" in list(entries["Action"])
