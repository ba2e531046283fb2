"""Image decoding: formats, request-body failure classes, content hashing."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from components.data import images
from components.data.images import content_hash, decode_bytes, open_image
from components.errors import DataError, InputError


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_header(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose header claims `width`x`height` (almost no pixel data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _chunk(b"IEND", b"")
    )


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient_rgb(width: int = 24, height: int = 16) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None, None]
    array = np.concatenate(
        [
            np.broadcast_to(x, (height, width, 1)),
            np.broadcast_to(y, (height, width, 1)),
            np.full((height, width, 1), 77, np.uint8),
        ],
        axis=2,
    )
    return Image.fromarray(np.ascontiguousarray(array))


# --- decode_bytes failure classes -------------------------------------------------------------


def test_empty_body():
    with pytest.raises(InputError, match="empty request body"):
        decode_bytes(b"")


def test_text_is_not_an_image():
    with pytest.raises(InputError, match="not an image"):
        decode_bytes(b"hello, this is a plain text file and not a picture at all\n" * 4)


def test_truncated_png():
    data = encode(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)),
        "PNG",
    )
    with pytest.raises(InputError, match="corrupt or truncated"):
        decode_bytes(data[: len(data) // 2])


def test_corrupt_png_body():
    data = bytearray(encode(gradient_rgb(), "PNG"))
    start = data.index(b"IDAT") + 8
    data[start : start + 20] = b"\xff" * 20
    with pytest.raises(InputError, match="corrupt"):
        decode_bytes(bytes(data))


def test_decompression_bomb_beyond_pil_limit():
    with pytest.raises(InputError, match="too large"):
        decode_bytes(png_header(100_000, 100_000), max_side=200_000)


def test_decompression_bomb_checked_from_header_before_decoding():
    # 8000x8000 = 64 M pixels: under PIL's own hard limit, over ours. The body holds almost no
    # pixel data, so a decode attempt would fail as "truncated": the size message proves the
    # header was checked first.
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(InputError, match=r"8000x8000 = 64000000 pixels exceeds"):
        decode_bytes(png_header(8000, 8000))
    with pytest.raises(InputError, match=r"exceeds the 1000 pixel limit"):
        decode_bytes(png_header(40, 30), max_pixels=1000)
    assert before == Image.MAX_IMAGE_PIXELS  # PIL's global limit is never changed


def test_zero_sized_image():
    with pytest.raises(InputError, match="absurd image size 0x10"):
        decode_bytes(png_header(0, 10))


def test_absurdly_long_side():
    with pytest.raises(InputError, match="absurd image size 20000x2"):
        decode_bytes(png_header(20_000, 2))


def test_animated_gif_is_rejected():
    frames = [Image.new("L", (8, 8), v) for v in (0, 128, 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(InputError, match="3 frames"):
        decode_bytes(buffer.getvalue())


def test_unsupported_format_plugin_is_refused():
    # EPS would run Ghostscript; it must be treated as "not an image".
    with pytest.raises(InputError, match="not an image"):
        decode_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")


# --- decode_bytes conversions -----------------------------------------------------------------


def test_16bit_grayscale_scaled_by_range():
    array = np.tile(np.linspace(0, 4095, 32).astype(np.uint16), (8, 1))
    image = decode_bytes(encode(Image.fromarray(array), "PNG"))
    assert image.mode == "L"
    out = np.asarray(image)
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out[0].astype(int)) >= 0)  # monotone, contrast kept
    assert len(np.unique(out)) == 32


def test_cmyk_jpeg_and_rgba_png_become_rgb():
    cmyk = decode_bytes(encode(gradient_rgb().convert("CMYK"), "JPEG"))
    assert cmyk.mode == "RGB" and cmyk.format == "JPEG"
    rgba = gradient_rgb().convert("RGBA")
    out = decode_bytes(encode(rgba, "PNG"))
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(gradient_rgb()))


def test_palette_and_bilevel_images():
    assert decode_bytes(encode(gradient_rgb().convert("P"), "PNG")).mode == "RGB"
    assert decode_bytes(encode(gradient_rgb().convert("1"), "PNG")).mode == "L"


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "JPEG", "WEBP"])
def test_formats_decode_fully(fmt):
    image = decode_bytes(encode(gradient_rgb(), fmt))
    assert image.size == (24, 16)
    assert image.mode == "RGB"
    assert image.format == fmt


# --- open_image -------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".jpg"])
def test_open_image_files(tmp_path, suffix):
    path = tmp_path / f"scan one (1){suffix}"
    gradient_rgb().save(path)
    image = open_image(str(path))
    assert image.size == (24, 16) and image.mode == "RGB"
    if suffix != ".jpg":
        assert np.array_equal(np.asarray(image), np.asarray(gradient_rgb()))


def test_open_image_errors_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        open_image(str(tmp_path / "missing.png"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not really a png")
    with pytest.raises(DataError, match="not an image"):
        open_image(str(bad))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        open_image(str(empty))


def test_open_image_array_reference(tmp_path):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 255, (5, 28, 28), dtype=np.uint8)
    rgb = rng.integers(0, 255, (3, 10, 12, 3), dtype=np.uint8)
    path = tmp_path / "mnist.npz"
    np.savez(path, train_images=gray, test_images=rgb)
    image = open_image(f"{path}::train_images/3")
    assert image.mode == "L" and image.format == "NPZ"
    assert np.array_equal(np.asarray(image), gray[3])
    image = open_image(f"{path}::test_images/2")
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), rgb[2])
    with pytest.raises(DataError, match="out of range"):
        open_image(f"{path}::train_images/5")
    with pytest.raises(DataError, match="not in"):
        open_image(f"{path}::val_images/0")
    with pytest.raises(DataError, match="malformed"):
        open_image(f"{path}::train_images")


def test_array_reference_sees_a_rewritten_file(tmp_path):
    path = tmp_path / "a.npz"
    np.savez(path, train_images=np.zeros((2, 4, 4), np.uint8))
    assert np.asarray(open_image(f"{path}::train_images/0")).max() == 0
    np.savez(path, train_images=np.full((2, 4, 5), 9, np.uint8))
    assert open_image(f"{path}::train_images/0").size == (5, 4)


# --- content_hash -----------------------------------------------------------------------------


def test_content_hash_depends_on_pixels_not_file(tmp_path):
    base = gradient_rgb()
    png, bmp = tmp_path / "a.png", tmp_path / "b.bmp"
    base.save(png)
    base.save(bmp)
    assert content_hash(open_image(str(png))) == content_hash(open_image(str(bmp)))
    changed = np.asarray(base).copy()
    changed[0, 0, 0] ^= 1
    assert content_hash(Image.fromarray(changed)) != content_hash(base)
    assert content_hash(base.convert("L")) != content_hash(base)


def test_is_dicom_bytes():
    assert images.is_dicom_bytes(b"\x00" * 128 + b"DICM" + b"rest")
    assert not images.is_dicom_bytes(b"\x00" * 128 + b"DICX")
