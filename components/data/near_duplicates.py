"""Near-duplicate images and likely-same-patient neighbours, from a small grey thumbnail.

`thumbnail` keeps each image as a 32×32 grey thumbnail (1,024 bytes, base64 in the manifest's
`thumbnail` column; ingest computes it once per image). Two images are compared by the
correlation of their thumbnails (mean removed, unit length: cosine of the centred pixels):
the same frame resized, re-encoded or with a caliper line or a few letters drawn on stays
near 1, a neighbouring slice of the same scan lower, another patient's image in the same view
lower still; the thresholds are the config's (`dataset.split`).

`similar_pairs` finds every pair above a correlation by blocked matrix products (vectorised:
no Python loop over pairs of images); `sequence_pairs` finds neighbours in a numbered file
sequence (`p (791).jpg` beside `p (792).jpg` in one folder); `connected_groups` joins pairs
into groups (scipy's connected components) that a split keeps together; `montage_png` draws
example pairs side by side for a report.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

THUMB = 32  # side of the grey thumbnail
BLOCK = 2048  # query rows compared at once (BLOCK × n float32 in memory)
NUMBERED = r"^(?P<prefix>.*?)(?P<number>\d+)\D*$"  # `p (791)`, `IMG_0012`, `case-7a`


def thumbnail(image: Image.Image) -> str:
    """The image as a 32×32 grey thumbnail, base64 of its 1,024 bytes."""
    grey = image.convert("L").resize((THUMB, THUMB), Image.Resampling.BILINEAR)
    return base64.b64encode(np.asarray(grey, dtype=np.uint8).tobytes()).decode("ascii")


def vectors(thumbnails: Sequence[str]) -> np.ndarray:
    """Centred, unit-length float32 rows (n, 1024) of base64 thumbnails (a flat one: zeros)."""
    size = THUMB * THUMB
    raw = b"".join(base64.b64decode(t) for t in thumbnails)
    out = np.frombuffer(raw, dtype=np.uint8).reshape(-1, size).astype(np.float32)
    if len(out) != len(thumbnails):
        raise ValueError("every thumbnail must hold 32×32 bytes")
    out -= out.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)


def similar_pairs(rows: np.ndarray, min_similarity: float) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) of `rows` (`vectors`) with correlation >= `min_similarity`:
    ((k, 2) int64, (k,) float32)."""
    found, values = [np.zeros((0, 2), dtype=np.int64)], [np.zeros(0, dtype=np.float32)]
    for start in range(0, len(rows), BLOCK):
        block = rows[start : start + BLOCK] @ rows.T
        i, j = np.nonzero(block >= min_similarity)
        keep = j > i + start
        found.append(np.stack([i[keep] + start, j[keep]], axis=1).astype(np.int64))
        values.append(block[i[keep], j[keep]])
    return np.concatenate(found), np.concatenate(values)


def nearest_similarity(query: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """For each query row, its highest correlation with any reference row (-1: none)."""
    out = np.full(len(query), -1.0, dtype=np.float32)
    if not len(reference):
        return out
    for start in range(0, len(query), BLOCK):
        out[start : start + BLOCK] = (query[start : start + BLOCK] @ reference.T).max(axis=1)
    return out


def sequence_pairs(
    sources: Sequence[str], rows: np.ndarray, min_similarity: float, max_gap: int = 1
) -> np.ndarray:
    """Pairs (i, j) of files in one folder with one name prefix whose numbers are at most
    `max_gap` apart, next to each other in the sequence, and whose thumbnails (`vectors`)
    correlate at least `min_similarity`: neighbouring slices or frames of one acquisition."""
    paths = pd.Series([str(s).split("::", 1)[0] for s in sources])
    parts = paths.map(lambda p: Path(p).stem).str.extract(NUMBERED)
    table = pd.DataFrame(
        {
            "row": np.arange(len(paths)),
            "folder": paths.map(lambda p: str(Path(p).parent)),
            "prefix": parts["prefix"].str.strip(),
            "number": pd.to_numeric(parts["number"], errors="coerce"),
        }
    ).dropna(subset=["number"])
    table = table.sort_values(["folder", "prefix", "number"], kind="stable")
    before = table.shift(1)
    same = (table["folder"] == before["folder"]) & (table["prefix"] == before["prefix"])
    close = (table["number"] - before["number"]) <= max_gap
    linked = table[same & close]
    if linked.empty:
        return np.zeros((0, 2), dtype=np.int64)
    i = before.loc[linked.index, "row"].to_numpy(dtype=np.int64)
    j = linked["row"].to_numpy(dtype=np.int64)
    similar = np.einsum("ij,ij->i", rows[i], rows[j]) >= min_similarity
    return np.stack([i[similar], j[similar]], axis=1)


def connected_groups(n: int, pairs: np.ndarray) -> np.ndarray:
    """Group label (0..groups-1) of each of `n` items, joining every pair transitively."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), (n, n))
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64)


def montage_png(
    pairs: Sequence[tuple[Image.Image, Image.Image, str]], path: Path, side: int = 96
) -> Path:
    """Draw `(left, right, caption)` pairs one per row, side by side, as a PNG at `path`."""
    caption_h = 14
    height = max(1, len(pairs)) * (side + caption_h)
    canvas = Image.new("RGB", (2 * side + 6, height), "white")
    draw = ImageDraw.Draw(canvas)
    for row, (left, right, caption) in enumerate(pairs):
        top = row * (side + caption_h)
        for col, image in enumerate((left, right)):
            thumb = image.convert("RGB")
            thumb.thumbnail((side, side))
            canvas.paste(thumb, (col * (side + 6), top))
        draw.text((2, top + side), caption, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return path


def example_montage(examples: Sequence[tuple[str, str, float]], path: Path) -> Path | None:
    """A montage of `(source, source, similarity)` pairs (those that still decode), or None."""
    from components.data.images import open_image

    drawn = []
    for first, second, similarity in examples:
        try:
            drawn.append((open_image(first), open_image(second), f"similarity {similarity:.3f}"))
        except Exception:  # a file gone since ingest: leave the pair out of the picture
            continue
    return montage_png(drawn, path) if drawn else None
