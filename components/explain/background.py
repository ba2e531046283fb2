"""The SHAP background stored in a bundle, for image, tabular and fusion models.

`ModelBundle.background` holds a normalised image tensor (N, C, H, W) for an image model, an
encoded clinical table (N, D) for a tabular model, or a dict {"image": ..., "tabular": ...}
for a fusion model. `split_background` returns the two parts, either of which may be None.

An image model's bundle stores `grey_levels` by default: constant images at evenly spaced
intensities, built from the preprocessing alone, so the background is not patient data
(training images only with `package.training_images`, see `components.bundle_builder`).
"""

from __future__ import annotations

from typing import Any

from components.errors import ModelError


def split_background(background: Any) -> tuple[Any, Any]:
    """(image background (N,C,H,W) | None, tabular background (N,D) | None)."""
    if background is None:
        return None, None
    if isinstance(background, dict):
        unknown = sorted(set(background) - {"image", "tabular"})
        if unknown:
            raise ModelError(f"SHAP background has unknown parts {unknown}")
        image, tabular = background.get("image"), background.get("tabular")
    elif getattr(background, "ndim", None) == 4:
        image, tabular = background, None
    elif getattr(background, "ndim", None) == 2:
        image, tabular = None, background
    else:
        raise ModelError(
            f"SHAP background of shape {getattr(background, 'shape', None)} is neither images "
            "(N, C, H, W) nor an encoded table (N, D)"
        )
    if image is not None and getattr(image, "ndim", None) != 4:
        raise ModelError("the image part of the SHAP background must be (N, C, H, W)")
    if tabular is not None and getattr(tabular, "ndim", None) != 2:
        raise ModelError("the tabular part of the SHAP background must be (N, D)")
    return image, tabular


def grey_levels(preprocessing, count: int):
    """`count` constant images (count, C, H, W) at grey levels evenly spaced over 0..255, in
    the model's normalised space: a SHAP baseline made of no one's pixels.

    Expected gradients average over paths from every baseline to the image, so dark, mid and
    bright references together keep the attribution from hinging on one arbitrary level.
    """
    import torch

    if count < 1:
        raise ModelError(f"a SHAP background needs at least one image, not {count}")
    levels = torch.linspace(0, 255, count) if count > 1 else torch.tensor([128.0])
    levels = levels.round().to(torch.uint8)
    shape = (count, preprocessing.channels, preprocessing.size, preprocessing.size)
    images = levels.view(-1, 1, 1, 1).expand(shape).contiguous()
    return preprocessing.normalise(images)


def fusion_background(image, tabular) -> dict[str, Any]:
    """The dict a fusion model's bundle stores as its background."""
    return {"image": image, "tabular": tabular}


__all__ = ["fusion_background", "grey_levels", "split_background"]
