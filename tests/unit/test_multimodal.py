"""Clinical records: schema encoding, the tabular MLP on real data, and image + record fusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.bundle import ModelBundle
from components.data.preprocess import Preprocessing
from components.data.synthetic import make_synthetic
from components.errors import ConfigError, InputError, ModelError
from components.explain.background import fusion_background, split_background
from components.explain.gradcam import explain_gradcam
from components.explain.shap_image import explain_shap_image
from components.explain.shap_tabular import explain_tabular
from components.models import build_model
from components.models.fusion import build_fusion_model
from components.models.tabular import (
    TabularLayout,
    build_tabular_model,
    encode_record,
    encode_table,
    wisconsin_breast_cancer,
)
from validation.clinical_schema import check_clinical_record

EPOCHS = 16  # fusion test accuracy 0.99-1.0 over init seeds 0-5 (lr 1e-2)
SCREENING_SCHEMA = [
    {"name": "age", "type": "int", "min": 18, "max": 90, "unit": "years"},
    {"name": "hpv_positive", "type": "bool"},
    {"name": "smoker", "type": "bool", "required": False},
    {"name": "contraception", "type": "category", "allowed": ["none", "pill", "iud"]},
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread is as fast and leaves the shared CPU cores to others."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fit(model, inputs: tuple, y, epochs: int, lr: float = 3e-3, seed: int = 0) -> None:
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y))
        for start in range(0, len(y), 32):
            idx = order[start : start + 32]
            optimiser.zero_grad()
            logits = model(*(part[idx] for part in inputs))
            torch.nn.functional.cross_entropy(logits, y[idx]).backward()
            optimiser.step()
    model.eval()


def _accuracy(model, inputs: tuple, y) -> float:
    with torch.no_grad():
        return float((model(*inputs).argmax(1) == y).float().mean())


# --- encoding -------------------------------------------------------------------------------


def test_layout_columns_and_round_trip():
    layout = TabularLayout.from_schema(SCREENING_SCHEMA)
    assert layout.columns == (
        "age",
        "hpv_positive",
        "smoker",
        "contraception=none",
        "contraception=pill",
        "contraception=iud",
    )
    assert layout.standardised.tolist() == [True, False, False, False, False, False]
    record = {"age": 41, "hpv_positive": True, "smoker": False, "contraception": "iud"}
    row = encode_record(record, SCREENING_SCHEMA)
    assert row.tolist() == [41.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert layout.decode(row.numpy()) == record
    missing = layout.encode(
        {"age": 41, "hpv_positive": False, "smoker": None, "contraception": None}
    )
    assert np.isnan(missing[2]) and missing[3:].tolist() == [0.0, 0.0, 0.0]
    assert layout.decode(missing)["smoker"] is None


def test_encoding_refuses_what_it_cannot_encode():
    layout = TabularLayout.from_schema(SCREENING_SCHEMA)
    base = {"age": 41, "hpv_positive": True, "smoker": False, "contraception": "pill"}
    with pytest.raises(InputError, match="not in the schema"):
        layout.encode(base | {"name": "Jane Doe"})
    with pytest.raises(InputError, match="not a number"):
        layout.encode(base | {"age": "forty"})
    with pytest.raises(InputError, match="not a boolean"):
        layout.encode(base | {"hpv_positive": "maybe"})
    with pytest.raises(InputError, match="not one of"):
        layout.encode(base | {"contraception": "ring"})
    with pytest.raises(ConfigError):
        TabularLayout.from_schema([{"name": "x", "type": "text"}])
    with pytest.raises(ConfigError):
        TabularLayout.from_schema([])


def test_request_path_validates_then_encodes():
    """Serving calls `check_clinical_record` (ranges, types, required) before encoding."""
    raw = {"age": "41", "hpv_positive": "yes", "contraception": "pill"}
    clean = check_clinical_record(raw, SCREENING_SCHEMA)
    row = encode_record(clean, SCREENING_SCHEMA)
    assert row[0] == 41.0 and row[1] == 1.0 and np.isnan(row[2].item())
    with pytest.raises(InputError, match="age"):
        check_clinical_record(raw | {"age": 130}, SCREENING_SCHEMA)
    # an integer beyond any float is a bad value (4xx), not an OverflowError (500)
    with pytest.raises(InputError, match="age: wrong type: the number is too large"):
        check_clinical_record(raw | {"age": 10**400}, SCREENING_SCHEMA)


# --- tabular-only model on real data ---------------------------------------------------------


@pytest.fixture(scope="module")
def wisconsin():
    demo = wisconsin_breast_cancer()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(demo.labels))
    train, test = order[:450], order[450:]
    x = encode_table(demo.table, demo.schema)
    y = torch.as_tensor(np.array(demo.labels))
    model = build_tabular_model(2, demo.schema, hidden=[32, 16], dropout=0.1)
    model.fit_normalisation(x[train])
    _fit(model, (x[train],), y[train], epochs=30)
    return demo, model, x, y, train, test


def test_wisconsin_schema_accepts_every_row(wisconsin):
    demo = wisconsin[0]
    assert len(demo.schema) == 30 and demo.class_names == ["malignant", "benign"]
    for record in demo.table.head(50).to_dict(orient="records"):
        check_clinical_record(record, demo.schema)
    with pytest.raises(InputError, match="mean radius"):
        check_clinical_record(demo.table.iloc[0].to_dict() | {"mean radius": -1.0}, demo.schema)


def test_tabular_model_learns_wisconsin_and_explains_it(wisconsin):
    _, model, x, y, train, test = wisconsin
    assert _accuracy(model, (x[test],), y[test]) > 0.9
    result = explain_tabular(model, x[test[0]], x[train[:100]], nsamples=200)
    assert len(result.features) == 30
    magnitudes = [abs(f["shap"]) for f in result.features]
    assert magnitudes == sorted(magnitudes, reverse=True) and magnitudes[0] > 0
    with pytest.raises(ModelError, match="Grad-CAM"):
        model.cam_target_layers()


def test_normalisation_travels_in_the_state_dict(wisconsin):
    demo, model, x, *_ = wisconsin
    state = model.state_dict()
    assert {"encoder.fill", "encoder.shift", "encoder.scale", "encoder.fitted"} <= set(state)
    fresh = build_tabular_model(2, demo.schema, hidden=[32, 16], dropout=0.1)
    with pytest.raises(ModelError, match="never fitted"):
        fresh(x[:2])
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x[:8]), model(x[:8]))
    with_gap = x[:1].clone()
    with_gap[0, 0] = float("nan")
    with torch.no_grad():
        assert torch.isfinite(fresh(with_gap)).all()


# --- fusion -----------------------------------------------------------------------------------


def _screening(n_per_class: int, seed: int, preprocessing: Preprocessing):
    """Lesion images + records; positive only when a lesion is seen AND hpv_positive."""
    images = make_synthetic(n_per_class, size=preprocessing.size, seed=seed)
    rng = np.random.default_rng(seed + 100)
    n = len(images.labels)
    hpv = rng.random(n) < 0.5
    rows = [
        {
            "age": int(rng.integers(25, 65)),
            "hpv_positive": bool(hpv[i]),
            "smoker": bool(rng.random() < 0.3),
            "contraception": str(rng.choice(["none", "pill", "iud"])),
        }
        for i in range(n)
    ]
    x_img = preprocessing.normalise(torch.from_numpy(images.images).permute(0, 3, 1, 2))
    x_tab = encode_table(rows, SCREENING_SCHEMA)
    y = torch.from_numpy(((images.labels > 0) & hpv).astype(np.int64))
    return x_img, x_tab, y, images


@pytest.fixture(scope="module")
def screening():
    preprocessing = Preprocessing(size=32, channels=3)
    train = _screening(80, 0, preprocessing)
    test = _screening(30, 1, preprocessing)
    kwargs = {
        "num_classes": 2,
        "tabular_schema": SCREENING_SCHEMA,
        "image_architecture": "small_cnn",
        "width": 8,
        "tabular_hidden": [16, 8],
        "fusion_hidden": 16,
        "dropout": 0.0,
    }
    torch.manual_seed(0)
    fusion = build_fusion_model(**kwargs)
    fusion.fit_normalisation(train[1])
    _fit(fusion, (train[0], train[1]), train[2], epochs=EPOCHS, lr=1e-2)
    torch.manual_seed(0)
    image_only = build_model("small_cnn", num_classes=2, width=8)
    _fit(image_only, (train[0],), train[2], epochs=EPOCHS, lr=1e-2)
    return fusion, image_only, kwargs, train, test


def test_fusion_beats_image_only_when_the_record_matters(screening):
    fusion, image_only, _, _, (x_img, x_tab, y, _) = screening
    fused = _accuracy(fusion, (x_img, x_tab), y)
    alone = _accuracy(image_only, (x_img,), y)
    assert alone < 0.8  # without the record, half the lesion cases are a coin flip (≤ ~2/3)
    assert fused > 0.9 and fused > alone + 0.2


def test_fusion_explanations_use_both_inputs(screening):
    fusion, _, _, train, (x_img, x_tab, y, _) = screening
    positive = int(np.flatnonzero(y.numpy() == 1)[0])
    cam = explain_gradcam(fusion, x_img[positive], tabular=x_tab[positive], target_class=1)
    assert cam.heatmap.shape == (32, 32) and cam.target_class == 1
    with torch.no_grad():
        p = torch.softmax(fusion(x_img[positive : positive + 1], x_tab[positive : positive + 1]), 1)
    assert cam.probabilities == pytest.approx(p[0].tolist(), abs=1e-5)
    shap_tab = explain_tabular(
        fusion, x_tab[positive], train[1][:64], image=x_img[positive], target_class=1
    )
    assert shap_tab.features[0]["feature"] == "hpv_positive"
    assert shap_tab.features[0]["shap"] > 0
    shap_img = explain_shap_image(
        fusion, x_img[positive], train[0][:16], tabular=x_tab[positive], nsamples=16
    )
    assert shap_img.attribution.shape == (32, 32)
    with torch.no_grad():
        embedded = fusion.embed(x_img[:3], x_tab[:3])
    assert embedded.shape == (3, 16)


def test_fusion_bundle_round_trip(screening, tmp_path):
    fusion, _, kwargs, train, (x_img, x_tab, *_) = screening
    bundle = ModelBundle(
        architecture="fusion",
        architecture_kwargs={k: v for k, v in kwargs.items() if k != "num_classes"}
        | {"num_classes": 2},
        class_names=["low_risk", "high_risk"],
        preprocessing=Preprocessing(size=32, channels=3),
        state_dict=fusion.state_dict(),
        tabular_schema=SCREENING_SCHEMA,
        background=fusion_background(train[0][:8], train[1][:8]),
    )
    loaded = ModelBundle.load(bundle.save(tmp_path / "bundle"))
    image_bg, table_bg = split_background(loaded.background)
    assert image_bg.shape == (8, 3, 32, 32) and table_bg.shape == (8, 6)
    assert loaded.tabular_schema == SCREENING_SCHEMA
    rebuilt = build_fusion_model(**loaded.architecture_kwargs)
    rebuilt.load_state_dict(loaded.state_dict, strict=True)
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x_img[:4], x_tab[:4]), fusion(x_img[:4], x_tab[:4]))
    with pytest.raises(InputError, match="clinical records"):
        rebuilt(x_img[:4], x_tab[:3])
