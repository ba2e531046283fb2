"""Build a model bundle from a trained model: weights, metadata, SHAP background, case index.

The bundle format itself (save, load, rebuild the model) is `components.bundle`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from components.bundle import ModelBundle
from components.data.preprocess import Preprocessing

THUMBNAIL_SIZE = 48


def make_bundle(
    model,
    *,
    architecture: dict[str, Any],
    class_names: list[str],
    preprocessing: Preprocessing,
    train_x: np.ndarray,
    train_y: np.ndarray,
    metrics: dict[str, Any],
    data_fingerprint: str,
    config: dict[str, Any],
    background_size: int,
    out_dir: Path,
    privacy: dict[str, Any] | None = None,
    tabular_schema: list[dict[str, Any]] | None = None,
    seed: int = 0,
) -> Path:
    """Write the bundle for `model` to `out_dir` and return that directory.

    The background set is a class-stratified sample of training images (SHAP); the similar-case
    index holds penultimate-layer features, labels and small thumbnails of every training image,
    and no identifiers.
    """
    import torch

    from components.evaluation.predict import embed_arrays

    kwargs = {k: v for k, v in architecture.items() if k != "name"}
    kwargs["pretrained"] = False  # the weights travel in the bundle; never re-download/reload
    rng = np.random.default_rng(seed)
    picked = _stratified_sample(train_y, background_size, rng)
    background = preprocessing.normalise(torch.from_numpy(train_x[picked]))
    features = embed_arrays(model, train_x, preprocessing)
    bundle = ModelBundle(
        architecture=architecture["name"],
        architecture_kwargs=kwargs,
        class_names=list(class_names),
        preprocessing=preprocessing,
        state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
        metrics=metrics,
        privacy=privacy,
        data_fingerprint=data_fingerprint,
        config=config,
        tabular_schema=tabular_schema,
        background=background,
        embeddings={
            "features": features.astype(np.float32),
            "labels": train_y.astype(np.int64),
            "thumbnails": _thumbnails(train_x),
        },
    )
    return bundle.save(out_dir)


def _stratified_sample(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    classes = np.unique(labels)
    per_class = max(1, size // max(1, len(classes)))
    picked = [
        rng.choice(np.flatnonzero(labels == c), min(per_class, int((labels == c).sum())), False)
        for c in classes
    ]
    return np.sort(np.concatenate(picked))


def _thumbnails(x: np.ndarray) -> np.ndarray:
    """uint8 (N,C,H,W) -> uint8 (N,t,t,C) thumbnails for the similar-case gallery."""
    import torch
    import torch.nn.functional as F

    out = []
    for start in range(0, len(x), 512):
        batch = torch.from_numpy(x[start : start + 512]).float()
        small = F.interpolate(batch, size=(THUMBNAIL_SIZE, THUMBNAIL_SIZE), mode="area")
        out.append(small.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return (
        np.concatenate(out) if out else np.zeros((0, THUMBNAIL_SIZE, THUMBNAIL_SIZE, 3), np.uint8)
    )
