"""The model bundle: everything serving needs, versioned together (ARCHITECTURE.md).

Layout of a bundle directory::

    bundle.json      architecture, classes, preprocessing, schema, metrics, privacy, config...
    weights.pt       the model's state dict
    background.pt    (optional) preprocessed background images for SHAP, float (N,C,H,W)
    embeddings.npz   (optional) similar-case index: features, labels, thumbnails (no identifiers)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.data.preprocess import Preprocessing
from components.errors import ModelError

FORMAT_VERSION = 1
_META = "bundle.json"
_WEIGHTS = "weights.pt"
_BACKGROUND = "background.pt"
_EMBEDDINGS = "embeddings.npz"


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


def bundle_summary(bundle: ModelBundle) -> dict[str, Any]:
    """A JSON-safe description of a bundle (no weights)."""
    meta = bundle.metadata()
    meta.pop("config", None)
    return json.loads(json.dumps(meta, default=str)) | {
        "has_background": bundle.background is not None
    }


__all__ = ["ModelBundle", "bundle_summary"]
