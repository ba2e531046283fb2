"""SHAP: the informative clinical feature ranks first; image attributions sit on the lesion."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import binary_dilation

from components.data.preprocess import Preprocessing
from components.data.synthetic import make_synthetic
from components.errors import InputError, ModelError
from components.explain.background import fusion_background, grey_levels, split_background
from components.explain.shap_image import explain_shap_image, shap_png
from components.explain.shap_tabular import explain_tabular
from components.models import build_model
from components.models.tabular import TabularLayout, build_tabular_model

SCHEMA = [
    {"name": "marker", "type": "float", "min": -10, "max": 10, "unit": "ng/mL"},
    {"name": "age", "type": "float", "min": 0, "max": 120, "unit": "years"},
    {"name": "bmi", "type": "float", "min": 10, "max": 60, "unit": "kg/m2"},
    {"name": "smoker", "type": "bool"},
    {"name": "site", "type": "category", "allowed": ["north", "south", "east"]},
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread is as fast and leaves the shared CPU cores to others."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fit(model, inputs, y, epochs: int, lr: float = 3e-3, batch: int = 32) -> None:
    torch.manual_seed(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y))
        for start in range(0, len(y), batch):
            idx = order[start : start + batch]
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs[idx]), y[idx]).backward()
            optimiser.step()
    model.eval()


def _clinical_table(n: int, seed: int):
    """Only `marker` decides the class; the rest is noise of every feature type."""
    rng = np.random.default_rng(seed)
    rows = [
        {
            "marker": float(rng.normal()),
            "age": float(rng.uniform(20, 80)),
            "bmi": float(rng.normal(26, 4)),
            "smoker": bool(rng.random() < 0.3),
            "site": str(rng.choice(["north", "south", "east"])),
        }
        for _ in range(n)
    ]
    labels = np.array([int(r["marker"] > 0) for r in rows], dtype=np.int64)
    return rows, labels


@pytest.fixture(scope="module")
def tabular_task():
    layout = TabularLayout.from_schema(SCHEMA)
    rows, labels = _clinical_table(400, seed=0)
    x = torch.from_numpy(layout.encode_rows(rows))
    model = build_tabular_model(2, SCHEMA, hidden=[32, 16], dropout=0.0)
    model.fit_normalisation(x)
    _fit(model, x, torch.from_numpy(labels), epochs=25)
    test_rows, _ = _clinical_table(20, seed=1)
    return model, layout, x[:64], test_rows


def test_tabular_shap_ranks_the_informative_feature_first(tabular_task):
    model, layout, background, rows = tabular_task
    decisive = [r for r in rows if abs(r["marker"]) > 0.5]
    assert len(decisive) >= 5
    totals = {f["name"]: 0.0 for f in SCHEMA}
    for row in decisive:
        result = explain_tabular(model, layout.encode(row), background, nsamples=100)
        assert result.features[0]["feature"] == "marker"
        assert {f["feature"] for f in result.features} == set(totals)
        marker = result.features[0]
        assert marker["value"] == pytest.approx(row["marker"], rel=1e-5)
        assert marker["unit"] == "ng/mL"
        # the explained class is the predicted one, and marker pushes towards it
        assert result.target_class == int(row["marker"] > 0)
        assert marker["shap"] > 0
        for feature in result.features:
            totals[feature["feature"]] += abs(feature["shap"])
    assert max(totals, key=totals.get) == "marker"


def test_tabular_shap_adds_up_and_handles_missing_values(tabular_task):
    model, layout, background, rows = tabular_task
    row = dict(rows[0], bmi=None, site=None)
    result = explain_tabular(model, layout.encode(row), background, nsamples=1000, target_class=1)
    values = {f["feature"]: f for f in result.features}
    assert values["bmi"]["value"] is None and values["site"]["value"] is None
    assert values["smoker"]["value"] is row["smoker"]
    total = sum(f["shap"] for f in result.features)
    assert total == pytest.approx(result.probability - result.expected, abs=0.06)
    assert all(np.isfinite(f["shap"]) for f in result.features)
    assert result.top(2) == result.features[:2]


def test_tabular_shap_rejects_bad_input(tabular_task):
    model, layout, background, rows = tabular_task
    record = layout.encode(rows[0])
    with pytest.raises(InputError, match="columns"):
        explain_tabular(model, record[:-1], background)
    with pytest.raises(InputError, match="out of range"):
        explain_tabular(model, record, background, target_class=5)
    with pytest.raises(InputError, match="nsamples"):
        explain_tabular(model, record, background, nsamples=0)
    with pytest.raises(ModelError, match="background"):
        explain_tabular(model, record, None)
    with pytest.raises(ModelError, match="clinical record"):
        explain_tabular(build_model("small_cnn", 2, width=4), record, background)


@pytest.fixture(scope="module")
def lesion_model():
    """A small_cnn trained (briefly) to tell lesion from no lesion on 32 px images."""
    preprocessing = Preprocessing(size=32, channels=3)
    data = make_synthetic(60, size=32, seed=0)
    x = preprocessing.normalise(torch.from_numpy(data.images).permute(0, 3, 1, 2))
    y = torch.from_numpy((data.labels > 0).astype(np.int64))
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=2, width=8)
    _fit(model, x, y, epochs=5)
    test = make_synthetic(8, size=32, seed=1)
    xt = preprocessing.normalise(torch.from_numpy(test.images).permute(0, 3, 1, 2))
    return model, x[::10], test, xt


def test_image_shap_positive_mass_sits_on_the_lesion(lesion_model):
    model, background, test, xt = lesion_model
    with torch.no_grad():
        predicted = model(xt).argmax(1).numpy()
    picked = np.flatnonzero((test.labels > 0) & (predicted == 1))
    assert len(picked) >= 8
    shares, areas = [], []
    for i in picked:
        result = explain_shap_image(model, xt[i], background, nsamples=32, target_class=1)
        assert result.attribution.shape == (32, 32) and result.attribution.dtype == np.float32
        mask = test.masks[i]
        extent = binary_dilation(mask, iterations=round(float(np.sqrt(mask.sum() / np.pi))))
        positive = np.clip(result.attribution, 0, None)
        shares.append(positive[extent].sum() / positive.sum())
        areas.append(extent.mean())
    assert np.mean(shares) > 0.5
    assert np.mean(shares) > 2.5 * np.mean(areas)


def test_image_shap_adds_up_and_is_reproducible(lesion_model):
    model, background, _, xt = lesion_model
    first = explain_shap_image(model, xt[0], background, nsamples=200, seed=3)
    again = explain_shap_image(model, xt[0], background, nsamples=200, seed=3)
    np.testing.assert_array_equal(first.attribution, again.attribution)
    assert first.total == pytest.approx(first.probability - first.expected, abs=0.05)
    assert first.nsamples == 200 and first.background_size == len(background)
    other = explain_shap_image(model, xt[0], background, nsamples=8, target_class=0)
    assert other.target_class == 0


def test_image_shap_png_and_errors(lesion_model):
    model, background, test, xt = lesion_model
    result = explain_shap_image(model, xt[0], background, nsamples=8)
    plain = Image.open(io.BytesIO(shap_png(result.attribution)))
    blended = Image.open(io.BytesIO(shap_png(result.attribution, test.images[0])))
    assert plain.size == blended.size == (32, 32)
    with pytest.raises(ModelError, match="no SHAP background"):
        explain_shap_image(model, xt[0], None)
    with pytest.raises(ModelError, match="expected"):
        explain_shap_image(model, xt[0], background[:, :, :16])
    with pytest.raises(InputError, match="out of range"):
        explain_shap_image(model, xt[0], background, target_class=2)
    with pytest.raises(InputError, match="limit"):
        explain_shap_image(model, xt[0], background, nsamples=10**6)


def test_background_parts_are_told_apart():
    images, table = torch.zeros(4, 3, 8, 8), torch.zeros(4, 5)
    assert split_background(images)[1] is None and split_background(table)[0] is None
    image_part, table_part = split_background(fusion_background(images, table))
    assert image_part is images and table_part is table
    assert split_background(None) == (None, None)
    with pytest.raises(ModelError):
        split_background(torch.zeros(4))
    with pytest.raises(ModelError):
        split_background({"image": images, "audio": table})


def test_image_shap_against_grey_levels_sits_on_the_lesion_and_adds_up(lesion_model):
    """The default bundle background (constant grey levels, no patient data) explains too."""
    model, _, test, xt = lesion_model
    background = grey_levels(Preprocessing(size=32, channels=3), 8)
    assert background.shape == (8, 3, 32, 32)
    with torch.no_grad():
        predicted = model(xt).argmax(1).numpy()
    shares, areas = [], []
    for i in np.flatnonzero((test.labels > 0) & (predicted == 1)):
        result = explain_shap_image(model, xt[i], background, nsamples=32, target_class=1)
        assert result.background_size == 8
        mask = test.masks[i]
        extent = binary_dilation(mask, iterations=round(float(np.sqrt(mask.sum() / np.pi))))
        positive = np.clip(result.attribution, 0, None)
        shares.append(positive[extent].sum() / positive.sum())
        areas.append(extent.mean())
    assert np.mean(shares) > 0.5
    assert np.mean(shares) > 2.5 * np.mean(areas)
    # the paths from constant images are long: more samples for the sum to add up as closely
    exact = explain_shap_image(model, xt[0], background, nsamples=1000, seed=3)
    assert exact.total == pytest.approx(exact.probability - exact.expected, abs=0.05)
