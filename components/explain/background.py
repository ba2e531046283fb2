"""The SHAP background stored in a bundle, for image, tabular and fusion models.

`ModelBundle.background` holds a normalised image tensor (N, C, H, W) for an image model, an
encoded clinical table (N, D) for a tabular model, or a dict {"image": ..., "tabular": ...}
for a fusion model. `split_background` returns the two parts, either of which may be None.
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


def fusion_background(image, tabular) -> dict[str, Any]:
    """The dict a fusion model's bundle stores as its background."""
    return {"image": image, "tabular": tabular}


__all__ = ["fusion_background", "split_background"]
