"""The model bundle: everything serving needs, versioned together (ARCHITECTURE.md).

Layout of a bundle directory::

    bundle.json      architecture, classes, preprocessing, schema, metrics, privacy, config,
                     `calibration` (temperature, conformal threshold, dangerous classes; absent:
                     uncalibrated) and `contents`: what the bundle holds besides its weights
    weights.pt       the model's state dict
    background.pt    (optional) the SHAP background, float (N,C,H,W) in the model's normalised
                     space: constant grey levels unless `package.training_images`
    embeddings.npz   (optional, only with `package.training_images`: central runs without DP)
                     similar-case index of training images: features, labels, thumbnails
    ood.npz          (optional, `calibration.ood=mahalanobis`) the out-of-distribution check's
                     aggregate statistics of training features: class means (K, D) and the
                     shared precision matrix (D, D); no single case's features

By default a bundle carries no image, thumbnail, embedding or label of training data; a
serving site builds its own similar-case library (`components.case_library`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.data.preprocess import Preprocessing
from components.errors import ModelError

FORMAT_VERSION = 1
#: `contents.background` values: what the SHAP background is made of
BACKGROUND_BASELINES = "constant grey levels (not patient data)"
BACKGROUND_TRAINING = "training images"
BACKGROUND_CLINICAL = (
    "constant grey levels and the model's own imputation record (its weights; no patient's data)"
)
BACKGROUND_UNRECORDED = "unrecorded (bundle written before contents were recorded)"
_META = "bundle.json"
_WEIGHTS = "weights.pt"
_BACKGROUND = "background.pt"
_EMBEDDINGS = "embeddings.npz"
_OOD = "ood.npz"
#: `contents.ood_statistics` when the bundle has them
OOD_STATISTICS = (
    "class means and shared covariance (precision matrix) of the training split's "
    "penultimate-layer features: aggregate statistics, no single case's features"
)


@dataclass
class ModelBundle:
    """In-memory bundle; `save`/`load` move it to and from a directory."""

    architecture: str
    architecture_kwargs: dict[str, Any]
    class_names: list[str]
    preprocessing: Preprocessing
    state_dict: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    privacy: dict[str, Any] | None = None
    data_fingerprint: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    tabular_schema: list[dict[str, Any]] | None = None
    # SHAP background: images (N,C,H,W) normalised, an encoded table (N,D), or for fusion
    # models {"image": ..., "tabular": ...}
    background: Any = None
    embeddings: dict[str, Any] | None = None  # {"features", "labels", "thumbnails"} arrays
    extra: dict[str, Any] = field(default_factory=dict)
    # what `background` is made of (BACKGROUND_BASELINES, BACKGROUND_TRAINING, ...)
    background_source: str = ""
    # temperature, conformal threshold, coverage, dangerous classes, what they were fitted on
    # (`components.calibration.record.Calibration.to_dict`); None: served uncalibrated
    calibration: dict[str, Any] | None = None
    # the Mahalanobis OOD check's aggregate statistics {"means", "precision"}; None: none
    ood_stats: dict[str, Any] | None = None

    @property
    def shap_nsamples(self) -> int:
        """The image-SHAP samples an /explain of this model uses unless the request or the
        server names others (`shap_nsamples_of` its config)."""
        return shap_nsamples_of(self.config)

    def contents(self) -> dict[str, Any]:
        """What the bundle holds besides the weights, from the data itself (so it cannot
        drift): SHAP background kind, size of its own case index, whether any training
        image (or anything derived per image) is inside."""
        if self.background is None:
            background = "none"
        else:
            background = self.background_source or BACKGROUND_UNRECORDED
        case_index = 0
        if self.embeddings:
            case_index = len(self.embeddings.get("labels", ()))
        return {
            "weights": True,
            "background": background,
            "case_index": case_index,
            "training_images": case_index > 0
            or background not in (BACKGROUND_BASELINES, BACKGROUND_CLINICAL, "none"),
            "ood_statistics": OOD_STATISTICS if self.ood_stats else None,
        }

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "architecture": self.architecture,
            "architecture_kwargs": self.architecture_kwargs,
            "class_names": list(self.class_names),
            "preprocessing": self.preprocessing.to_dict(),
            "metrics": self.metrics,
            "privacy": self.privacy,
            "data_fingerprint": self.data_fingerprint,
            "config": self.config,
            "tabular_schema": self.tabular_schema,
            "extra": self.extra,
            "calibration": self.calibration,
            "contents": self.contents(),
        }

    def save(self, directory: str | Path) -> Path:
        import numpy as np
        import torch

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / _META).write_text(json.dumps(self.metadata(), indent=2, default=str))
        torch.save(self.state_dict, path / _WEIGHTS)
        if self.background is not None:
            torch.save(self.background, path / _BACKGROUND)
        if self.embeddings is not None:
            np.savez_compressed(path / _EMBEDDINGS, **self.embeddings)
        if self.ood_stats:
            np.savez(path / _OOD, **self.ood_stats)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> ModelBundle:
        import numpy as np
        import torch

        path = Path(directory)
        try:
            meta = json.loads((path / _META).read_text())
            state = torch.load(path / _WEIGHTS, map_location="cpu", weights_only=True)
        except FileNotFoundError as exc:
            raise ModelError(f"{path} is not a model bundle (missing {exc.filename})") from exc
        if meta.get("format_version") != FORMAT_VERSION:
            raise ModelError(f"bundle format {meta.get('format_version')} is not supported")
        background = None
        if (path / _BACKGROUND).exists():
            background = torch.load(path / _BACKGROUND, map_location="cpu", weights_only=True)
        embeddings = None
        if (path / _EMBEDDINGS).exists():
            with np.load(path / _EMBEDDINGS) as data:
                embeddings = {k: data[k] for k in data.files}
        ood_stats = None
        if (path / _OOD).exists():
            with np.load(path / _OOD, allow_pickle=False) as data:
                ood_stats = {k: data[k] for k in data.files}
        return cls(
            architecture=meta["architecture"],
            architecture_kwargs=meta["architecture_kwargs"],
            class_names=meta["class_names"],
            preprocessing=Preprocessing.from_dict(meta["preprocessing"]),
            state_dict=state,
            metrics=meta.get("metrics", {}),
            privacy=meta.get("privacy"),
            data_fingerprint=meta.get("data_fingerprint", ""),
            config=meta.get("config", {}),
            tabular_schema=meta.get("tabular_schema"),
            background=background,
            embeddings=embeddings,
            extra=meta.get("extra", {}),
            background_source=(meta.get("contents") or {}).get("background", ""),
            calibration=meta.get("calibration"),
            ood_stats=ood_stats,
        )

    def build_model(self):
        """Instantiate the architecture, load the weights strictly, return it in eval mode."""
        from components.models import CLINICAL_ARCHITECTURES, build_model

        kwargs = dict(self.architecture_kwargs)
        if self.architecture in CLINICAL_ARCHITECTURES:
            if not (kwargs.get("tabular_schema") or self.tabular_schema):
                raise ModelError(f"a {self.architecture} bundle has no tabular_schema")
            kwargs.setdefault("tabular_schema", self.tabular_schema)
            kwargs.setdefault("num_classes", len(self.class_names))
            if self.architecture == "tabular_mlp":
                for image_only in ("pretrained", "in_channels", "norm", "small_input", "width"):
                    kwargs.pop(image_only, None)
        try:
            model = build_model(self.architecture, **kwargs)
            model.load_state_dict(self.state_dict, strict=True)
        except (TypeError, RuntimeError) as exc:
            raise ModelError(f"weights do not fit architecture {self.architecture}: {exc}") from exc
        return model.eval()


def shap_nsamples_of(config: dict[str, Any] | None) -> int:
    """A bundle's image-SHAP sample count from its run config: `package.shap_nsamples` (the
    default for a bundle made before the setting)."""
    from components.explain.one_pass import DEFAULT_NSAMPLES

    package = (config or {}).get("package") or {}
    return int(package.get("shap_nsamples", DEFAULT_NSAMPLES))


def model_fingerprint(bundle: ModelBundle) -> str:
    """sha256 of what makes the model's features: architecture, its arguments, classes,
    preprocessing and every weight (names, shapes, dtypes, bytes). A case library built with
    one model is refused by any other."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    head = {
        "architecture": bundle.architecture,
        "architecture_kwargs": bundle.architecture_kwargs,
        "class_names": list(bundle.class_names),
        "preprocessing": bundle.preprocessing.to_dict(),
    }
    digest.update(json.dumps(head, sort_keys=True, default=str).encode())
    for name in sorted(bundle.state_dict):
        tensor = bundle.state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            digest.update(f"{name}={tensor!r};".encode())
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def bundle_summary(bundle: ModelBundle) -> dict[str, Any]:
    """A JSON-safe description of a bundle (no weights)."""
    meta = bundle.metadata()
    meta.pop("config", None)
    return json.loads(json.dumps(meta, default=str)) | {
        "has_background": bundle.background is not None
    }


__all__ = [
    "BACKGROUND_BASELINES",
    "BACKGROUND_TRAINING",
    "ModelBundle",
    "bundle_summary",
    "model_fingerprint",
    "shap_nsamples_of",
]
