"""Does a heatmap point at the lesion? Its mass inside a lesion mask, against honest baselines.

For one image, the **in-mask share** is the heatmap's mass inside the mask over its total mass.
A map that knows nothing of the lesion still puts some mass there, so a share means little on
its own; three references come with it:

- **area share**: the mask's share of the image (what a uniform map scores);
- **random maps**: smooth random heatmaps of the same size (`random_heatmaps`: white noise
  smoothed circularly, rectified as Grad-CAM rectifies). The field is stationary on the torus,
  so every pixel carries the same expected share of a map's mass and a random map's expected
  in-mask share *is* the area share, whatever the smoothing; the draws measure its spread;
- **other images' maps** (`swapped_shares`): the heatmap of another test image (of another
  patient, when groups are given) scored against this image's mask. It keeps everything the
  method does regardless of the image (centre bias, blob size, smoothness) and drops only this
  image's content: a map that merely favours the centre of centred lesions scores as well here.

`summarise` aggregates the per-image values over a split: mean and median share, the means of
any named baselines (bench/lesion_localisation.py adds a fourth: the same architecture with
re-initialised weights, since even an untrained CNN's Grad-CAM is drawn to a dark blob on
skin), and the paired differences with bootstrap confidence intervals (resampling patients when
a group per image is given, since one patient's images are not independent). Masks are brought
to the heatmap's geometry by `resize_mask`, which resizes as `Preprocessing` resizes images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from components.errors import InputError
from components.explain.intervals import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_LEVEL,
    Interval,
    group_resampler,
    interval_of,
)

DEFAULT_DRAWS = 200


def mask_share(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of the non-negative `heatmap` (H, W)'s mass inside the boolean `mask` (H, W);
    NaN for a map with no mass (nothing to localise)."""
    heat = _check_heatmap(heatmap)
    inside = _check_mask(mask, heat.shape)
    total = float(heat.sum(dtype=np.float64))
    if total <= 0.0:
        return float("nan")
    return float(heat[inside].sum(dtype=np.float64) / total)


def random_heatmaps(shape: tuple[int, int], count: int, sigma: float, seed: int = 0) -> np.ndarray:
    """`count` smooth random heatmaps float32 (count, H, W), each scaled to a maximum of 1.

    White noise smoothed by a Gaussian of `sigma` pixels with wrap-around edges (a stationary
    field), then rectified (negative values set to 0, as Grad-CAM's ReLU does)."""
    from scipy.ndimage import gaussian_filter

    height, width = (int(s) for s in shape)
    if height < 1 or width < 1 or count < 1:
        raise InputError(f"need a positive shape and count, got {shape} and {count}")
    if not sigma > 0:
        raise InputError(f"sigma must be positive, got {sigma}")
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((int(count), height, width))
    smooth = gaussian_filter(noise, sigma=(0, float(sigma), float(sigma)), mode="wrap")
    maps = np.maximum(smooth, 0.0)
    peak = maps.reshape(len(maps), -1).max(axis=1)
    maps /= np.where(peak > 0, peak, 1.0)[:, None, None]
    return maps.astype(np.float32)


def random_shares(masks: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """Per mask of `masks` (N, H, W): the mean in-mask share of the random `maps` (M, H, W)
    (maps with no mass skipped). float64 (N,)."""
    maps = np.asarray(maps, dtype=np.float32)
    inside = np.asarray(masks)
    if maps.ndim != 3 or inside.ndim != 3 or inside.shape[1:] != maps.shape[1:]:
        raise InputError(f"masks {inside.shape} and maps {maps.shape} must be (N, H, W) alike")
    flat = maps.reshape(len(maps), -1)
    totals = flat.sum(axis=1, dtype=np.float64)
    usable = totals > 0
    if not usable.any():
        return np.full(len(inside), np.nan)
    normalised = (flat[usable] / totals[usable, None]).astype(np.float32)
    shares = inside.reshape(len(inside), -1).astype(np.float32) @ normalised.T
    return shares.astype(np.float64).mean(axis=1)


def swapped_shares(
    heatmaps: np.ndarray, masks: np.ndarray, groups: Sequence | None = None
) -> np.ndarray:
    """Per image i: the mean in-mask share, for mask i, of the other images' heatmaps (those
    with mass; with `groups`, only images of other groups). float64 (N,), NaN where no other
    map qualifies."""
    heat = np.asarray(heatmaps, dtype=np.float64)
    inside = np.asarray(masks, dtype=bool)
    if heat.ndim != 3 or inside.shape != heat.shape:
        raise InputError(f"heatmaps {heat.shape} and masks {inside.shape} must both be (N, H, W)")
    n = len(heat)
    flat = heat.reshape(n, -1)
    totals = flat.sum(axis=1)
    usable = totals > 0
    normalised = flat / np.where(usable, totals, 1.0)[:, None]
    shares = inside.reshape(n, -1).astype(np.float64) @ normalised.T  # [i, j]: map j, mask i
    allowed = np.ones((n, n), dtype=bool) & usable[None, :]
    np.fill_diagonal(allowed, False)
    if groups is not None:
        labels = np.asarray([str(g) for g in groups])
        if len(labels) != n:
            raise InputError(f"{len(labels)} groups for {n} heatmaps")
        allowed &= labels[:, None] != labels[None, :]
    counts = allowed.sum(axis=1)
    sums = np.where(allowed, shares, 0.0).sum(axis=1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Boolean (size, size) `mask`, resized as `Preprocessing.to_uint8` resizes an image
    (PIL bilinear to size × size, aspect ratio not kept), then thresholded at one half."""
    from PIL import Image

    array = np.asarray(mask)
    if array.ndim != 2:
        raise InputError(f"a mask must be 2-D, got shape {array.shape}")
    grey = Image.fromarray(np.where(array.astype(bool), 255, 0).astype(np.uint8), mode="L")
    resized = np.asarray(grey.resize((int(size), int(size)), Image.Resampling.BILINEAR))
    return resized >= 128


def summarise(
    shares: Sequence[float],
    baselines: Mapping[str, Sequence[float]],
    groups: Sequence | None = None,
    *,
    boot: int = DEFAULT_BOOTSTRAP,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> dict:
    """Aggregate per-image values over a split: `n`, mean and median share, each baseline's
    mean (`<name>_mean`) and the paired difference share − baseline with a percentile
    bootstrap interval (`minus_<name>`: mean, low, high), resampling whole groups when `groups`
    is given. Images whose share or any baseline is NaN (a flat map) are left out, counted in
    `flat`."""
    share = np.asarray(shares, dtype=np.float64)
    values = {k: np.asarray(v, dtype=np.float64) for k, v in baselines.items()}
    for name, column in values.items():
        if column.shape != share.shape:
            raise InputError(f"{name} has {column.shape[0]} values for {share.shape[0]} images")
    if not 0 < level < 1:
        raise InputError(f"level must lie in (0, 1), got {level}")
    keep = np.isfinite(share)
    for column in values.values():
        keep &= np.isfinite(column)
    labels = np.asarray([str(g) for g in groups] if groups is not None else range(len(share)))
    if len(labels) != len(share):
        raise InputError(f"{len(labels)} groups for {len(share)} images")
    out: dict = {
        "n": int(keep.sum()),
        "flat": int((~keep).sum()),
        "groups": len(set(labels[keep].tolist())),
        "level": level,
        "bootstrap": int(boot),
    }
    if not keep.any():
        return out
    share, labels = share[keep], labels[keep]
    out["share_mean"] = float(share.mean())
    out["share_median"] = float(np.median(share))
    resample = group_resampler(labels, boot, seed)
    for name, column in values.items():
        out[f"{name}_mean"] = float(column[keep].mean())
        out[f"minus_{name}"] = interval_of(share - column[keep], resample, level).as_dict()
    return out


def _check_heatmap(heatmap: np.ndarray) -> np.ndarray:
    heat = np.asarray(heatmap, dtype=np.float64)
    if heat.ndim != 2 or heat.size == 0:
        raise InputError(f"a heatmap must be a non-empty 2-D array, got shape {heat.shape}")
    if not np.all(np.isfinite(heat)):
        raise InputError("the heatmap contains NaN or infinite values")
    if heat.min() < 0:
        raise InputError("the heatmap has negative values; rectify or rescale it first")
    return heat


def _check_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    inside = np.asarray(mask)
    if inside.shape != tuple(shape):
        raise InputError(f"mask shape {inside.shape} differs from heatmap shape {tuple(shape)}")
    return inside.astype(bool)


__all__ = [
    "DEFAULT_BOOTSTRAP",
    "DEFAULT_DRAWS",
    "DEFAULT_LEVEL",
    "Interval",
    "mask_share",
    "random_heatmaps",
    "random_shares",
    "resize_mask",
    "summarise",
    "swapped_shares",
]
