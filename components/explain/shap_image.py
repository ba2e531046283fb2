"""SHAP for images: expected gradients (shap.GradientExplainer) over the bundle's background.

The explained output is the target class's softmax probability, so a pixel's value is its
share of the move from the background's average probability to this image's probability
(positive pushes towards the class). Channels are summed into one (H, W) map: SHAP values
are additive, so the sum is the pixel's total contribution.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from components.errors import InputError, ModelError
from components.explain.gradcam import PNG_COMPRESSION

DEFAULT_NSAMPLES = 32
MAX_NSAMPLES = 1000
_LOCK = threading.Lock()  # shap seeds numpy's global RNG; one explanation at a time


@dataclass(frozen=True)
class ShapImageResult:
    """Per-pixel SHAP values for one image and class.

    `attribution`: float32 (H, W), signed, summed over channels; `target_class`; `expected`:
    the background's mean probability of the class; `probability`: the image's; `nsamples`
    and `background_size` describe the estimate.
    """

    attribution: np.ndarray
    target_class: int
    expected: float
    probability: float
    nsamples: int
    background_size: int

    @property
    def total(self) -> float:
        """Sum of all pixel values (≈ probability − expected, up to sampling noise)."""
        return float(self.attribution.sum())


def explain_shap_image(
    model,
    image,
    background,
    *,
    target_class: int | None = None,
    nsamples: int = DEFAULT_NSAMPLES,
    seed: int = 0,
    tabular=None,
    tabular_background=None,
) -> ShapImageResult:
    """Expected-gradients SHAP map of `image` (normalised (C, H, W)) for one class.

    `background`: normalised images (N, C, H, W), the bundle's background set. `nsamples`
    interpolation points trade latency for noise. For a fusion model pass the encoded record
    `tabular` (D,); it is held fixed while the image is explained.
    """
    import torch

    nsamples = _check_nsamples(nsamples)
    x = _as_image_batch(image)
    bg = _as_background(background, x.shape[1:])
    probe = _probability_model(model, None, tabular)
    with torch.no_grad():
        probs = probe(x)[0]
    chosen = _choose_class(target_class, probs)
    net = _probability_model(model, chosen, tabular)
    values, expected = _gradient_shap(net, bg, x, nsamples, seed)
    values = values[0]  # (C, H, W)
    attribution = values.sum(axis=0).astype(np.float32)
    return ShapImageResult(
        attribution=attribution,
        target_class=chosen,
        expected=expected,
        probability=float(probs[chosen]),
        nsamples=nsamples,
        background_size=int(bg.shape[0]),
    )


def shap_png(attribution: np.ndarray, image_uint8: np.ndarray | None = None) -> bytes:
    """Diverging map of a signed attribution (red: towards the class, blue: against) as PNG.

    The colour scale is symmetric around zero at the 99th percentile of |value|; with
    `image_uint8` (H, W[, C]) the map is blended over a grey version of the image.
    """
    import io

    import matplotlib
    from PIL import Image

    values = np.asarray(attribution, dtype=np.float64)
    if values.ndim != 2 or not np.all(np.isfinite(values)):
        raise InputError("attribution must be a finite 2-D array")
    scale = float(np.percentile(np.abs(values), 99)) or 1.0
    unit = np.clip(values / scale, -1.0, 1.0) * 0.5 + 0.5
    colour = matplotlib.colormaps["bwr"](unit)[..., :3] * 255.0
    if image_uint8 is not None:
        grey = _grey(image_uint8, values.shape)
        weight = np.abs(unit - 0.5)[..., None] * 2.0  # strong values cover the image
        colour = (1 - 0.8 * weight) * grey[..., None] + 0.8 * weight * colour
    buffer = io.BytesIO()
    Image.fromarray(np.clip(colour, 0, 255).round().astype(np.uint8)).save(
        buffer, format="PNG", compress_level=PNG_COMPRESSION
    )
    return buffer.getvalue()


def _gradient_shap(net, background, x, nsamples: int, seed: int) -> tuple[np.ndarray, float]:
    """shap.GradientExplainer values for a single-output `net` (array shaped like `x`) and
    the mean output over the background (the SHAP base value)."""
    shap = import_shap()
    outputs = []  # the explainer runs `net` on the whole background once when it is built
    hook = net.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach()))
    with _LOCK:
        state = np.random.get_state()
        try:
            explainer = shap.GradientExplainer(net, background, batch_size=max(1, nsamples))
            hook.remove()
            values = explainer.shap_values(x, nsamples=nsamples, rseed=seed)
        finally:
            hook.remove()
            np.random.set_state(state)
    if not outputs or outputs[0].shape[0] != background.shape[0]:
        raise ModelError("could not read the model's output on the SHAP background")
    values = np.asarray(values[0] if isinstance(values, list) else values)
    if values.ndim == x.ndim + 1:  # trailing output axis
        values = values[..., 0]
    return values, float(outputs[0].float().mean())


def import_shap():
    """Import shap without the deprecation chatter its plotting module emits on import."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        import shap
    return shap


def _probability_model(model, target_class: int | None, tabular):
    """nn.Module: image -> softmax probabilities (all, or (N, 1) of `target_class`)."""
    import torch
    from torch import nn

    record = None
    if tabular is not None:
        record = torch.as_tensor(tabular, dtype=torch.float32).reshape(1, -1)

    class Probability(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, image):
            if record is None:
                logits = self.model(image)
            else:
                logits = self.model(image, record.expand(image.shape[0], -1))
            probs = torch.softmax(logits, dim=1)
            return probs if target_class is None else probs[:, target_class : target_class + 1]

    return Probability().eval()


def _choose_class(target_class, probs) -> int:
    num_classes = int(probs.shape[0])
    if target_class is None:
        return int(probs.argmax())
    if isinstance(target_class, bool) or not isinstance(target_class, int | np.integer):
        raise InputError(f"target_class must be an integer, got {target_class!r}")
    if not 0 <= int(target_class) < num_classes:
        raise InputError(f"target_class {target_class} out of range; use 0..{num_classes - 1}")
    return int(target_class)


def _check_nsamples(nsamples) -> int:
    if isinstance(nsamples, bool) or not isinstance(nsamples, int) or nsamples < 1:
        raise InputError(f"nsamples must be a positive integer, got {nsamples!r}")
    if nsamples > MAX_NSAMPLES:
        raise InputError(f"nsamples {nsamples} exceeds the limit of {MAX_NSAMPLES}")
    return nsamples


def _as_image_batch(image):
    import torch

    if not isinstance(image, torch.Tensor) or not torch.is_floating_point(image):
        raise InputError("image must be a normalised float tensor (C, H, W)")
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3:
        raise InputError(f"image must have shape (C, H, W), got {tuple(image.shape)}")
    return image.detach().float().unsqueeze(0)


def _as_background(background, shape):
    import torch

    if background is None:
        raise ModelError("this model bundle has no SHAP background set; re-package it with one")
    if not isinstance(background, torch.Tensor):
        background = torch.as_tensor(np.asarray(background))
    if background.ndim != 4 or tuple(background.shape[1:]) != tuple(shape) or not len(background):
        expected = ", ".join(str(int(n)) for n in shape)
        raise ModelError(
            f"SHAP background has shape {tuple(background.shape)}; expected (N, {expected})"
        )
    return background.detach().float()


def _grey(image_uint8: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    from PIL import Image

    array = np.asarray(image_uint8)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise InputError("image must be uint8 (H, W) or (H, W, C)")
    grey = array.astype(np.float64) if array.ndim == 2 else array[..., :3].mean(axis=2)
    if grey.shape != tuple(shape):
        resized = Image.fromarray(grey.astype(np.float32), mode="F").resize(
            (shape[1], shape[0]), Image.Resampling.BILINEAR
        )
        grey = np.asarray(resized, dtype=np.float64)
    return grey


__all__ = ["DEFAULT_NSAMPLES", "ShapImageResult", "explain_shap_image", "shap_png"]
