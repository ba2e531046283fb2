"""Build and load the persisted retrieval index (chunks + dense embeddings).

Layout of an index directory::

    index.json        chunks, embedding model name, knowledge fingerprint, build time
    embeddings.npy    float32 (n_chunks, dim), unit length; absent for a BM25-only index

`python -m components.assistant.index --out DIR` builds one; serving packages it with the
service and loads it with `load_index` so nothing is embedded at start-up except the question.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.assistant.knowledge import (
    KNOWLEDGE_DIR,
    Chunk,
    knowledge_fingerprint,
    load_chunks,
)
from components.errors import DataError, ModelError

logger = logging.getLogger(__name__)

INDEX_FORMAT = 1
_META = "index.json"
_VECTORS = "embeddings.npy"


@dataclass
class Index:
    """Chunks plus (optionally) their embeddings, as loaded from disk or just built."""

    chunks: list[Chunk]
    embeddings: Any | None  # numpy array (n, dim) or None for BM25-only
    model_name: str | None
    fingerprint: str

    @property
    def note_ids(self) -> set[str]:
        return {c.note_id for c in self.chunks}


def build_index(
    knowledge_dir: str | Path = KNOWLEDGE_DIR,
    out_path: str | Path | None = None,
    embedder=None,
    dense: bool = True,
) -> Index:
    """Chunk the notes, embed them (unless `dense=False`) and save to `out_path` if given.

    A dense index needs the embedding model; if it cannot load, this raises `ModelError`
    rather than quietly producing a lexical-only index (pass `dense=False` for that on purpose).
    """
    chunks = load_chunks(knowledge_dir)
    embeddings = None
    model_name = None
    if dense:
        if embedder is None:
            from components.assistant.embedder import Embedder

            embedder = Embedder()
        embeddings = embedder.encode([c.embedding_text() for c in chunks])
        model_name = embedder.name
    index = Index(chunks, embeddings, model_name, knowledge_fingerprint(knowledge_dir))
    if out_path is not None:
        save_index(index, out_path)
    return index


def save_index(index: Index, out_path: str | Path) -> Path:
    import numpy as np

    folder = Path(out_path)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": INDEX_FORMAT,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model_name": index.model_name,
        "fingerprint": index.fingerprint,
        "chunks": [c.to_dict() for c in index.chunks],
    }
    vectors = folder / _VECTORS
    if index.embeddings is not None:
        np.save(vectors, np.asarray(index.embeddings, dtype=np.float32))
    elif vectors.exists():
        vectors.unlink()
    (folder / _META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    logger.info("assistant index with %d chunks written to %s", len(index.chunks), folder)
    return folder


def load_index(path: str | Path) -> Index:
    """Load an index directory written by `build_index`/`save_index`."""
    import numpy as np

    folder = Path(path)
    meta_path = folder / _META
    if not meta_path.is_file():
        raise DataError(
            f"no assistant index at {folder}; build it with "
            "`python -m components.assistant.index --out DIR`"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != INDEX_FORMAT:
        raise DataError(f"assistant index at {folder} has format {meta.get('format')}; rebuild it")
    chunks = [Chunk.from_dict(c) for c in meta["chunks"]]
    embeddings = None
    if meta.get("model_name"):
        vectors = folder / _VECTORS
        if not vectors.is_file():
            raise DataError(f"assistant index at {folder} lacks {_VECTORS}; rebuild it")
        embeddings = np.load(vectors)
        if embeddings.shape[0] != len(chunks):
            raise DataError(f"assistant index at {folder} is inconsistent; rebuild it")
    return Index(chunks, embeddings, meta.get("model_name"), meta["fingerprint"])


def is_stale(index: Index, knowledge_dir: str | Path = KNOWLEDGE_DIR) -> bool:
    """True when the notes changed since the index was built."""
    return index.fingerprint != knowledge_fingerprint(knowledge_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the assistant's retrieval index.")
    parser.add_argument("--knowledge", default=str(KNOWLEDGE_DIR), help="folder of *.md notes")
    parser.add_argument("--out", required=True, help="index directory to write")
    parser.add_argument("--bm25-only", action="store_true", help="skip dense embeddings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        index = build_index(args.knowledge, args.out, dense=not args.bm25_only)
    except (DataError, ModelError) as exc:
        print(f"error: {exc}")
        return 2
    kind = "dense+bm25" if index.embeddings is not None else "bm25 only"
    print(f"built {kind} index: {len(index.chunks)} chunks from {len(index.note_ids)} notes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
