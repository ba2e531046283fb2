"""Class-activation maps (pytorch-grad-cam) on a model's last convolutional stage.

`explain_gradcam` works for every model exposing `cam_target_layers()` (the zoo's
`Classifier`, and the fusion model, whose clinical record is then held fixed). The heatmap
is float32 (H, W) in [0, 1] at the input's size; `overlay_png` / `heatmap_png` render it and
`summarise_heat` describes where the heat lies for the assistant.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from components.errors import InputError, ModelError

# Public method name -> pytorch_grad_cam class name.
CAM_METHODS: dict[str, str] = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "hirescam": "HiResCAM",
    "xgradcam": "XGradCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGradCAM",
    "scorecam": "ScoreCAM",
    "ablationcam": "AblationCAM",
}
DEFAULT_METHOD = "gradcam"
# zlib level of the rendered PNGs: 1 encodes several times faster than PIL's default 6 for a
# somewhat larger file (the maps are shown, not archived)
PNG_COMPRESSION = 1

# CAM objects hook into the model's layers; one explanation at a time per process keeps the
# hooks of concurrent requests (e.g. a threaded HTTP server) from mixing activations.
_LOCK = threading.Lock()


@dataclass(frozen=True)
class CamResult:
    """A class-activation map for one image.

    - `heatmap`: float32 (H, W) in [0, 1], at the input image's size;
    - `target_class`: the class index explained; `method`: the canonical method name;
    - `probabilities`: the model's softmax output for the image (same forward pass).
    """

    heatmap: np.ndarray
    target_class: int
    method: str
    probabilities: list[float]

    @property
    def flat(self) -> bool:
        """True when the map carries no signal (all zero), e.g. the class has no evidence."""
        return not bool(np.any(self.heatmap > 0))


def canonical_method(method: str) -> str:
    """'Grad-CAM++' -> 'gradcam++'; raises `InputError` listing the choices if unknown."""
    key = str(method).strip().lower().replace("-", "").replace("_", "").replace(" ", "")
    if key not in CAM_METHODS:
        raise InputError(f"unknown CAM method {method!r}; choose one of {', '.join(CAM_METHODS)}")
    return key


def explain_gradcam(
    model,
    image,
    *,
    method: str = DEFAULT_METHOD,
    target_class: int | None = None,
    tabular=None,
) -> CamResult:
    """Class-activation map of `image` (normalised float tensor (C, H, W)) for one class.

    `target_class` defaults to the predicted class; `tabular` is the encoded clinical record
    (D,) when `model` is a fusion model taking (image, tabular). Raises `InputError` for an
    unknown method, a class out of range or an image of the wrong shape.
    """
    import pytorch_grad_cam
    import torch
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    name = canonical_method(method)
    target_layers = _target_layers(model)
    batch = _as_batch(image, getattr(model, "in_channels", None)).to(_model_device(model))
    net = _image_only(model, tabular) if tabular is not None else model
    num_classes = _num_classes(model)
    if target_class is not None:
        target_class = _check_class(target_class, num_classes)
    was_training = model.training
    with _LOCK:
        model.eval()
        try:
            with torch.no_grad():
                logits = net(batch)
            probabilities = torch.softmax(logits, dim=1)[0]
            chosen = int(probabilities.argmax()) if target_class is None else target_class
            cam_class = getattr(pytorch_grad_cam, CAM_METHODS[name])
            with _quiet_progress(), cam_class(model=net, target_layers=target_layers) as cam:
                if hasattr(cam, "batch_size"):
                    cam.batch_size = 32  # ScoreCAM/AblationCAM: bounded memory per pass
                grayscale = cam(input_tensor=batch, targets=[ClassifierOutputTarget(chosen)])
        finally:
            model.train(was_training)
    heatmap = np.nan_to_num(np.asarray(grayscale[0], dtype=np.float32), nan=0.0)
    heatmap = np.clip(heatmap, 0.0, 1.0)
    return CamResult(
        heatmap=heatmap,
        target_class=chosen,
        method=name,
        probabilities=[float(p) for p in probabilities],
    )


def heatmap_png(heatmap: np.ndarray, colormap: str = "jet") -> bytes:
    """Colour-mapped heatmap (values in [0, 1]) as PNG bytes."""
    return _png(_colorize(_check_heatmap(heatmap), colormap))


def overlay_png(
    image_uint8: np.ndarray, heatmap: np.ndarray, opacity: float = 0.45, colormap: str = "jet"
) -> bytes:
    """The heatmap blended over the image (uint8 (H, W, C) or (H, W)) as PNG bytes.

    The heatmap is resized to the image if their sizes differ; `opacity` in [0, 1] is the
    heatmap's weight.
    """
    if not 0.0 <= float(opacity) <= 1.0:
        raise InputError(f"overlay opacity must lie in [0, 1], got {opacity}")
    rgb = _as_rgb(image_uint8)
    heat = _resize(_check_heatmap(heatmap), rgb.shape[:2])
    colour = _colorize(heat, colormap).astype(np.float32)
    blended = (1.0 - opacity) * rgb.astype(np.float32) + opacity * colour
    return _png(np.clip(blended, 0, 255).round().astype(np.uint8))


def summarise_heat(heatmap: np.ndarray) -> dict:
    """Where the heat lies, in words and numbers (image coordinates, y pointing down).

    Returns `centroid` (x, y as fractions of width/height), `peak` (x, y fractions of the
    hottest pixel), `region` (e.g. "upper left", "centre"), `top10_mass_fraction` (share of
    the total heat in the hottest 10% of pixels: near 0.1 means diffuse, near 1 focal), `flat`
    and a one-sentence `text`.
    """
    heat = _check_heatmap(heatmap).astype(np.float64)
    h, w = heat.shape
    total = float(heat.sum())
    if total <= 0.0:
        return {
            "centroid": None,
            "peak": None,
            "region": None,
            "top10_mass_fraction": 0.0,
            "flat": True,
            "text": "The activation map is flat: no image region stood out for this class.",
        }
    yy, xx = np.mgrid[0:h, 0:w]
    cx = float(((xx + 0.5) * heat).sum() / total / w)
    cy = float(((yy + 0.5) * heat).sum() / total / h)
    py, px = np.unravel_index(int(np.argmax(heat)), heat.shape)
    k = max(1, round(0.1 * heat.size))
    top = float(np.sort(heat, axis=None)[-k:].sum() / total)
    region = _region(cx, cy)
    spread = "focal" if top >= 0.5 else ("moderately focal" if top >= 0.25 else "diffuse")
    return {
        "centroid": [round(cx, 3), round(cy, 3)],
        "peak": [round(float(px + 0.5) / w, 3), round(float(py + 0.5) / h, 3)],
        "region": region,
        "top10_mass_fraction": round(top, 3),
        "flat": False,
        "text": (
            f"The heat is {spread} ({top:.0%} of it in the hottest tenth of the image) and "
            f"centred in the {region} of the image."
        ),
    }


def mass_inside(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of the heatmap's total mass inside the boolean `mask` (0 for a flat map)."""
    heat = _check_heatmap(heatmap).astype(np.float64)
    if mask.shape != heat.shape:
        raise InputError(f"mask shape {mask.shape} differs from heatmap shape {heat.shape}")
    total = heat.sum()
    return float(heat[mask.astype(bool)].sum() / total) if total > 0 else 0.0


def _image_only(model, tabular):
    """`model` (image, tabular) -> logits viewed as image -> logits, the record held fixed."""
    import torch
    from torch import nn

    class ImageOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            record = torch.as_tensor(tabular, dtype=torch.float32).reshape(1, -1)
            self.register_buffer("record", record.to(_model_device(model)), persistent=False)

        def forward(self, image):
            return self.model(image, self.record.expand(image.shape[0], -1))

    return ImageOnly()


def _model_device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ModelError(f"{type(model).__name__} has no parameters") from None


@contextmanager
def _quiet_progress():
    """Silence the tqdm bars ScoreCAM/AblationCAM print per request (held under `_LOCK`)."""
    import importlib

    modules = [importlib.import_module(f"pytorch_grad_cam.{m}") for m in _PROGRESS_MODULES]
    saved = [module.tqdm for module in modules]
    try:
        for module in modules:
            module.tqdm = _NoProgress
        yield
    finally:
        for module, original in zip(modules, saved, strict=True):
            module.tqdm = original


_PROGRESS_MODULES = ("score_cam", "ablation_cam")


class _NoProgress:
    """Stands in for the `tqdm` module: `tqdm.tqdm(iterable)` returns the iterable."""

    @staticmethod
    def tqdm(iterable, *args, **kwargs):
        return iterable


def _target_layers(model) -> list:
    getter = getattr(model, "cam_target_layers", None)
    if getter is None:
        raise ModelError(f"{type(model).__name__} has no cam_target_layers(); Grad-CAM needs one")
    layers = list(getter())
    if not layers:
        raise ModelError(f"{type(model).__name__} names no layer for Grad-CAM")
    return layers


def _num_classes(model) -> int:
    num_classes = getattr(model, "num_classes", None)
    if not isinstance(num_classes, int):
        raise ModelError(f"{type(model).__name__} does not say how many classes it has")
    return num_classes


def _check_class(target_class, num_classes: int) -> int:
    if isinstance(target_class, bool) or not isinstance(target_class, int | np.integer):
        raise InputError(f"target_class must be an integer, got {target_class!r}")
    if not 0 <= int(target_class) < num_classes:
        raise InputError(f"target_class {target_class} out of range; use 0..{num_classes - 1}")
    return int(target_class)


def _as_batch(image, in_channels: int | None):
    import torch

    if not isinstance(image, torch.Tensor):
        raise InputError("image must be a normalised float tensor (C, H, W)")
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3:
        raise InputError(f"image must have shape (C, H, W), got {tuple(image.shape)}")
    if in_channels is not None and image.shape[0] != in_channels:
        raise InputError(f"image has {image.shape[0]} channels; the model expects {in_channels}")
    if not torch.is_floating_point(image):
        raise InputError("image must be normalised to float before explaining")
    return image.detach().to(dtype=torch.float32).unsqueeze(0)


def _check_heatmap(heatmap: np.ndarray) -> np.ndarray:
    heat = np.asarray(heatmap)
    if heat.ndim != 2 or heat.size == 0:
        raise InputError(f"heatmap must be a 2-D array, got shape {heat.shape}")
    if not np.all(np.isfinite(heat)):
        raise InputError("heatmap contains NaN or infinite values")
    return np.clip(heat.astype(np.float32), 0.0, 1.0)


def _colorize(heat: np.ndarray, colormap: str) -> np.ndarray:
    import matplotlib

    try:
        cmap = matplotlib.colormaps[colormap]
    except KeyError:
        raise InputError(f"unknown colormap {colormap!r}") from None
    return (cmap(heat)[..., :3] * 255.0).round().astype(np.uint8)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise InputError(f"image must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return array[..., :3]
    raise InputError(f"image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {array.shape}")


def _resize(heat: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if heat.shape == tuple(shape):
        return heat
    from PIL import Image

    resized = Image.fromarray(heat.astype(np.float32), mode="F").resize(
        (shape[1], shape[0]), Image.Resampling.BILINEAR
    )
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _png(rgb: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", compress_level=PNG_COMPRESSION)
    return buffer.getvalue()


def _region(cx: float, cy: float) -> str:
    """Name the ninth of the image holding (cx, cy): 'upper left' ... 'centre' ... 'lower right'."""
    col = "left" if cx < 1 / 3 else ("right" if cx > 2 / 3 else "")
    row = "upper" if cy < 1 / 3 else ("lower" if cy > 2 / 3 else "")
    if not col and not row:
        return "centre"
    if not row:
        return f"{col} side"
    if not col:
        return f"{row} middle"
    return f"{row} {col}"


__all__ = [
    "CAM_METHODS",
    "DEFAULT_METHOD",
    "CamResult",
    "canonical_method",
    "explain_gradcam",
    "heatmap_png",
    "mass_inside",
    "overlay_png",
    "summarise_heat",
]
