"""Explanations for one prediction: Grad-CAM maps, SHAP for images and clinical records.

Submodules import torch, pytorch-grad-cam and shap lazily where they can; `warm_up()` imports
them up front (shap alone takes seconds) so a service can pay that cost at start-up.

- `gradcam`: `explain_gradcam`, `overlay_png`, `heatmap_png`, `summarise_heat`
- `shap_image`: `explain_shap_image`, `shap_png`
- `shap_tabular`: `explain_tabular`
- `background`: `split_background` for the bundle's SHAP background
"""

from __future__ import annotations


def warm_up() -> None:
    """Import the explanation libraries now rather than on the first request."""
    import pytorch_grad_cam  # noqa: F401

    from components.explain.shap_image import import_shap

    import_shap()


__all__ = ["warm_up"]
