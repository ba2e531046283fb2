"""Image handling the page needs: a preview of the upload and the heatmap overlay blend.

Classification always happens in the service; these helpers only make pictures for the screen.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from ui.errors import InvalidInput

PREVIEW_MAX_SIDE = 1024
DICOM_MAGIC_OFFSET = 128


def is_dicom(data: bytes) -> bool:
    return len(data) > DICOM_MAGIC_OFFSET + 4 and data[128:132] == b"DICM"


def preview(data: bytes) -> Image.Image:
    """An RGB picture of the upload (PNG, JPEG or DICOM) for display, at most 1024 px a side."""
    if not data:
        raise InvalidInput("The file is empty.")
    picture = _dicom_preview(data) if is_dicom(data) else _pil_preview(data)
    picture = picture.convert("RGB")
    picture.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE))
    return picture


def _pil_preview(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InvalidInput(
            "This file is not an image we can show (use PNG, JPEG or DICOM)."
        ) from exc
    if image.mode in ("I;16", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image, dtype=np.float32)))
    return image


def _dicom_preview(data: bytes) -> Image.Image:
    import pydicom

    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        pixels = dataset.pixel_array.astype(np.float32)
    except Exception as exc:  # pydicom raises many types for unreadable pixel data
        raise InvalidInput("This DICOM file has no pixel data we can show.") from exc
    if pixels.ndim == 3 and pixels.shape[-1] not in (3, 4):
        pixels = pixels[0]  # first frame of a multi-frame image
    array = _to_uint8(pixels)
    if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
        array = 255 - array
    return Image.fromarray(array)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    low, high = float(np.nanmin(array)), float(np.nanmax(array))
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    return ((array - low) * (255.0 / (high - low))).clip(0, 255).astype(np.uint8)


def from_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def from_b64(text: str) -> Image.Image:
    """A picture sent by the service as base64 (optionally a data: URL)."""
    if text.startswith("data:"):
        text = text.split(",", 1)[1]
    return from_png(base64.b64decode(text))


def enlarge(image: Image.Image | None, side: int = 360, smooth: bool = True) -> Image.Image | None:
    """Scale a small service picture up for display (longest side `side`); larger ones stay.

    `smooth=False` keeps pixels square (for per-pixel maps like SHAP)."""
    if image is None or max(image.size) >= side:
        return image
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    method = Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST
    return image.resize(size, method)


def blend(base: Image.Image, heat: Image.Image, opacity: float) -> Image.Image:
    """`heat` (a coloured heatmap) laid over `base` with weight `opacity` in [0, 1].

    The heatmap is stretched to the base image's size, as the model's preprocessing stretched
    the image to its square input.
    """
    alpha = min(max(float(opacity), 0.0), 1.0)
    base_rgb = base.convert("RGB")
    heat_rgb = heat.convert("RGB").resize(base_rgb.size, Image.Resampling.BILINEAR)
    return Image.blend(base_rgb, heat_rgb, alpha)
