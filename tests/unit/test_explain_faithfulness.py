"""Faithfulness measures tell a map that finds the evidence from a random one, and a trained
model's maps from a random model's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from components.data.preprocess import Preprocessing
from components.errors import InputError
from components.explain.background import grey_levels
from components.explain.faithfulness import (
    card_lines,
    deletion_insertion,
    evaluate_faithfulness,
    randomised_copy,
    ranking,
    spearman,
)
from components.models import build_model

SIZE = 24
PATCH = (slice(4, 10), slice(12, 18))  # rows, columns the synthetic model looks at


class PatchModel(nn.Module):
    """Class 1's logit grows with the brightness of one known patch; nothing else matters."""

    def forward(self, x):
        evidence = x[:, :, PATCH[0], PATCH[1]].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(evidence), 4.0 * evidence], dim=1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _patch_image(seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    image = rng.normal(-1.0, 0.3, (3, SIZE, SIZE)).astype(np.float32)
    image[:, PATCH[0], PATCH[1]] += 3.0  # the bright evidence
    return torch.from_numpy(image)


def test_oracle_map_beats_a_random_map():
    model = PatchModel().eval()
    oracle = np.zeros((SIZE, SIZE))
    oracle[PATCH] = 1.0
    dark = torch.full((3, SIZE, SIZE), -1.0)  # a constant baseline: the patch's evidence gone
    for seed in range(3):
        image = _patch_image(seed)
        best = deletion_insertion(model, image, oracle, 1, baseline=dark, steps=12, seed=seed)
        noise = np.random.default_rng(seed).random((SIZE, SIZE))
        random = deletion_insertion(model, image, noise, 1, baseline=dark, steps=12, seed=seed)
        assert best.deletion[0] == pytest.approx(random.deletion[0])  # the same image
        assert best.deletion_auc < random.deletion_auc - 0.1
        assert best.insertion_auc > random.insertion_auc + 0.1
        assert len(best.deletion) == len(best.insertion) == 13


def test_ranking_and_bad_maps():
    order = ranking(np.array([[0.1, 0.9], [0.5, 0.0]]))
    assert order.tolist() == [1, 2, 0, 3]
    flat = ranking(np.zeros((4, 4)), seed=1)
    assert sorted(flat.tolist()) == list(range(16))
    with pytest.raises(InputError):
        ranking(np.array([np.nan, 1.0]))
    with pytest.raises(InputError, match="differs"):
        deletion_insertion(PatchModel(), _patch_image(0), np.zeros((3, 3)), 1)


def test_randomised_weights_change_the_maps():
    """The same model explains itself with correlation 1; with every layer re-initialised its
    maps are unrelated (|rho| small), and the head-only copy changes the head only."""
    from components.explain.one_pass import explain_image

    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=2, width=8).eval()
    background = grey_levels(Preprocessing(size=SIZE, channels=3), 4)
    image = _patch_image(0)
    mine = explain_image(model, image, background, nsamples=16, seed=0)
    again = explain_image(model, image, background, nsamples=16, seed=0)
    assert spearman(mine.cam.heatmap, again.cam.heatmap) == pytest.approx(1.0)
    full = randomised_copy(model, "full", seed=1)
    other = explain_image(full, image, background, target_class=mine.target_class, nsamples=16)
    assert abs(spearman(mine.shap.attribution, other.shap.attribution)) < 0.5
    head = randomised_copy(model, "head", seed=1)
    changed = [
        name
        for (name, a), (_, b) in zip(
            model.state_dict().items(), head.state_dict().items(), strict=True
        )
        if not torch.equal(a, b)
    ]
    assert changed and all(name.startswith("head.") for name in changed)
    with pytest.raises(InputError, match="scope"):
        randomised_copy(model, "middle")


def test_evaluate_faithfulness_reports_every_map_and_scope():
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=2, width=8).eval()
    background = grey_levels(Preprocessing(size=SIZE, channels=3), 4)
    images = torch.stack([_patch_image(s) for s in range(2)])
    result = evaluate_faithfulness(model, images, background, nsamples=4, steps=5)
    assert result["images"] == 2 and result["shap"]["nsamples"] == 4
    for kind in ("deletion_auc", "insertion_auc"):
        assert set(result[kind]) == {"gradcam", "shap", "random"}
        assert all(0.0 <= v["mean"] <= 1.0 for v in result[kind].values())
    assert set(result["randomisation_spearman"]) == {"head", "full"}
    card = "\n".join(card_lines(result))
    assert "## Explanation faithfulness" in card and "| random |" in card
    assert card_lines(None) == []


def test_model_card_shows_faithfulness_when_the_bundle_holds_it(tmp_path):
    import json

    from flows.promote import model_card

    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=2, width=8).eval()
    background = grey_levels(Preprocessing(size=SIZE, channels=3), 4)
    result = evaluate_faithfulness(model, _patch_image(0)[None], background, nsamples=4, steps=4)
    (tmp_path / "bundle.json").write_text(json.dumps({"architecture": "small_cnn"}))
    info = {"name": "m", "version": "1", "run_id": "r"}
    assert "Explanation faithfulness" not in model_card(info, tmp_path, "tag", None)
    (tmp_path / "faithfulness.json").write_text(json.dumps(result))
    card = model_card(info, tmp_path, "tag", None)
    assert "## Explanation faithfulness" in card and "| gradcam |" in card


def test_each_map_is_compared_with_the_random_map_image_by_image():
    """The paired block is the per-image difference: its mean is the difference of the AUC
    means, its interval holds the mean, and the card and bench print it."""
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=2, width=8).eval()
    background = grey_levels(Preprocessing(size=SIZE, channels=3), 4)
    images = torch.stack([_patch_image(s) for s in range(4)])
    result = evaluate_faithfulness(model, images, background, nsamples=4, steps=5)
    for name in ("gradcam", "shap"):
        for kind in ("deletion", "insertion"):
            paired = result["against_random"][name][kind]
            expected = result[f"{kind}_auc"][name]["mean"] - result[f"{kind}_auc"]["random"]["mean"]
            assert paired["mean"] == pytest.approx(expected)
            assert paired["low"] <= paired["mean"] <= paired["high"]
    card = "\n".join(card_lines(result))
    assert "| map | deletion − random | insertion − random |" in card
    older = {k: v for k, v in result.items() if k != "against_random"}
    assert "− random" not in "\n".join(card_lines(older))  # a bundle measured before


def test_mean_interval_resamples_whole_groups():
    from components.explain.intervals import mean_interval

    values = [1.0, 1.0, 1.0, 0.0]
    alone = mean_interval(values, boot=500, seed=0)
    assert alone.mean == pytest.approx(0.75) and alone.low < 0.75 < alone.high
    tied = mean_interval(values, groups=["a", "a", "a", "b"], boot=500, seed=0)
    assert tied.low == pytest.approx(0.0) and tied.high == pytest.approx(1.0)
    with pytest.raises(InputError):
        mean_interval([np.nan])
    with pytest.raises(InputError, match="groups"):
        mean_interval([1.0, 2.0], groups=["a"])
