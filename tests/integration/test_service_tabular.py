"""The diagnosis service with a tabular-only bundle: the Wisconsin breast-cancer MLP.

A `TabularMLP` is trained on 450 of scikit-learn's 569 fine-needle-aspirate records (30
features), packaged with an encoded background table for SHAP, and served by `bentoml serve`.
Records go to ``POST /predict_tabular`` and ``/explain_tabular`` as JSON; image endpoints are
refused with a message saying so.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from serving.client import DiagnosisClient, ServiceError

pytestmark = pytest.mark.integration

KEY = "tabular-key-1"


@pytest.fixture(scope="module")
def wisconsin():
    import torch
    import torch.nn.functional as F

    from components.models.tabular import build_tabular_model, encode_table, wisconsin_breast_cancer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        demo = wisconsin_breast_cancer()
        order = np.random.default_rng(0).permutation(len(demo.labels))
        train, test = order[:450], order[450:]
        x = encode_table(demo.table, demo.schema)
        y = torch.as_tensor(np.array(demo.labels))
        torch.manual_seed(0)
        model = build_tabular_model(2, demo.schema, hidden=[16, 8], dropout=0.0)
        model.fit_normalisation(x[train])
        optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(25):
            model.train()
            for start in range(0, len(train), 32):
                idx = train[start : start + 32]
                optimiser.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                optimiser.step()
        model.eval()
        with torch.no_grad():
            accuracy = float((model(x[test]).argmax(1) == y[test]).float().mean())
        return demo, model, x, train, test, accuracy
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, wisconsin):
    from components.bundle import ModelBundle
    from components.data.preprocess import Preprocessing

    demo, model, x, train, _, accuracy = wisconsin
    bundle = ModelBundle(
        architecture="tabular_mlp",
        architecture_kwargs={"num_classes": 2, "hidden": [16, 8], "dropout": 0.0},
        class_names=demo.class_names,
        preprocessing=Preprocessing(),  # unused by a tabular model
        state_dict=model.state_dict(),
        metrics={"accuracy": accuracy},
        data_fingerprint="w" * 64,
        tabular_schema=demo.schema,
        background=x[train[:60]],
    )
    return bundle.save(tmp_path_factory.mktemp("tabular") / "bundle")


@pytest.fixture(scope="module")
def server(serve_bundle, bundle_dir, tmp_path_factory):
    env = {
        "ONCOFLOW_API_KEYS": KEY,
        "ONCOFLOW_TORCH_THREADS": "1",
        "ONCOFLOW_CHAT": "0",
    }
    base, proc = serve_bundle(bundle_dir, tmp_path_factory.mktemp("bentoml"), env)
    yield base, proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    with DiagnosisClient(server[0], api_key=KEY, timeout=60) as c:
        yield c


def record(demo, i: int) -> dict:
    return {k: float(v) for k, v in demo.table.iloc[int(i)].items()}


def test_predictions_match_the_model_and_are_accurate(client, wisconsin):
    import torch

    demo, model, x, _, test, accuracy = wisconsin
    assert accuracy > 0.9
    correct = 0
    for i in test[:25]:
        answer = client.predict_tabular(record(demo, i))
        with torch.no_grad():
            expected = torch.softmax(model(x[i : i + 1]), dim=1)[0].tolist()
        got = [answer.probabilities[c] for c in demo.class_names]
        assert got == pytest.approx(expected, abs=1e-5)
        correct += answer.label == demo.class_names[demo.labels[i]]
    assert correct >= 21  # held-out records, served end to end


def test_explain_tabular_ranks_features(client, wisconsin):
    demo, *_, test, _ = wisconsin
    rec = record(demo, test[0])
    answer = client.explain_tabular(rec, target="malignant")
    assert answer.target == "malignant" and answer.method is None and answer.overlay_png is None
    assert len(answer.tabular_shap) == 10  # the ten largest of 30
    magnitudes = [abs(f.shap) for f in answer.tabular_shap]
    assert magnitudes == sorted(magnitudes, reverse=True) and magnitudes[0] > 0
    for feature in answer.tabular_shap:
        assert feature.value == pytest.approx(rec[feature.feature])
    other = client.explain_tabular(rec, target="benign")
    assert other.tabular_shap[0].feature == answer.tabular_shap[0].feature
    assert other.tabular_shap[0].shap == pytest.approx(-answer.tabular_shap[0].shap, abs=1e-3)


def test_bad_records_get_422_naming_the_fields(server, client, wisconsin):
    base, _ = server
    demo, *_, test, _ = wisconsin
    good = record(demo, test[1])
    auth = {"Authorization": f"Bearer {KEY}"}
    cases = {
        "out of range": (good | {"mean radius": -1.0}, ["mean radius", "below minimum 0"]),
        "missing": ({k: v for k, v in good.items() if k != "worst area"}, ["worst area"]),
        "unknown": (good | {"patient": "x"}, ["patient", "unknown field"]),
        "wrong type": (good | {"mean texture": "rough"}, ["mean texture", "not a number"]),
    }
    for path in ("/predict_tabular", "/explain_tabular"):
        for name, (clinical, phrases) in cases.items():
            body = {"clinical": clinical}
            response = httpx.post(base + path, json=body, headers=auth, timeout=60)
            assert response.status_code == 422, (path, name, response.text)
            message = response.json()["error"]["message"]
            assert all(p in message for p in phrases), (path, name, message)
        response = httpx.post(base + path, json={"record": good}, headers=auth, timeout=60)
        assert response.status_code == 422 and "clinical" in response.json()["error"]["message"]
    assert client.predict_tabular(good).label in demo.class_names


def test_image_endpoints_are_refused(server, client, wisconsin):
    import io

    from PIL import Image

    base, _ = server
    buffer = io.BytesIO()
    Image.new("L", (32, 32), 128).save(buffer, "PNG")
    for path in ("/predict", "/explain", "/similar", "/report"):
        response = httpx.post(
            base + path,
            files={"image": ("x.png", buffer.getvalue(), "image/png")},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
        )
        assert response.status_code == 404, (path, response.text)  # not for this model
        assert "clinical record only" in response.json()["error"]["message"]
    with pytest.raises(ServiceError):
        client.predict(buffer.getvalue(), "x.png")


def test_model_card_of_a_tabular_model(client, wisconsin):
    demo = wisconsin[0]
    card = client.model_card()
    assert card.kind == "tabular" and card.architecture == "tabular_mlp"
    assert card.preprocessing is None and card.explain_methods == []
    assert [f.name for f in card.clinical_schema] == [f["name"] for f in demo.schema]
    assert card.metrics["accuracy"] == pytest.approx(wisconsin[5])
    assert card.classes == demo.class_names and card.similar_cases == 0


def test_record_values_never_reach_the_log(server, client, wisconsin):
    _, proc = server
    demo, *_, test, _ = wisconsin
    client.predict_tabular(record(demo, test[2]) | {"mean radius": 12.3456789})
    time.sleep(0.5)
    log = proc.log_path.read_text(errors="replace")
    assert "12.3456789" not in log and " POST /predict_tabular -> 200 " in log
