"""The one-pass explainer (what /explain runs) agrees with the libraries it replaces.

- its Grad-CAM map is pytorch-grad-cam's `GradCAM` map (same model, image and class);
- its SHAP values estimate what shap's `GradientExplainer` estimates: at many samples both agree
  with each other and add up to probability - expected (completeness of expected gradients);
- the stratified samples use every background image equally and every position stratum once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.data.preprocess import Preprocessing
from components.data.synthetic import make_synthetic
from components.errors import InputError
from components.explain.background import grey_levels
from components.explain.gradcam import explain_gradcam
from components.explain.one_pass import (
    background_probabilities,
    explain_image,
    stratified_samples,
)
from components.explain.shap_image import explain_shap_image
from components.models import build_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lesion_model():
    """small_cnn trained briefly to tell lesion from no lesion on 32 px synthetic images."""
    preprocessing = Preprocessing(size=32, channels=3)
    data = make_synthetic(60, size=32, seed=0)
    x = preprocessing.normalise(torch.from_numpy(data.images).permute(0, 3, 1, 2))
    y = torch.from_numpy((data.labels > 0).astype(np.int64))
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=2, width=8)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(5):
        model.train()
        for start in range(0, len(y), 20):
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(
                model(x[start : start + 20]), y[start : start + 20]
            )
            loss.backward()
            optimiser.step()
    model.eval()
    test = make_synthetic(4, size=32, seed=1)
    xt = preprocessing.normalise(torch.from_numpy(test.images).permute(0, 3, 1, 2))
    return model, grey_levels(preprocessing, 8), xt


def test_gradcam_is_pytorch_grad_cams_map(lesion_model):
    model, background, xt = lesion_model
    for i, target in ((0, None), (1, 0), (2, 1)):
        reference = explain_gradcam(model, xt[i], target_class=target)
        got = explain_image(model, xt[i], background, target_class=target, nsamples=4)
        assert got.target_class == reference.target_class == got.cam.target_class
        np.testing.assert_allclose(got.cam.heatmap, reference.heatmap, atol=1e-4)
        np.testing.assert_allclose(got.probabilities, reference.probabilities, atol=1e-5)
        assert got.shap.target_class == got.target_class


def test_shap_agrees_with_shaps_gradient_explainer_and_adds_up(lesion_model):
    """Stated tolerance: at 1000 samples each, Pearson r > 0.95 and relative L2 distance < 0.3
    between the two estimates (both are unbiased for the same expectation); both sums within
    0.05 of probability - expected (the sampling error of 1000 samples, as test_shap.py)."""
    model, background, xt = lesion_model
    expected = background_probabilities(model, background)
    with torch.no_grad():
        gaps = torch.softmax(model(xt), dim=1).numpy() - expected
    image, target = np.unravel_index(int(np.abs(gaps).argmax()), gaps.shape)
    gap = float(gaps[image, target])
    assert abs(gap) > 0.1  # the completeness check would be empty for a flat model
    ours = explain_image(
        model,
        xt[image],
        background,
        target_class=int(target),
        cam=False,
        nsamples=1000,
        seed=1,
        batch_size=1001,
    )
    theirs = explain_shap_image(
        model, xt[image], background, target_class=int(target), nsamples=1000, seed=2
    )
    a, b = ours.shap.attribution.ravel(), theirs.attribution.ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.95
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.3
    assert ours.shap.expected == pytest.approx(theirs.expected, abs=1e-5)
    assert ours.shap.total == pytest.approx(gap, abs=0.05)
    assert theirs.total == pytest.approx(gap, abs=0.05)
    # passes of 64 rows give the estimate of one batch
    chunked = explain_image(
        model,
        xt[image],
        background,
        target_class=int(target),
        cam=False,
        nsamples=1000,
        seed=1,
    )
    np.testing.assert_allclose(chunked.shap.attribution, ours.shap.attribution, atol=1e-6)


def test_small_estimates_are_reproducible_and_unbiased(lesion_model):
    model, background, xt = lesion_model
    expected = background_probabilities(model, background)
    one = explain_image(model, xt[1], background, nsamples=8, seed=5, expected=expected)
    again = explain_image(model, xt[1], background, nsamples=8, seed=5)
    np.testing.assert_array_equal(one.shap.attribution, again.shap.attribution)
    assert one.shap.expected == pytest.approx(again.shap.expected, abs=1e-6)
    # the mean of many 8-sample estimates approaches the 1000-sample one
    many = np.mean(
        [
            explain_image(
                model, xt[1], background, cam=False, nsamples=8, seed=s, expected=expected
            ).shap.attribution
            for s in range(40)
        ],
        axis=0,
    )
    big = explain_image(
        model, xt[1], background, cam=False, nsamples=1000, seed=99, expected=expected
    ).shap.attribution
    assert np.corrcoef(many.ravel(), big.ravel())[0, 1] > 0.9


def test_stratified_samples_cover_references_and_positions():
    indices, positions = stratified_samples(12, 4, seed=0)
    assert np.bincount(indices, minlength=4).tolist() == [3, 3, 3, 3]
    assert sorted(np.floor(positions * 12).astype(int).tolist()) == list(range(12))
    few, _ = stratified_samples(4, 32, seed=1)
    assert len(set(few.tolist())) == 4 and few.max() < 32
    assert np.all(np.diff(few) >= 7)  # spread over the grey levels, not clustered


def test_without_background_or_with_bad_requests(lesion_model):
    model, background, xt = lesion_model
    cam_only = explain_image(model, xt[0], None)
    assert cam_only.shap is None and cam_only.cam is not None
    with pytest.raises(InputError, match="out of range"):
        explain_image(model, xt[0], background, target_class=2)
    with pytest.raises(InputError, match="nsamples"):
        explain_image(model, xt[0], background, nsamples=0)


def test_engine_explains_from_its_frozen_copy_and_states_the_settings(tmp_path):
    """The served path: Grad-CAM equals pytorch-grad-cam's on the model as trained, the SHAP
    summary names estimator and background, other CAM methods still answer."""
    import io as _io

    from PIL import Image

    from components.bundle_builder import make_bundle
    from serving.engine import DiagnosisEngine
    from serving.schemas import ModelRef

    architecture = {"name": "small_cnn", "num_classes": 2, "in_channels": 3, "width": 4}
    torch.manual_seed(0)
    path = make_bundle(
        build_model(**architecture).eval(),
        architecture=architecture,
        class_names=["a", "b"],
        preprocessing=Preprocessing(size=16, channels=3),
        metrics={},
        data_fingerprint="f" * 64,
        config={},
        background_size=4,
        out_dir=tmp_path / "bundle",
    )
    engine = DiagnosisEngine.from_dir(path, ModelRef(name="m", version="1", tag="m:1"))
    assert all(not p.requires_grad for p in engine.explain_model.parameters())
    buffer = _io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    case = engine.prepare(buffer.getvalue())
    answer = engine.explain(case, target="b", nsamples=8)
    reference = explain_gradcam(engine.model, case.image, target_class=1)
    from components.explain.gradcam import summarise_heat

    assert answer.heat.model_dump() == summarise_heat(reference.heatmap)
    assert answer.shap_image.nsamples == 8 and answer.shap_image.background_size == 4
    assert "stratified" in answer.shap_image.estimator
    assert "4 reference images: constant grey levels" in answer.shap_image.background
    other = engine.explain(case, method="gradcam++", shap=False)
    assert other.method == "gradcam++" and other.shap_image is None


def test_concurrent_explanations_do_not_mix(lesion_model):
    """Threads explaining different images on one model get the maps they would alone."""
    from concurrent.futures import ThreadPoolExecutor

    model, background, xt = lesion_model
    alone = [explain_image(model, x, background, nsamples=8, seed=0) for x in xt]
    with ThreadPoolExecutor(4) as pool:
        together = list(
            pool.map(lambda x: explain_image(model, x, background, nsamples=8, seed=0), xt)
        )
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_allclose(a.cam.heatmap, b.cam.heatmap, atol=1e-5)
        np.testing.assert_allclose(a.shap.attribution, b.shap.attribution, atol=1e-6)
