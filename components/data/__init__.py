"""Data plane: ingest adapters, manifests, splits, image decoding and preprocessing."""
