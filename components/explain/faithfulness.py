"""Are the explanations about the image and the model? Deletion/insertion curves and the
model-randomisation sanity check, for Grad-CAM, SHAP and a random map.

- **Deletion / insertion** (Petsiuk et al., 2018): pixels are ranked by a map, most important
  first; in `steps` equal steps they are replaced by a *baseline* (deletion, starting from the
  image) or copied from the image onto the baseline (insertion). The area under the predicted
  class's probability over the fraction changed (trapezoid rule on [0, 1]) is the score: a map
  that finds the evidence gives a low deletion AUC and a high insertion AUC; a random map is
  the reference. The baseline is a Gaussian-blurred copy of the image (sigma `BLUR_FRACTION`
  of the side): it removes detail without adding shapes or intensities the image lacks.
- **Model randomisation** (Adebayo et al., 2018): the maps of the trained model against the maps
  of the same architecture with re-initialised weights, for the same image and class; Spearman
  rank correlation per image. A map that stays alike when the weights are random shows the
  image, not what the model learned. `head`: the top layer re-initialised; `full`: every layer.

`evaluate_faithfulness` computes all of it for a set of images; bench/explain_faithfulness.py
runs it on a finished run's test images and can write `faithfulness.json` into the bundle,
whose model card then reports it (flows/promote.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from components.errors import InputError

BLUR_FRACTION = 0.05
DEFAULT_STEPS = 20
MAPS = ("gradcam", "shap", "random")
SCOPES = ("head", "full")


@dataclass(frozen=True)
class CurveScores:
    deletion_auc: float
    insertion_auc: float
    deletion: list[float]
    insertion: list[float]


def blurred(image, fraction: float = BLUR_FRACTION):
    """Gaussian-blurred copy of a normalised (C, H, W) tensor (sigma = fraction of the side).
    Blurring commutes with per-channel normalisation, so this is the blurred picture."""
    import torch
    from scipy.ndimage import gaussian_filter

    sigma = max(1.0, fraction * max(image.shape[-2:]))
    array = gaussian_filter(image.detach().cpu().numpy(), sigma=(0, sigma, sigma), mode="reflect")
    return torch.from_numpy(array.astype(np.float32))


def ranking(saliency: np.ndarray, seed: int = 0) -> np.ndarray:
    """Flat pixel indices, most important first; ties (e.g. a flat map) in random order."""
    values = np.asarray(saliency, dtype=np.float64)
    if values.ndim != 2 or not np.all(np.isfinite(values)):
        raise InputError("a saliency map must be a finite (H, W) array")
    ties = np.random.default_rng(seed).random(values.size)
    return np.lexsort((ties, -values.ravel()))


def deletion_insertion(
    model,
    image,
    saliency: np.ndarray,
    target: int,
    *,
    baseline=None,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    batch_size: int = 64,
) -> CurveScores:
    """Deletion and insertion curves of `target`'s probability for one map (see module doc).

    `image`: normalised (C, H, W); `saliency`: (H, W), larger = more important; `baseline`:
    what removed pixels become (default `blurred(image)`)."""
    import torch

    if steps < 1:
        raise InputError(f"steps must be positive, got {steps}")
    x = image.detach().float()
    base = blurred(x) if baseline is None else baseline.detach().float()
    height, width = x.shape[-2:]
    if np.shape(saliency) != (height, width):
        raise InputError(f"saliency map {np.shape(saliency)} differs from image {(height, width)}")
    order = torch.from_numpy(ranking(saliency, seed))
    counts = np.round(np.linspace(0, height * width, steps + 1)).astype(int)
    masks = torch.zeros(steps + 1, height * width)
    for i, count in enumerate(counts):
        masks[i, order[:count]] = 1.0
    masks = masks.view(steps + 1, 1, height, width)
    deleted = x * (1 - masks) + base * masks  # top pixels replaced by the baseline
    inserted = base * (1 - masks) + x * masks  # top pixels taken from the image
    batch = torch.cat([deleted, inserted])
    with torch.inference_mode():
        probs = torch.cat(
            [
                torch.softmax(model(batch[i : i + batch_size]).float(), dim=1)[:, target]
                for i in range(0, len(batch), batch_size)
            ]
        ).numpy()
    deletion, insertion = probs[: steps + 1], probs[steps + 1 :]
    fractions = counts / (height * width)
    return CurveScores(
        deletion_auc=float(np.trapezoid(deletion, fractions)),
        insertion_auc=float(np.trapezoid(insertion, fractions)),
        deletion=[float(p) for p in deletion],
        insertion=[float(p) for p in insertion],
    )


def randomised_copy(model, scope: str, seed: int = 0):
    """A copy of `model` with re-initialised weights: `head` the top layer (the last module
    with parameters of its own), `full` every layer (batch-norm statistics reset too)."""
    import torch

    if scope not in SCOPES:
        raise InputError(f"unknown randomisation scope {scope!r}; choose one of {SCOPES}")
    clone = copy.deepcopy(model)
    layers = [m for m in clone.modules() if hasattr(m, "reset_parameters")]
    if scope == "head":
        layers = [m for m in layers if any(True for _ in m.parameters(recurse=False))][-1:]
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in layers:
            module.reset_parameters()
            if hasattr(module, "reset_running_stats"):
                module.reset_running_stats()
    finally:
        torch.random.set_rng_state(state)
    return clone.eval()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (0 when either is constant)."""
    from scipy.stats import spearmanr

    a, b = np.ravel(a), np.ravel(b)
    if np.all(a == a[0]) or np.all(b == b[0]):
        return 0.0
    return float(spearmanr(a, b).statistic)


def evaluate_faithfulness(
    model,
    images,
    background,
    *,
    nsamples: int,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    scopes: tuple[str, ...] = SCOPES,
    progress=None,
) -> dict:
    """Deletion/insertion AUCs (Grad-CAM, SHAP, random map) and randomisation correlations
    over `images` (normalised (N, C, H, W)), each explained for its predicted class with the
    one-pass explainer /explain uses. Returns a JSON-ready dict (means, SDs, settings)."""
    from components.explain.intervals import mean_interval
    from components.explain.one_pass import ESTIMATOR, background_probabilities, explain_image

    model = model.eval()
    rng = np.random.default_rng(seed)
    expected = background_probabilities(model, background)
    randomised = {s: randomised_copy(model, s, seed) for s in scopes}
    curves: dict[str, dict[str, list[float]]] = {m: {"deletion": [], "insertion": []} for m in MAPS}
    correlations: dict[str, dict[str, list[float]]] = {
        s: {"gradcam": [], "shap": [], "shap_abs": []} for s in scopes
    }
    for i, image in enumerate(images):
        one = explain_image(
            model, image, background, nsamples=nsamples, seed=seed + i, expected=expected
        )
        maps = {
            "gradcam": one.cam.heatmap,
            "shap": one.shap.attribution,
            "random": rng.random(one.cam.heatmap.shape),
        }
        for name, saliency in maps.items():
            scores = deletion_insertion(
                model, image, saliency, one.target_class, steps=steps, seed=seed + i
            )
            curves[name]["deletion"].append(scores.deletion_auc)
            curves[name]["insertion"].append(scores.insertion_auc)
        for scope, other in randomised.items():
            alt = explain_image(
                other,
                image,
                background,
                target_class=one.target_class,
                nsamples=nsamples,
                seed=seed + i,
            )
            found = correlations[scope]
            found["gradcam"].append(spearman(one.cam.heatmap, alt.cam.heatmap))
            found["shap"].append(spearman(one.shap.attribution, alt.shap.attribution))
            found["shap_abs"].append(
                spearman(np.abs(one.shap.attribution), np.abs(alt.shap.attribution))
            )
        if progress is not None:
            progress(i + 1, len(images))
    return {
        "images": len(images),
        "seed": seed,
        "steps": steps,
        "baseline": f"Gaussian blur of the image, sigma {BLUR_FRACTION:.0%} of the side",
        "shap": {"estimator": ESTIMATOR, "nsamples": nsamples, "background_size": len(background)},
        "deletion_auc": {m: _stats(curves[m]["deletion"]) for m in MAPS},
        "insertion_auc": {m: _stats(curves[m]["insertion"]) for m in MAPS},
        # paired per image: the map's AUC minus the random map's, with a bootstrap interval
        "against_random": {
            name: {
                kind: mean_interval(
                    np.subtract(curves[name][kind], curves["random"][kind]), seed=seed
                ).as_dict()
                for kind in ("deletion", "insertion")
            }
            for name in ("gradcam", "shap")
        },
        "randomisation_spearman": {
            s: {k: _stats(v) for k, v in found.items()} for s, found in correlations.items()
        },
    }


def _stats(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()),
        "sd": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
        "median": float(np.median(array)),
    }


def card_lines(result: dict | None) -> list[str]:
    """The model card's "Explanation faithfulness" section from `evaluate_faithfulness`'s dict
    (empty without one)."""
    if not result:
        return []
    lines = [
        "## Explanation faithfulness",
        "",
        f"- {result['images']} test images, each explained for its predicted class "
        f"(SHAP: {result['shap']['estimator']}, {result['shap']['nsamples']} samples, "
        f"{result['shap']['background_size']} reference images); removed pixels become the "
        f"baseline ({result['baseline']}); {result['steps']} steps.",
        "- Deletion AUC: lower is better; insertion AUC: higher is better (mean ± SD).",
        "",
        "| map | deletion AUC | insertion AUC |",
        "|---|---|---|",
    ]
    for name in MAPS:
        d, i = result["deletion_auc"][name], result["insertion_auc"][name]
        lines.append(
            f"| {name} | {d['mean']:.3f} ± {d['sd']:.3f} | {i['mean']:.3f} ± {i['sd']:.3f} |"
        )
    lines += against_random_lines(result)
    lines += [
        "",
        "Model-randomisation check: Spearman correlation between the trained model's maps and "
        "those of the same architecture with re-initialised weights (near 0: the map depends "
        "on what the model learned; near 1: it would look alike for any weights).",
        "",
        "| weights re-initialised | Grad-CAM | SHAP | abs(SHAP) |",
        "|---|---|---|---|",
    ]
    for scope, found in result["randomisation_spearman"].items():
        cells = " | ".join(
            f"{found[k]['mean']:.2f} ± {found[k]['sd']:.2f}"
            for k in ("gradcam", "shap", "shap_abs")
        )
        lines.append(f"| {'top layer' if scope == 'head' else 'all layers'} | {cells} |")
    return lines


def against_random_lines(result: dict) -> list[str]:
    """The paired comparison with the random map as a Markdown table ([] for a result
    written before it was measured)."""
    paired = result.get("against_random")
    if not paired:
        return []
    lines = [
        "",
        "Against the random map on the same image (map − random; mean and 95 % bootstrap "
        "interval over images; deletion: below 0 is better, insertion: above 0 is better):",
        "",
        "| map | deletion − random | insertion − random |",
        "|---|---|---|",
    ]
    for name, found in paired.items():
        cells = " | ".join(
            f"{v['mean']:+.3f} ({v['low']:+.3f}…{v['high']:+.3f})"
            for v in (found["deletion"], found["insertion"])
        )
        lines.append(f"| {name} | {cells} |")
    return lines


__all__ = [
    "BLUR_FRACTION",
    "CurveScores",
    "against_random_lines",
    "blurred",
    "card_lines",
    "deletion_insertion",
    "evaluate_faithfulness",
    "randomised_copy",
    "ranking",
    "spearman",
]
