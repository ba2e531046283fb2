"""Heatmap mass inside a lesion mask: known answers, honest baselines, and the PAD bench end to
end on a synthetic run (drawn lesions, their masks, image-only and fusion bundles)."""

from __future__ import annotations

import numpy as np
import pytest
from bench_modules import bench_module
from PIL import Image
from scipy.ndimage import binary_dilation

from components.data.preprocess import Preprocessing
from components.errors import InputError
from components.explain import localisation as loc


def disc(shape: tuple[int, int], cy: float, cx: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= radius**2


def test_share_of_hand_made_maps():
    left = np.zeros((10, 10), dtype=bool)
    left[:, :5] = True
    top = np.zeros((10, 10), dtype=bool)
    top[:5] = True
    on_left = left.astype(np.float32)
    assert loc.mask_share(on_left, left) == 1.0
    assert loc.mask_share(on_left, ~left) == 0.0
    assert loc.mask_share(on_left, top) == pytest.approx(0.5)
    uniform = np.full((10, 10), 0.3)
    thirty = np.zeros((10, 10), dtype=bool)
    thirty.flat[:30] = True
    assert loc.mask_share(uniform, thirty) == pytest.approx(0.3)  # uniform map: the area share
    ramp = np.tile(np.arange(10.0), (10, 1))  # heat = column index, total 450
    last_column = np.zeros((10, 10), dtype=bool)
    last_column[:, 9] = True
    assert loc.mask_share(ramp, last_column) == pytest.approx(90 / 450)
    assert np.isnan(loc.mask_share(np.zeros((10, 10)), left))  # nothing to localise


@pytest.mark.parametrize(
    ("heat", "mask", "phrase"),
    [
        (-np.ones((4, 4)), np.ones((4, 4)), "negative"),
        (np.full((4, 4), np.nan), np.ones((4, 4)), "NaN"),
        (np.ones((4, 4)), np.ones((4, 5)), "mask shape"),
        (np.ones(4), np.ones(4), "2-D"),
    ],
)
def test_share_refuses_what_it_cannot_score(heat, mask, phrase):
    with pytest.raises(InputError, match=phrase):
        loc.mask_share(heat, mask)


def test_random_maps_score_the_area_share_on_average():
    shape = (48, 48)
    maps = loc.random_heatmaps(shape, 400, sigma=3.0, seed=0)
    assert maps.shape == (400, *shape) and maps.dtype == np.float32
    assert maps.min() == 0.0 and np.allclose(maps.reshape(400, -1).max(axis=1), 1.0)
    masks = np.stack([disc(shape, 12, 30, 6), disc(shape, 24, 24, 15), disc(shape, 45, 2, 4)])
    areas = masks.reshape(3, -1).mean(axis=1)
    found = loc.random_shares(masks, maps)
    assert found == pytest.approx(areas, abs=0.012)  # a corner lesion included (wrap-around)
    # the spread shrinks as the maps get coarser than the mask; the mean does not move
    smooth = loc.random_heatmaps(shape, 400, sigma=8.0, seed=1)
    assert loc.random_shares(masks, smooth) == pytest.approx(areas, abs=0.03)
    row = maps[:, :, :-1].reshape(-1), maps[:, :, 1:].reshape(-1)
    coarse = smooth[:, :, :-1].reshape(-1), smooth[:, :, 1:].reshape(-1)
    assert np.corrcoef(*coarse)[0, 1] > np.corrcoef(*row)[0, 1] > 0.8  # smooth, as asked


def test_swapped_maps_use_other_images_and_other_patients():
    masks = np.zeros((3, 4, 4), dtype=bool)
    masks[0, :2] = True  # top half
    masks[1, 2:] = True  # bottom half
    masks[2, :, :2] = True  # left half
    heat = np.zeros((3, 4, 4))
    heat[0, 0, 0] = 1.0  # top left corner
    heat[1, 3, 3] = 1.0  # bottom right corner
    heat[2] = 1.0  # uniform
    # image 0's mask (top): map 1 scores 0, map 2 scores 0.5 -> 0.25
    assert loc.swapped_shares(heat, masks) == pytest.approx([0.25, 0.25, 0.5])
    # images 0 and 2 of one patient: they are scored only against image 1's map, image 1
    # against both others as before
    assert loc.swapped_shares(heat, masks, ["a", "b", "a"]) == pytest.approx([0.0, 0.25, 0.0])


def test_resize_mask_is_the_image_resize():
    """A mask comes to the model's input as preprocessing brings the image: same call, same
    geometry (non-square source, aspect ratio not kept)."""
    mask = disc((90, 120), 30, 80, 18)
    preprocessing = Preprocessing(size=32, channels=1)
    as_image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8))
    expected = preprocessing.to_uint8(as_image)[0] >= 128
    assert np.array_equal(loc.resize_mask(mask, 32), expected)
    # a bright lesion drawn where the mask is stays under the resized mask
    picture = Image.fromarray(np.where(mask, 230, 40).astype(np.uint8))
    bright = preprocessing.to_uint8(picture)[0] > 135
    assert (bright & expected).sum() / (bright | expected).sum() > 0.9


def test_summary_counts_patients_not_copies():
    rng = np.random.default_rng(0)
    share = rng.uniform(0.2, 0.6, 30)
    random = rng.uniform(0.05, 0.15, 30)
    single = loc.summarise(share, {"random": random}, boot=500)
    assert single["n"] == 30 and single["groups"] == 30 and single["flat"] == 0
    assert single["share_mean"] == pytest.approx(share.mean())
    gap = single["minus_random"]
    assert gap["mean"] == pytest.approx((share - random).mean())
    assert gap["low"] < gap["mean"] < gap["high"]
    # each image five times over under its patient's group: the same interval, not a narrower one
    copies = loc.summarise(
        np.repeat(share, 5),
        {"random": np.repeat(random, 5)},
        groups=np.repeat(np.arange(30), 5),
        boot=500,
    )
    assert copies["groups"] == 30 and copies["n"] == 150
    assert copies["minus_random"]["high"] - copies["minus_random"]["low"] == pytest.approx(
        gap["high"] - gap["low"], rel=0.25
    )
    naive = loc.summarise(np.repeat(share, 5), {"random": np.repeat(random, 5)}, boot=500)
    assert naive["minus_random"]["high"] - naive["minus_random"]["low"] < 0.6 * (
        gap["high"] - gap["low"]
    )
    with_flat = loc.summarise([0.5, np.nan], {"random": [0.1, 0.1]}, boot=50)
    assert with_flat["n"] == 1 and with_flat["flat"] == 1


# --------------------------------------------------------------------- the bench, end to end

SIZE = 32
SCHEMA = [
    {"name": "age", "type": "int", "min": 0, "max": 120, "unit": "years"},
    {"name": "itch", "type": "bool", "required": False},
    {"name": "region", "type": "category", "allowed": ["ARM", "FACE"], "required": False},
]


@pytest.fixture(scope="module")
def bench():
    with bench_module("lesion_localisation") as module:
        yield module


def _viridis_mask(mask: np.ndarray) -> Image.Image:
    """A mask stored as PAD-UFES-20's are: two viridis colours, RGBA."""
    rgba = np.empty((*mask.shape, 4), dtype=np.uint8)
    rgba[...] = (68, 1, 84, 255)
    rgba[mask] = (253, 231, 36, 255)
    return Image.fromarray(rgba, mode="RGBA")


@pytest.fixture(scope="module")
def pad_like_run(tmp_path_factory):
    """A run directory as the pipeline leaves it for a PAD-like dataset: images/ and masks/
    (lesion images only), a manifest with split, group and raw `clin__*` columns, and a bundle
    of a small CNN trained to tell a drawn lesion from none; plus a fusion bundle."""
    import pandas as pd
    import torch

    from components.bundle import ModelBundle
    from components.data.synthetic import make_synthetic
    from components.models import build_model
    from components.models.fusion import build_fusion_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pad_like")
    data = make_synthetic(60, size=2 * SIZE, seed=0)  # sources at twice the model's size
    (root / "data" / "images").mkdir(parents=True)
    (root / "data" / "masks").mkdir()
    rows = []
    rng = np.random.default_rng(0)
    for i, (image, label, mask) in enumerate(
        zip(data.images, data.labels, data.masks, strict=True)
    ):
        stem = f"PAT_{i // 2}_{i}"
        path = root / "data" / "images" / f"{stem}.jpg"
        Image.fromarray(image).save(path, quality=95)
        if label > 0:  # the drawn lesion's visible extent: its 1-sigma disc dilated to 2 sigma
            extent = binary_dilation(mask, iterations=round(float(np.sqrt(mask.sum() / np.pi))))
            _viridis_mask(extent).save(root / "data" / "masks" / f"{stem}_mask.png")
        rows.append(
            {
                "id": f"{i:04d}",
                "source": str(path),
                "label": "lesion" if label else "none",
                "split": "test" if i % 3 == 0 else "train",
                "group": f"g{i // 2}",
                "clin__age": str(int(rng.integers(20, 80))),
                "clin__itch": [None, "True", "False"][i % 3],
                "clin__region": ["ARM", "FACE", None][i % 3],
            }
        )
    run = root / "runs" / "image-run"
    run.mkdir(parents=True)
    manifest = pd.DataFrame(rows)
    manifest.to_parquet(run / "manifest.parquet")
    preprocessing = Preprocessing(size=SIZE, channels=3)
    train = manifest[manifest["split"] == "train"]
    x = torch.stack([preprocessing.to_tensor(Image.open(s)) for s in train["source"]])
    y = torch.tensor((train["label"] == "lesion").to_numpy(), dtype=torch.int64)
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=2, width=8)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        model.train()
        for start in range(0, len(y), 20):
            optimiser.zero_grad()
            loss = torch.nn.functional.cross_entropy(
                model(x[start : start + 20]), y[start : start + 20]
            )
            loss.backward()
            optimiser.step()
    config = {"dataset": {"name": "pad_like", "root": str(root / "data")}}
    ModelBundle(
        architecture="small_cnn",
        architecture_kwargs={"num_classes": 2, "width": 8},
        class_names=["none", "lesion"],
        preprocessing=preprocessing,
        state_dict=model.eval().state_dict(),
        config=config,
    ).save(run / "bundle")
    fusion = build_fusion_model(2, SCHEMA, width=4, tabular_hidden=[8], fusion_hidden=8)
    fusion.fit_normalisation_from_schema(SCHEMA)
    fusion_bundle = ModelBundle(
        architecture="fusion",
        architecture_kwargs={
            "num_classes": 2,
            "width": 4,
            "tabular_hidden": [8],
            "fusion_hidden": 8,
        },
        class_names=["none", "lesion"],
        preprocessing=preprocessing,
        state_dict=fusion.eval().state_dict(),
        config=config,
        tabular_schema=SCHEMA,
    ).save(root / "fusion" / "bundle")
    torch.set_num_threads(threads)
    return run, fusion_bundle, manifest


def test_bench_scores_image_and_fusion_models(bench, pad_like_run, tmp_path, capsys):
    import json

    run, fusion_bundle, manifest = pad_like_run
    out = tmp_path / "localisation.json"
    args = [str(run), str(fusion_bundle), "--manifest", str(run / "manifest.parquet")]
    assert bench.main([*args, "--draws", "50", "--boot", "200", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "share - baseline" in printed and "[fusion]" in printed and "WARNING" not in printed
    image, fused = json.loads(out.read_text())["results"]
    assert image["split_digest"] == fused["split_digest"]  # the same images scored
    test = manifest[manifest["split"] == "test"]
    lesions = int((test["label"] == "lesion").sum())
    for result in (image, fused):
        assert result["n"] + result["flat"] == lesions
        assert result["images_without_mask"] == len(test) - lesions
        assert result["input_size"] == SIZE and result["grouped_by"] == "patient (group)"
        assert abs(result["random_mean"] - result["area_mean"]) < 0.03
    # the trained CNN's Grad-CAM finds the drawn lesion, well above every baseline (measured:
    # share 0.33, area 0.18, random 0.18, swapped 0.19, re-initialised model 0.07)
    assert image["correct_share"] > 0.8
    assert image["share_mean"] > 1.5 * image["area_mean"]
    for baseline in ("random", "swapped", "untrained"):
        assert image[f"minus_{baseline}"]["low"] > 0.05, baseline


def test_bench_explains_the_true_class_on_request(bench, pad_like_run, tmp_path):
    import json

    run, _, _ = pad_like_run
    out = tmp_path / "true.json"
    argv = [str(run), "--target", "true", "--no-control", "--draws", "20", "--boot", "50"]
    assert bench.main([*argv, "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["target"] == "true" and result["correct_share"] is None
    assert "untrained_mean" not in result and result["share_mean"] > result["random_mean"]


def test_bench_needs_the_fusion_models_clinical_columns(bench, pad_like_run, tmp_path):
    _, fusion_bundle, manifest = pad_like_run
    partial = tmp_path / "manifest.parquet"
    manifest.drop(columns=["clin__itch"]).to_parquet(partial)
    with pytest.raises(SystemExit, match="itch"):
        bench.main([str(fusion_bundle), "--manifest", str(partial)])
    with pytest.raises(SystemExit, match="--manifest"):
        bench.main([str(fusion_bundle)])
