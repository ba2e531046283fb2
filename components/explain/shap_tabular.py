"""Per-feature SHAP values for a clinical record (tabular-only or fusion model).

Expected gradients (shap.GradientExplainer) on the target class's softmax probability, with
the encoded training table as background. Missing values are imputed the way the model
imputes them before explaining; a category's one-hot columns are summed into one value per
schema feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from components.errors import InputError, ModelError
from components.explain.shap_image import _check_nsamples, _choose_class, _gradient_shap

DEFAULT_TABULAR_NSAMPLES = 500


@dataclass(frozen=True)
class TabularShapResult:
    """`features`: [{feature, value, unit, shap}] sorted by |shap|, largest first."""

    features: list[dict]
    target_class: int
    expected: float
    probability: float
    nsamples: int
    background_size: int

    def top(self, k: int = 5) -> list[dict]:
        return self.features[: max(0, int(k))]


def explain_tabular(
    model,
    record,
    background,
    *,
    target_class: int | None = None,
    nsamples: int = DEFAULT_TABULAR_NSAMPLES,
    seed: int = 0,
    image=None,
) -> TabularShapResult:
    """SHAP value of every schema feature of `record` (encoded, (D,)) for one class.

    `model` is a `TabularMLP` (`model(x)`) or, with `image` (normalised (C, H, W)) given, a
    `FusionModel` (the image held fixed; its branch runs once). `background`: encoded training
    rows (N, D), e.g. the bundle's tabular background.
    """
    import torch

    nsamples = _check_nsamples(nsamples)
    layout = getattr(model, "layout", None)
    if layout is None or not hasattr(model, "impute"):
        raise ModelError(f"{type(model).__name__} takes no clinical record")
    model.eval()
    x = _as_rows(record, layout.width, "record")
    if x.shape[0] != 1:
        raise InputError("explain one clinical record at a time")
    bg = _as_rows(background, layout.width, "SHAP background")
    with torch.no_grad():
        x, bg = model.impute(x), model.impute(bg)
    fixed = _as_image(image, model) if image is not None else None
    probe = _tabular_probability(model, None, fixed)
    with torch.no_grad():
        probs = probe(x)[0]
    chosen = _choose_class(target_class, probs)
    net = _tabular_probability(model, chosen, fixed)
    values, expected = _gradient_shap(net, bg, x, nsamples, seed)
    values = values[0]  # (D,)
    shown = layout.decode(_as_rows(record, layout.width, "record")[0].numpy())
    features = [
        {
            "feature": feature.name,
            "value": shown[feature.name],
            "unit": feature.unit,
            "shap": float(values[list(feature.columns)].sum()),
        }
        for feature in layout.features
    ]
    features.sort(key=lambda item: abs(item["shap"]), reverse=True)
    return TabularShapResult(
        features=features,
        target_class=chosen,
        expected=expected,
        probability=float(probs[chosen]),
        nsamples=nsamples,
        background_size=int(bg.shape[0]),
    )


def _tabular_probability(model, target_class: int | None, image):
    """nn.Module: encoded rows -> softmax probabilities (all, or (N, 1) of `target_class`)."""
    import torch
    from torch import nn

    features = None
    if image is not None:
        with torch.no_grad():  # the image is fixed: run its branch once
            features = model.image.embed(image)

    class Probability(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, rows):
            if features is None:
                logits = self.model(rows)
            else:
                image_features = features.expand(rows.shape[0], -1)
                logits = self.model.forward_from_image_features(image_features, rows)
            probs = torch.softmax(logits, dim=1)
            return probs if target_class is None else probs[:, target_class : target_class + 1]

    return Probability().eval()


def _as_rows(rows, width: int, what: str):
    import torch

    if rows is None:
        raise ModelError(f"no {what} given; tabular SHAP needs one")
    tensor = torch.as_tensor(np.asarray(rows, dtype=np.float32))
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2 or tensor.shape[1] != width or tensor.shape[0] == 0:
        raise InputError(f"{what} must have {width} encoded columns, got {tuple(tensor.shape)}")
    return tensor


def _as_image(image, model):
    import torch

    if not isinstance(image, torch.Tensor) or not torch.is_floating_point(image):
        raise InputError("image must be a normalised float tensor (C, H, W)")
    if image.ndim == 3:
        image = image.unsqueeze(0)
    channels = getattr(model, "in_channels", image.shape[1])
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != channels:
        raise InputError(f"image must be ({channels}, H, W), got {tuple(image.shape)}")
    return image.detach().float()


__all__ = ["DEFAULT_TABULAR_NSAMPLES", "TabularShapResult", "explain_tabular"]
