"""Build a model bundle from a trained model: weights, metadata and a SHAP background.

By default the bundle holds no training-derived data: the SHAP background is constant grey
levels (`components.explain.background.grey_levels`) and there is no similar-case index (the
serving site builds its own, `components.case_library`). Only a central run without
differential privacy may add training images (`package.training_images`, checked by
`components.config.check` and again here): a class-stratified background sample and a
thumbnail + embedding + label of every training image.

The bundle format itself (save, load, rebuild the model) is `components.bundle`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from components.bundle import (
    BACKGROUND_BASELINES,
    BACKGROUND_CLINICAL,
    BACKGROUND_TRAINING,
    ModelBundle,
)
from components.case_library import THUMBNAIL_SIZE, thumbnails
from components.data.preprocess import Preprocessing
from components.errors import ConfigError


def bundle_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The `make_bundle` keywords a composed run config sets (what `bundle_task` passes)."""
    return {
        "background_size": int(cfg["serving"]["background_size"]),
        "training_images": bool(cfg["package"]["training_images"]),
    }


def make_bundle(
    model,
    *,
    architecture: dict[str, Any],
    class_names: list[str],
    preprocessing: Preprocessing,
    metrics: dict[str, Any],
    data_fingerprint: str,
    config: dict[str, Any],
    background_size: int,
    out_dir: Path,
    train_x: np.ndarray | None = None,
    train_y: np.ndarray | None = None,
    training_images: bool = False,
    privacy: dict[str, Any] | None = None,
    tabular_schema: list[dict[str, Any]] | None = None,
    seed: int = 0,
    calibration: dict[str, Any] | None = None,
    ood_stats: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write the bundle for `model` to `out_dir` and return that directory.

    Without `training_images` (the default) `train_x`/`train_y` are not read: the bundle holds
    the weights, metadata and `background_size` constant grey images. With it (central runs
    without DP only) the background is a class-stratified sample of `train_x` and the bundle
    carries a similar-case index of every training image (features, labels, thumbnails; no
    identifiers). `calibration` (`Calibration.to_dict()`) is what serving applies: calibrated
    probabilities, conformal prediction sets and referrals; `ood_stats` the OOD check's
    aggregate statistics of training features (`components.calibration.ood`).
    """
    if ood_stats and _private(config, privacy):
        raise ConfigError(
            "a differentially private model's bundle may not carry un-noised statistics of "
            "training features (the Mahalanobis OOD check); use calibration.ood=energy"
        )
    from components.data.inputs import CLINICAL, input_kinds

    if CLINICAL not in input_kinds(architecture["name"]):
        tabular_schema = None  # an image model reads no record, whatever the dataset holds
    elif not tabular_schema:
        raise ConfigError(f"a {architecture['name']} bundle needs the clinical schema it reads")
    kwargs = {k: v for k, v in architecture.items() if k != "name"}
    kwargs["pretrained"] = False  # the weights travel in the bundle; never re-download/reload
    if training_images:
        _check_training_images_allowed(config, privacy, train_x, train_y)
        if hasattr(model, "clinical_baseline"):
            raise ConfigError(
                "package.training_images is for image models; a model reading clinical "
                "records keeps its records at the site"
            )
        background, embeddings = _training_images(
            model, preprocessing, train_x, train_y, background_size, seed
        )
        source = BACKGROUND_TRAINING
    else:
        from components.explain.background import grey_levels

        background, embeddings = grey_levels(preprocessing, background_size), None
        source = BACKGROUND_BASELINES
    if hasattr(model, "clinical_baseline"):  # the model's own imputation record, no patient's
        from components.explain.background import fusion_background

        records = model.clinical_baseline(1)
        is_fusion = architecture["name"] == "fusion"
        background = fusion_background(background, records) if is_fusion else records
        source = BACKGROUND_CLINICAL
    bundle = ModelBundle(
        architecture=architecture["name"],
        architecture_kwargs=kwargs,
        class_names=list(class_names),
        preprocessing=preprocessing,
        state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
        metrics=metrics,
        privacy=privacy,
        data_fingerprint=data_fingerprint,
        config=shareable_config(config),
        tabular_schema=tabular_schema,
        background=background,
        embeddings=embeddings,
        background_source=source,
        calibration=calibration,
        ood_stats=ood_stats,
    )
    return bundle.save(out_dir)


# Keys of the run config that name this machine's files or services: a bundle leaves the site.
_LOCAL_KEYS = (("paths",), ("dataset", "root"), ("registry", "tracking_uri"))


def shareable_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """The run config without local paths or service addresses (which may hold credentials)."""
    import copy

    out = copy.deepcopy(dict(config or {}))
    for path in _LOCAL_KEYS:
        parent = out
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
    return out


def _private(config, privacy) -> bool:
    """Whether the run trained under a privacy mode (config) or reports a DP guarantee."""
    privacy = privacy or {}
    mode = str(((config or {}).get("privacy") or {}).get("mode", "none"))
    return (
        mode != "none"
        or str(privacy.get("mode", "none")) != "none"
        or (privacy.get("epsilon") is not None)
    )


def _check_training_images_allowed(config, privacy, train_x, train_y) -> None:
    """The config check, once more where the images would be written (defence in depth)."""
    mode = ((config or {}).get("training") or {}).get("mode", "central")
    privacy = privacy or {}
    private = str(privacy.get("mode", "none")) != "none" or privacy.get("epsilon") is not None
    if mode == "federated" or private:
        raise ConfigError(
            "training images may only enter the bundle of a central run without differential "
            "privacy (package.training_images)"
        )
    if train_x is None or train_y is None:
        raise ConfigError("training_images=True needs train_x and train_y")


def _training_images(model, preprocessing, train_x, train_y, background_size: int, seed: int):
    import torch

    from components.evaluation.predict import embed_arrays

    rng = np.random.default_rng(seed)
    picked = _stratified_sample(train_y, background_size, rng)
    background = preprocessing.normalise(torch.from_numpy(train_x[picked]))
    embeddings = {
        "features": embed_arrays(model, train_x, preprocessing).astype(np.float32),
        "labels": train_y.astype(np.int64),
        "thumbnails": thumbnails(train_x),
    }
    return background, embeddings


def _stratified_sample(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    classes = np.unique(labels)
    per_class = max(1, size // max(1, len(classes)))
    picked = [
        rng.choice(np.flatnonzero(labels == c), min(per_class, int((labels == c).sum())), False)
        for c in classes
    ]
    return np.sort(np.concatenate(picked))


__all__ = ["THUMBNAIL_SIZE", "bundle_settings", "make_bundle"]
