"""Similar-case search: cosine nearest neighbours over labelled images' embeddings.

The index holds, per case, the model's penultimate-layer features, the label and a small
thumbnail — nothing else, no identifiers. Its cases are a serving site's own images
(`components.case_library`), or, for a central non-DP bundle built with
`package.training_images`, the training images (`from_bundle`).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from components.errors import InputError, ModelError

MAX_K = 50
_PNG_CACHE_SIZE = 4096  # encoded thumbnails kept between queries (a few KB each)


class SimilarCaseIndex:
    """Cosine top-k over L2-normalised features; `distance` = 1 − cosine similarity."""

    def __init__(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        thumbnails: np.ndarray,
        class_names: Sequence[str],
    ) -> None:
        features = np.asarray(features, dtype=np.float32)
        labels = np.asarray(labels)
        thumbnails = np.asarray(thumbnails)
        if features.ndim != 2 or features.shape[0] == 0:
            raise ModelError(f"similar-case features must be (N>0, D), got {features.shape}")
        if not np.all(np.isfinite(features)):
            raise ModelError("similar-case features contain NaN or infinite values")
        n = features.shape[0]
        if labels.shape != (n,) or thumbnails.shape[0] != n:
            raise ModelError(
                f"similar-case index is inconsistent: {n} features, {labels.shape[0]} labels, "
                f"{thumbnails.shape[0]} thumbnails"
            )
        if thumbnails.dtype != np.uint8 or thumbnails.ndim not in (3, 4):
            raise ModelError("similar-case thumbnails must be uint8 (N, t, t[, C])")
        if labels.min() < 0 or labels.max() >= len(class_names):
            raise ModelError(f"similar-case labels fall outside the {len(class_names)} classes")
        self._unit = _normalise(features)
        self._labels = labels.astype(np.int64)
        self._thumbnails = thumbnails
        self._class_names = [str(c) for c in class_names]
        self._png_cache: dict[int, str] = {}

    @classmethod
    def from_bundle(cls, bundle) -> SimilarCaseIndex:
        """Build from a `ModelBundle`'s `embeddings` (features, labels, thumbnails)."""
        embeddings = bundle.embeddings
        if not embeddings:
            raise ModelError(
                "this model bundle has no similar-case index (bundles carry none unless "
                "package.training_images); use a site-local case library"
            )
        missing = {"features", "labels", "thumbnails"} - set(embeddings)
        if missing:
            raise ModelError(f"the bundle's similar-case index lacks {sorted(missing)}")
        return cls(
            embeddings["features"],
            embeddings["labels"],
            embeddings["thumbnails"],
            bundle.class_names,
        )

    def __len__(self) -> int:
        return int(self._unit.shape[0])

    @property
    def dim(self) -> int:
        return int(self._unit.shape[1])

    def label_counts(self) -> dict[str, int]:
        """How many indexed cases each class has."""
        counts = np.bincount(self._labels, minlength=len(self._class_names))
        return {name: int(c) for name, c in zip(self._class_names, counts, strict=True)}

    def query(self, feature_vector, k: int = 5, *, thumbnails: bool = True) -> list[dict[str, Any]]:
        """The `k` nearest indexed cases: [{rank, label, label_index, distance,
        thumbnail_png_base64}], nearest first (rank 1)."""
        k = _check_k(k, len(self))
        vector = np.asarray(feature_vector, dtype=np.float32).reshape(-1)
        if vector.shape[0] != self.dim:
            raise InputError(f"query features have {vector.shape[0]} values; index has {self.dim}")
        if not np.all(np.isfinite(vector)):
            raise InputError("query features contain NaN or infinite values")
        similarity = self._unit @ _normalise(vector[None])[0]
        order = np.argsort(-similarity, kind="stable")[:k]  # ties: lower index first
        results = []
        for rank, i in enumerate(order, start=1):
            item: dict[str, Any] = {
                "rank": rank,
                "label": self._class_names[self._labels[i]],
                "label_index": int(self._labels[i]),
                "distance": float(max(0.0, 1.0 - float(similarity[i]))),
            }
            if thumbnails:
                item["thumbnail_png_base64"] = self._thumbnail_png(int(i))
            results.append(item)
        return results

    def query_image(self, model, image, k: int = 5, **kwargs) -> list[dict[str, Any]]:
        """Embed a normalised image (C, H, W) with `model.embed` and query with it."""
        import torch

        if not isinstance(image, torch.Tensor) or image.ndim != 3:
            raise InputError("image must be a normalised float tensor (C, H, W)")
        model.eval()
        with torch.no_grad():
            feature = model.embed(image.unsqueeze(0).float(), **kwargs)[0]
        return self.query(feature.cpu().numpy(), k)

    def _thumbnail_png(self, i: int) -> str:
        if i not in self._png_cache:
            from PIL import Image

            array = self._thumbnails[i]
            if array.ndim == 3 and array.shape[2] == 1:
                array = array[..., 0]
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG")
            if len(self._png_cache) >= _PNG_CACHE_SIZE:
                self._png_cache.clear()
            self._png_cache[i] = base64.b64encode(buffer.getvalue()).decode("ascii")
        return self._png_cache[i]


def _normalise(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def _check_k(k, size: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise InputError(f"k must be a positive integer, got {k!r}")
    if k > MAX_K:
        raise InputError(f"k must be at most {MAX_K}, got {k}")
    return min(int(k), size)


__all__ = ["MAX_K", "SimilarCaseIndex"]
