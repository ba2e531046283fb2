"""Safe image decoding for files, array datasets and request bodies.

Every image that enters oncoflow goes through here and comes out as a fully loaded PIL image
in mode 'L' (grayscale) or 'RGB', with `image.format` naming the source format. Choices:

* Only JPEG, PNG, BMP, TIFF, WEBP, GIF and DICOM are decoded (no EPS/PDF/... plugins).
* The pixel count and side lengths are checked from the header before any pixel is decoded.
* 16/32-bit grayscale is scaled to 8 bits by its own min..max range (keeps the contrast of
  12-bit medical images, which a plain clip or shift would flatten).
* Multi-frame images (animated GIF/WEBP, multi-page TIFF, multi-frame DICOM) are rejected:
  which frame holds the finding is not ours to guess, so the caller must send one frame.
* Alpha is dropped, palette/CMYK/YCbCr/LAB/HSV are converted to RGB, 1-bit/LA to L.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from components.errors import DataError, InputError

# Our own header check (max_pixels) supersedes PIL's warning, so silence that warning (a global
# filter: a per-call catch_warnings is not thread-safe). PIL still raises DecompressionBombError
# beyond 2 * Image.MAX_IMAGE_PIXELS (about 179 M pixels), which we report as a bomb too; we never
# change MAX_IMAGE_PIXELS.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "GIF")
DICOM_SUFFIXES = (".dcm", ".dicom")
ARRAY_SEPARATOR = "::"
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_SIDE = 16384
SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
}


def is_dicom_bytes(data: bytes) -> bool:
    """True when `data` carries the DICOM Part 10 preamble magic at byte 128."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def _to_l_or_rgb(image: Image.Image) -> Image.Image:
    """Convert any single-frame PIL mode to 'L' or 'RGB' (see module docstring)."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode in ("1", "LA", "La"):
        return image.convert("L")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_scale_to_uint8(np.asarray(image)))
    if mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB").convert("RGB")
    return image.convert("RGB")  # RGBA, RGBa, RGBX, CMYK, YCbCr, LAB, HSV, PA


def _scale_to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale a numeric array linearly onto 0..255 by its own range (uint8 passes through)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    values = array.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(array.shape, dtype=np.uint8)
    low, high = float(values[finite].min()), float(values[finite].max())
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    values = np.where(finite, values, low)
    return ((values - low) / (high - low) * 255.0).round().astype(np.uint8)


def _unidentified(data: bytes, max_side: int) -> InputError:
    """Why PIL refused `data`: a known signature with a bad header, or not an image at all."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        if width == 0 or height == 0 or width > max_side or height > max_side:
            return InputError(
                f"absurd image size {width}x{height}: each side must be between 1 and {max_side}"
            )
    for signature, name in SIGNATURES.items():
        if data.startswith(signature):
            return InputError(f"corrupt image header: {name} signature but unreadable header")
    return InputError(
        "not an image: format not recognised (accepted: JPEG, PNG, BMP, TIFF, WEBP, GIF, DICOM)"
    )


def _decode_pil(data: bytes, max_pixels: int, max_side: int) -> Image.Image:
    """Open, check the header geometry, then decode. Raises InputError with the reason."""
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise InputError(
            f"image too large (decompression bomb guard): {exc}; limit is {max_pixels} pixels"
        ) from exc
    except UnidentifiedImageError as exc:
        raise _unidentified(data, max_side) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"corrupt image header: {exc}") from exc
    width, height = image.size
    if width <= 0 or height <= 0 or width > max_side or height > max_side:
        raise InputError(
            f"absurd image size {width}x{height}: each side must be between 1 and {max_side}"
        )
    if width * height > max_pixels:
        raise InputError(
            f"image too large: {width}x{height} = {width * height} pixels exceeds the "
            f"{max_pixels} pixel limit (decompression bomb guard)"
        )
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise InputError(
            f"image has {frames} frames (animated or multi-page); send a single-frame image"
        )
    source_format = image.format
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise InputError(f"image too large (decompression bomb guard): {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise InputError(f"corrupt or truncated image data: {exc}") from exc
    try:
        out = _to_l_or_rgb(image)
    except (OSError, ValueError) as exc:
        raise InputError(f"unsupported image mode {image.mode!r}: {exc}") from exc
    out.format = source_format
    return out


def _decode_dicom(data: bytes, max_pixels: int, max_side: int) -> Image.Image:
    from components.data.dicom import read_dicom_bytes

    try:
        _, image = read_dicom_bytes(data)
    except DataError as exc:
        raise InputError(str(exc)) from exc
    width, height = image.size
    if width <= 0 or height <= 0 or width > max_side or height > max_side:
        raise InputError(f"absurd image size {width}x{height} in DICOM")
    if width * height > max_pixels:
        raise InputError(f"DICOM image {width}x{height} exceeds the {max_pixels} pixel limit")
    image.format = "DICOM"
    return image


def decode_bytes(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = DEFAULT_MAX_SIDE
) -> Image.Image:
    """Decode an uploaded image (or DICOM, de-identified first) or raise InputError saying why."""
    if not data:
        raise InputError("empty request body: no image bytes received")
    if is_dicom_bytes(data):
        return _decode_dicom(data, max_pixels, max_side)
    return _decode_pil(data, max_pixels, max_side)


def parse_array_ref(source: str) -> tuple[str, str, int]:
    """Split ``"<file.npz>::<array>/<index>"`` into its parts (DataError when malformed)."""
    path, _, key = source.rpartition(ARRAY_SEPARATOR)
    name, _, index = key.rpartition("/")
    if not path or not name or not index.isdigit():
        raise DataError(f"malformed array reference {source!r}; expected <file.npz>::<name>/<i>")
    return path, name, int(index)


@functools.lru_cache(maxsize=8)
def _load_npz_array(path: str, name: str, _mtime_ns: int, _size: int) -> np.ndarray:
    with np.load(path, allow_pickle=False) as archive:
        if name not in archive.files:
            raise DataError(f"array {name!r} not in {path} (has {sorted(archive.files)})")
        return archive[name]


def npz_array(path: str, name: str) -> np.ndarray:
    """Load one array of an .npz (cached while the file is unchanged)."""
    try:
        stat = os.stat(path)
    except FileNotFoundError as exc:
        raise DataError(f"file not found: {path}") from exc
    try:
        return _load_npz_array(path, name, stat.st_mtime_ns, stat.st_size)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read arrays from {path}: {exc}") from exc


def array_to_image(array: np.ndarray) -> Image.Image:
    """(H,W), (H,W,1), (H,W,3) or (H,W,4) array of any numeric dtype -> 'L' or 'RGB' image."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(_scale_to_uint8(array)))
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        rgb = np.ascontiguousarray(_scale_to_uint8(array[..., :3]))
        return Image.fromarray(rgb)
    raise DataError(f"unsupported image array shape {array.shape}")


def _open_array_ref(source: str, max_pixels: int) -> Image.Image:
    path, name, index = parse_array_ref(source)
    array = npz_array(path, name)
    if index >= len(array):
        raise DataError(f"index {index} out of range for array {name!r} of length {len(array)}")
    image = array_to_image(np.asarray(array[index]))
    if image.width * image.height > max_pixels:
        raise DataError(f"image {image.width}x{image.height} exceeds {max_pixels} pixels")
    image.format = "NPZ"
    return image


def open_image(source: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open a file path, DICOM file or ``<file.npz>::<array>/<index>`` reference, fully loaded.

    Raises DataError whose message is the reason only (no path: a DICOM path may hold
    identifiers; callers add the source where that is safe).
    """
    source = str(source)
    if ARRAY_SEPARATOR in source:
        return _open_array_ref(source, max_pixels)
    try:
        data = Path(source).read_bytes()
    except FileNotFoundError as exc:
        raise DataError("file not found") from exc
    except IsADirectoryError as exc:
        raise DataError("is a directory, not an image file") from exc
    except OSError as exc:
        raise DataError(f"cannot read file: {exc.strerror or exc}") from exc
    try:
        if source.lower().endswith(DICOM_SUFFIXES) or is_dicom_bytes(data):
            if not data:
                raise InputError("empty file")
            return _decode_dicom(data, max_pixels, DEFAULT_MAX_SIDE)
        if not data:
            raise InputError("empty file")
        return _decode_pil(data, max_pixels, DEFAULT_MAX_SIDE)
    except InputError as exc:
        raise DataError(str(exc)) from exc


def content_hash(image: Image.Image) -> str:
    """sha256 of mode, size and pixel bytes: identical pixels hash alike whatever the file."""
    digest = hashlib.sha256()
    digest.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def channels_of(image: Image.Image) -> int:
    return len(image.getbands())
