"""The typed HTTP client against a scripted transport: requests it sends, answers it parses."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from serving.client import (
    DiagnosisClient,
    ServiceError,
    _sse_events,
    case_from,
    decode_png,
    new_session_id,
)
from serving.schemas import ChatResponse, ExplainResponse, PredictResponse

MODEL = {"name": "m", "version": "3", "tag": "oncoflow-model:abc"}
PREDICTION = {
    "label": "malignant",
    "probabilities": {"benign": 0.3, "malignant": 0.7},
    "model": MODEL,
    "latency_ms": 4.2,
}
ANSWER = {
    "text": "Grad-CAM shows ... [1]\n\ndisclaimer",
    "citations": [{"n": 1, "note_id": "grad-cam", "title": "Grad-CAM", "section": "What"}],
    "refused": False,
    "disclaimer": "disclaimer",
    "backend": "extractive",
    "session_id": "s1",
}


class Recorder:
    """A MockTransport handler that records requests and answers from a script."""

    def __init__(self, answer):
        self.answer = answer
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        return self.answer(request)


def client_with(answer) -> tuple[DiagnosisClient, Recorder]:
    recorder = Recorder(answer)
    client = DiagnosisClient(
        "http://svc:3000/", api_key="k1", transport=httpx.MockTransport(recorder)
    )
    return client, recorder


def multipart_parts(request: httpx.Request) -> dict[str, tuple[str | None, str, bytes]]:
    """name -> (filename, content type, body) of a multipart request."""
    boundary = request.headers["content-type"].split("boundary=")[1].encode()
    parts = {}
    for chunk in request.content.split(b"--" + boundary)[1:-1]:
        head, _, body = chunk.strip(b"\r\n").partition(b"\r\n\r\n")
        headers = head.decode()
        name = headers.split('name="')[1].split('"')[0]
        filename = headers.split('filename="')[1].split('"')[0] if "filename=" in headers else None
        ctype = ""
        for line in headers.split("\r\n"):
            if line.lower().startswith("content-type:"):
                ctype = line.split(":", 1)[1].strip()
        parts[name] = (filename, ctype, body)
    return parts


def test_importing_the_client_needs_neither_torch_nor_bentoml():
    code = (
        "import sys, serving.client; "
        "print(sorted(m for m in ('torch', 'bentoml', 'numpy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_predict_sends_the_image_without_its_file_name():
    client, recorder = client_with(lambda r: httpx.Response(200, json=PREDICTION))
    answer = client.predict(b"DICM-bytes", "Doe_John.dcm", clinical={"age": 41})
    assert isinstance(answer, PredictResponse) and answer.label == "malignant"
    request = recorder.requests[0]
    assert request.url == "http://svc:3000/predict"
    assert request.headers["authorization"] == "Bearer k1"
    parts = multipart_parts(request)
    assert parts["image"] == ("upload", "application/dicom", b"DICM-bytes")
    assert json.loads(parts["clinical"][2]) == {"age": 41}
    assert b"Doe_John" not in request.content


def test_explain_and_report_form_fields():
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/report":
            return httpx.Response(
                200, content=b"%PDF-1.4", headers={"content-type": "application/pdf"}
            )
        return httpx.Response(
            200, json=PREDICTION | {"target": "benign", "warnings": [], "latency_ms": 1.0}
        )

    client, recorder = client_with(answer)
    explained = client.explain(
        b"png", "x.png", method="gradcam++", target="benign", opacity=0.3, shap=False
    )
    assert isinstance(explained, ExplainResponse) and explained.target == "benign"
    parts = multipart_parts(recorder.requests[0])
    assert {k: v[2] for k, v in parts.items() if k != "image"} == {
        "method": b"gradcam++",
        "target": b"benign",
        "opacity": b"0.3",
        "shap": b"false",
    }
    assert parts["image"][1] == "image/png"
    assert client.report(b"png", case_id="case-1") == b"%PDF-1.4"
    report_parts = multipart_parts(recorder.requests[1])
    assert report_parts["case_id"][2] == b"case-1" and "target" not in report_parts


def test_a_report_that_is_not_a_pdf_is_an_error():
    client, _ = client_with(lambda r: httpx.Response(200, json={"oops": 1}))
    with pytest.raises(ServiceError, match="not a PDF"):
        client.report(b"png")


def test_errors_become_service_errors():
    envelope = {"error": {"type": "InputError", "message": "not an image"}}
    client, _ = client_with(lambda r: httpx.Response(422, json=envelope))
    with pytest.raises(ServiceError) as info:
        client.similar(b"x", k=3)
    assert (info.value.status, info.value.type, info.value.message) == (
        422,
        "InputError",
        "not an image",
    )
    client, _ = client_with(lambda r: httpx.Response(502, text="bad gateway"))
    with pytest.raises(ServiceError) as info:
        client.model_card()
    assert (info.value.status, info.value.type, info.value.message) == (
        502,
        "HTTPError",
        "bad gateway",
    )

    def unreachable(request):
        raise httpx.ConnectError("refused", request=request)

    client, _ = client_with(unreachable)
    with pytest.raises(ServiceError) as info:
        client.predict_tabular({"a": 1})
    assert info.value.status == 0 and info.value.type == "Unreachable"
    assert client.ready() is False

    def slow(request):
        raise httpx.ReadTimeout("slow", request=request)

    client, _ = client_with(slow)
    with pytest.raises(ServiceError) as info:
        client.chat("q", "s")
    assert info.value.status == 0 and info.value.type == "Timeout"


def sse(*events: tuple[str, dict]) -> bytes:
    return b"".join(f"event: {e}\ndata: {json.dumps(d)}\n\n".encode() for e, d in events)


def test_chat_stream_yields_pieces_then_the_answer():
    body = sse(("delta", {"text": "Grad-CAM "}), ("delta", {"text": "shows"}), ("answer", ANSWER))
    client, recorder = client_with(
        lambda r: httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
    )
    case = {"predicted_label": "malignant", "probabilities": {"benign": 0.3, "malignant": 0.7}}
    items = list(client.chat_stream("What is Grad-CAM?", "s1", case))
    assert items[:2] == ["Grad-CAM ", "shows"]
    assert isinstance(items[2], ChatResponse) and items[2].citations[0].note_id == "grad-cam"
    sent = json.loads(recorder.requests[0].content)
    expected_case = case | {"shap_features": []}
    assert sent == {"question": "What is Grad-CAM?", "session_id": "s1", "case": expected_case}
    assert "user_id" not in sent  # the service takes the user from the API key


def test_chat_stream_errors():
    body = sse(("delta", {"text": "a"}), ("error", {"error": {"type": "Boom", "message": "m"}}))
    client, _ = client_with(lambda r: httpx.Response(200, content=body))
    with pytest.raises(ServiceError, match="Boom"):
        list(client.chat_stream("q", "s"))
    envelope = {"error": {"type": "InputError", "message": "question is empty"}}
    client, _ = client_with(lambda r: httpx.Response(422, json=envelope))
    with pytest.raises(ServiceError) as info:
        list(client.chat_stream("", "s"))
    assert info.value.status == 422 and info.value.message == "question is empty"


def test_sse_parsing_edge_cases():
    lines = ["event: delta", 'data: {"text":', 'data:  "two lines"}', "", ": comment", "data: {}"]
    assert list(_sse_events(iter(lines))) == [("delta", {"text": "two lines"}), ("message", {})]


def test_chat_history_and_reset():
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/chat/history":
            turns = [{"role": "user", "text": "q"}, {"role": "assistant", "text": "a"}]
            return httpx.Response(200, json={"session_id": "s1", "turns": turns})
        return httpx.Response(200, json={"session_id": "s1", "cleared": True})

    client, recorder = client_with(answer)
    assert [t.role for t in client.chat_history("s1")] == ["user", "assistant"]
    client.chat_reset("s1")
    assert [r.url.path for r in recorder.requests] == ["/chat/history", "/chat/reset"]
    assert json.loads(recorder.requests[1].content) == {"session_id": "s1"}


def test_case_from_a_prediction_and_its_explanation():
    prediction = PredictResponse.model_validate(PREDICTION)
    features = [{"feature": f"f{i}", "value": i, "shap": 0.1 * i} for i in range(25)]
    explanation = ExplainResponse.model_validate(
        PREDICTION
        | {
            "target": "malignant",
            "heat": {"text": "The heat is focal.", "flat": False},
            "tabular_shap": features,
        }
    )
    case = case_from(prediction, explanation, clinical_note="Smoker, 40 pack-years.")
    assert case.predicted_label == "malignant" and case.probabilities["benign"] == 0.3
    assert case.gradcam_summary == "The heat is focal."
    assert len(case.shap_features) == 20 and case.shap_features[3].value == pytest.approx(0.3)
    assert case.clinical_note == "Smoker, 40 pack-years."
    assert case_from(explanation).gradcam_summary == "The heat is focal."
    assert case_from(prediction).shap_features == []


def test_small_helpers():
    assert decode_png(None) is None and decode_png("iVBORw==") == b"\x89PNG"
    first, second = new_session_id(), new_session_id()
    assert first != second and len(first) >= 20
