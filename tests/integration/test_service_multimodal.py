"""The diagnosis service with a fusion bundle (image + clinical record), over real HTTP.

A small fusion model is trained for a few epochs on synthetic lesion images and a synthetic
screening table (the label needs both: a lesion AND a positive HPV test), packaged with a
SHAP background for both inputs, and served by `bentoml serve` with a site-local case library
of image + record cases embedded by the served model.
Every image endpoint then requires a clinical record checked against the bundle's schema.
"""

from __future__ import annotations

import io
import json
import time

import httpx
import numpy as np
import pytest

from serving.client import DiagnosisClient, ServiceError

pytestmark = pytest.mark.integration

KEY = "fusion-key-1"
CLASSES = ["low_risk", "high_risk"]
SCHEMA = [
    {"name": "age", "type": "int", "min": 18, "max": 90, "unit": "years"},
    {"name": "hpv_positive", "type": "bool"},
    {"name": "smoker", "type": "bool", "required": False},
    {"name": "contraception", "type": "category", "allowed": ["none", "pill", "iud"]},
]
RECORD = {"age": 44, "hpv_positive": True, "smoker": False, "contraception": "pill"}
SIZE = 32


def screening(n_per_class: int, seed: int):
    """uint8 images (N,3,H,W), records, labels: high risk = lesion seen AND hpv_positive."""
    from components.data.synthetic import make_synthetic

    data = make_synthetic(n_per_class, size=SIZE, seed=seed)
    rng = np.random.default_rng(seed + 100)
    hpv = rng.random(len(data.labels)) < 0.5
    rows = [
        {
            "age": int(rng.integers(25, 65)),
            "hpv_positive": bool(hpv[i]),
            "smoker": bool(rng.random() < 0.3),
            "contraception": str(rng.choice(["none", "pill", "iud"])),
        }
        for i in range(len(data.labels))
    ]
    labels = ((data.labels > 0) & hpv).astype(np.int64)
    return data.images.transpose(0, 3, 1, 2).copy(), rows, labels


def png_of(image_chw: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image_chw.transpose(1, 2, 0)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def data():
    return screening(20, seed=0)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, data):
    import torch
    import torch.nn.functional as F

    from components.bundle import ModelBundle
    from components.data.preprocess import Preprocessing
    from components.explain.background import fusion_background
    from components.models.fusion import build_fusion_model
    from components.models.tabular import encode_table

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images, rows, labels = data
        preprocessing = Preprocessing(size=SIZE, channels=3)
        x_img = preprocessing.normalise(torch.from_numpy(images))
        x_tab = encode_table(rows, SCHEMA)
        y = torch.from_numpy(labels)
        kwargs = {"num_classes": 2, "width": 4, "tabular_hidden": [8], "fusion_hidden": 8}
        torch.manual_seed(0)
        model = build_fusion_model(tabular_schema=SCHEMA, **kwargs)
        model.fit_normalisation(x_tab)
        optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(4):
            model.train()
            for start in range(0, len(y), 16):
                optimiser.zero_grad()
                logits = model(x_img[start : start + 16], x_tab[start : start + 16])
                F.cross_entropy(logits, y[start : start + 16]).backward()
                optimiser.step()
        model.eval()
        bundle = ModelBundle(
            architecture="fusion",
            architecture_kwargs=kwargs,  # the schema comes from bundle.tabular_schema
            class_names=CLASSES,
            preprocessing=preprocessing,
            state_dict=model.state_dict(),
            metrics={"balanced_accuracy": 0.5},
            data_fingerprint="e" * 64,
            tabular_schema=SCHEMA,
            background=fusion_background(x_img[:8], x_tab[:8]),
        )
        return bundle.save(tmp_path_factory.mktemp("fusion") / "bundle")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def case_library(bundle_dir, data, tmp_path_factory):
    """The site's own cases (image + clinical record), embedded by the served fusion model."""
    from components.bundle import ModelBundle
    from components.case_library import build_case_library
    from components.models.tabular import encode_table

    images, rows, labels = data
    bundle = ModelBundle.load(bundle_dir)
    out = tmp_path_factory.mktemp("case-library")
    return build_case_library(bundle, images, labels, out, records=encode_table(rows, SCHEMA))


@pytest.fixture(scope="module")
def server(serve_bundle, bundle_dir, case_library, tmp_path_factory):
    env = {
        "ONCOFLOW_CASE_LIBRARY": str(case_library),
        "ONCOFLOW_API_KEYS": KEY,
        "ONCOFLOW_TORCH_THREADS": "1",
        "ONCOFLOW_CHAT": "0",  # this module checks the multimodal endpoints
    }
    base, proc = serve_bundle(bundle_dir, tmp_path_factory.mktemp("bentoml"), env)
    yield base, proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    with DiagnosisClient(server[0], api_key=KEY, timeout=60) as c:
        yield c


def in_process(bundle_dir, image: bytes, record: dict) -> list[float]:
    import torch

    from components.bundle import ModelBundle
    from components.data.images import decode_bytes
    from components.models.tabular import encode_record
    from validation.clinical_schema import check_clinical_record

    bundle = ModelBundle.load(bundle_dir)
    model = bundle.build_model()
    x = bundle.preprocessing.to_tensor(decode_bytes(image)).unsqueeze(0)
    row = encode_record(check_clinical_record(record, SCHEMA), SCHEMA).unsqueeze(0)
    with torch.no_grad():
        return torch.softmax(model(x, row), dim=1)[0].tolist()


def test_predict_uses_image_and_record(client, bundle_dir, data):
    images = data[0]
    for i, record in ((0, RECORD), (3, RECORD | {"hpv_positive": False, "smoker": None})):
        image = png_of(images[i])
        answer = client.predict(image, "x.png", clinical=record)
        expected = in_process(bundle_dir, image, record)
        assert [answer.probabilities[c] for c in CLASSES] == pytest.approx(expected, abs=1e-5)
        assert answer.label == CLASSES[int(np.argmax(expected))]
    positive = client.predict(png_of(images[0]), clinical=RECORD | {"hpv_positive": True})
    negative = client.predict(png_of(images[0]), clinical=RECORD | {"hpv_positive": False})
    assert positive.probabilities != negative.probabilities  # the record is used


BAD_RECORDS = {  # clinical value, phrases the 422 message must contain
    "missing": (None, ["needs a clinical record", "age", "contraception"]),
    "not json": ("{age: 44", ["not valid JSON"]),
    "not an object": (json.dumps([44, True]), ["clinical"]),
    "bad fields": (
        json.dumps({"age": 130, "hpv_positive": "maybe", "contraception": "ring", "name": "x"}),
        [
            "age: out of range",
            "above maximum 90",
            "hpv_positive: wrong type",
            "contraception: not allowed",
            "name: unknown field",
        ],
    ),
    "not a number": (
        json.dumps({"age": "forty", "hpv_positive": True, "contraception": "iud"}),
        ["age: wrong type", "not a number"],
    ),
    "required missing": (
        json.dumps({"age": 44, "contraception": "iud"}),
        ["hpv_positive: missing (required)"],
    ),
}


@pytest.mark.parametrize("endpoint", ["/predict", "/explain", "/similar", "/report"])
@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_clinical_records_get_422_naming_the_fields(server, client, data, endpoint, case):
    base, _ = server
    value, phrases = BAD_RECORDS[case]
    form = {} if value is None else {"clinical": value}
    response = httpx.post(
        base + endpoint,
        files={"image": ("x.png", png_of(data[0][1]), "image/png")},
        data=form,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    for phrase in phrases:
        assert phrase in message, (phrase, message)
    assert client.predict(png_of(data[0][1]), clinical=RECORD).label in CLASSES


def test_explain_gives_clinical_shap_and_grad_cam(client, data):
    answer = client.explain(png_of(data[0][2]), clinical=RECORD, target="high_risk", nsamples=8)
    assert answer.target == "high_risk" and answer.heat is not None and answer.overlay_png
    names = [f.feature for f in answer.tabular_shap]
    assert sorted(names) == sorted(f["name"] for f in SCHEMA)
    magnitudes = [abs(f.shap) for f in answer.tabular_shap]
    assert magnitudes == sorted(magnitudes, reverse=True)
    shown = {f.feature: f.value for f in answer.tabular_shap}
    assert shown["age"] == 44 and shown["contraception"] == "pill"
    assert answer.shap_image is not None and answer.shap_image.background_size == 8


def test_similar_and_report_with_a_record(client, data):
    from pypdf import PdfReader

    images, _, labels = data
    found = client.similar(png_of(images[5]), clinical=RECORD, k=3)
    assert len(found.neighbours) == 3 and found.index_size == len(labels)
    assert found.source == "site-local case library"
    pdf = client.report(png_of(images[5]), clinical=RECORD)
    pages = PdfReader(io.BytesIO(pdf)).pages
    text = " ".join(" ".join(page.extract_text() for page in pages).split())
    assert "Image and Grad-CAM" in text and "overlay for" in text  # the image's explanation
    assert "Top SHAP features" in text  # beside the clinical record's
    for feature in ("Age", "Hpv positive", "Contraception"):
        assert feature in text
    assert sum(len(page.images) for page in pages) == 2  # the upload and its Grad-CAM overlay


def test_card_and_endpoints_this_model_does_not_offer(client, data):
    card = client.model_card()
    assert card.kind == "fusion" and card.architecture == "fusion"
    assert [f.name for f in card.clinical_schema] == [f["name"] for f in SCHEMA]
    assert card.clinical_schema[0].max == 90 and card.clinical_schema[3].allowed
    assert not card.chat and card.similar_cases == len(data[2])
    with pytest.raises(ServiceError) as info:
        client.predict_tabular(RECORD)
    assert info.value.status == 404 and "needs an image" in info.value.message
    with pytest.raises(ServiceError) as info:
        client.chat("What is SHAP?", "s1")
    assert info.value.status == 503 and "chat is disabled" in info.value.message


def test_clinical_values_never_reach_the_log(server, client, data):
    base, proc = server
    client.predict(png_of(data[0][0]), clinical=RECORD)
    httpx.post(
        base + "/predict",
        files={"image": ("x.png", png_of(data[0][0]), "image/png")},
        data={"clinical": json.dumps(RECORD | {"patient_name": "Zorblax Quibble"})},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    time.sleep(0.5)
    log = proc.log_path.read_text(errors="replace")
    assert "Zorblax" not in log and "patient_name" not in log
    assert " POST /predict -> 422 " in log
