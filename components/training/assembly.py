"""From the run config to what training needs: preprocessing, augmentation, the model's
architecture and the `trainer` settings. Central training (`central.train_central`) and the
federated layout (`components.federated.layout`) both build from here.

`cfg` is the composed run config as a plain mapping (`components.config.to_container`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from components.data.preprocess import DEFAULT_TTA_CROP, Preprocessing

if TYPE_CHECKING:  # importing it needs torch and Lightning; this module stays light
    from components.training.datamodule import Augmentation


def preprocessing_from_config(cfg: Mapping[str, Any]) -> Preprocessing:
    """Input size, channels and test-time views from the `dataset` section."""
    dataset = cfg["dataset"]
    return Preprocessing(
        size=dataset["image_size"],
        channels=dataset["channels"],
        tta=tuple(dataset.get("tta") or ()),
        tta_crop=float(dataset.get("tta_crop", DEFAULT_TTA_CROP)),
    )


def augmentation_from_config(cfg: Mapping[str, Any]) -> Augmentation | bool:
    """The training augmentation (`trainer.augment` and its strengths), flips allowed by
    `dataset.hflip`."""
    from components.training.datamodule import Augmentation

    trainer = cfg["trainer"]
    if not trainer["augment"]:
        return False
    return Augmentation(
        hflip=cfg["dataset"]["hflip"],
        crop_scale=float(trainer["crop_scale"]),
        gamma=float(trainer["gamma"]),
        blur=float(trainer["blur"]),
    )


def needs_group_norm(privacy: Any) -> bool:
    """DP-SGD needs per-sample-safe normalisation; central DP would noise BatchNorm's running
    variances (into negative values). Both train with GroupNorm instead."""
    return privacy is not None and bool(privacy.dp_sgd or privacy.central_dp)


def architecture_from_config(
    cfg: Mapping[str, Any], num_classes: int | None = None, *, privacy: Any = None
) -> dict[str, Any]:
    """`build_model` keyword arguments from the `model` and `dataset` sections.

    `num_classes` defaults to the number of `dataset.classes`; with a `privacy` setting
    (`components.privacy.settings.PrivacySettings`) that needs it, the norm is GroupNorm.
    """
    m = cfg["model"]
    if num_classes is None:
        num_classes = len(cfg["dataset"]["classes"])
    kwargs: dict[str, Any] = {
        "name": m["name"],
        "num_classes": int(num_classes),
        "in_channels": int(cfg["dataset"]["channels"]),
        "norm": "group" if needs_group_norm(privacy) else m["norm"],
        "pretrained": bool(m["pretrained"]),
        "small_input": bool(m["small_input"]),
        "width": int(m["width"]),
    }
    if m["name"] == "tabular_mlp":
        kwargs["hidden"] = [int(h) for h in m["tabular_hidden"]]
        kwargs["dropout"] = float(m["dropout"])
    elif m["name"] == "fusion":
        kwargs["image_architecture"] = m["image_architecture"]
        kwargs["tabular_hidden"] = [int(h) for h in m["tabular_hidden"]]
        kwargs["fusion_hidden"] = int(m["fusion_hidden"])
        kwargs["dropout"] = float(m["dropout"])
        kwargs["clinical_lr_scale"] = float(m["clinical_lr_scale"])
    return kwargs


def image_only(architecture: Mapping[str, Any]) -> dict[str, Any]:
    """The image model a fusion architecture's image branch is (same backbone and options):
    what the image-only baseline of a fusion run trains."""
    keep = ("num_classes", "in_channels", "norm", "pretrained", "small_input", "width")
    return {"name": architecture["image_architecture"], **{k: architecture[k] for k in keep}}


def fit_settings_from_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The `trainer` settings every fit shares, central or on a site: batch size, optimiser,
    class imbalance handling and determinism (keyword arguments of `train_classifier` and
    `fit_local`)."""
    tr = cfg["trainer"]
    keys = ("batch_size", "lr", "weight_decay", "imbalance", "deterministic")
    return {key: tr[key] for key in keys}


__all__ = [
    "architecture_from_config",
    "augmentation_from_config",
    "fit_settings_from_config",
    "image_only",
    "needs_group_norm",
    "preprocessing_from_config",
]
