"""What a model reads — images, clinical records or both — as one tuple of arrays.

Every model is called as `model(*inputs)`: an image model `model(images)`, the tabular MLP
`model(records)`, the fusion model `model(images, records)`. The two kinds of array are told
apart by form, so batching code needs no flags:

* images: uint8 (N, C, H, W), augmented per sample and normalised when a batch is formed;
* clinical records: float32 (N, D), the schema's encoding (`TabularLayout`), NaN = missing,
  passed through unchanged (the model imputes and standardises).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from components.errors import DataError

IMAGE, CLINICAL = "image", "clinical"
#: the inputs of the architectures that do not read an image alone
_KINDS = {"tabular_mlp": (CLINICAL,), "fusion": (IMAGE, CLINICAL)}

Inputs = np.ndarray | tuple[np.ndarray, ...]


def input_kinds(model_or_architecture: Any) -> tuple[str, ...]:
    """("image",), ("clinical",) or ("image", "clinical") for a model or an architecture name
    (wrappers such as Opacus' GradSampleModule are looked through)."""
    name = model_or_architecture
    if not isinstance(name, str):
        inner = getattr(name, "_module", name)
        name = getattr(inner, "architecture", "")
    return _KINDS.get(str(name), (IMAGE,))


def as_tuple(inputs: Inputs) -> tuple[np.ndarray, ...]:
    """A bare image array as a 1-tuple; a tuple unchanged."""
    return tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)


def is_image(array: np.ndarray) -> bool:
    return array.dtype == np.uint8 and array.ndim == 4


def check_inputs(inputs: Inputs, channels: int, size: int, name: str) -> tuple[np.ndarray, ...]:
    """Every array holds the same N rows; images are uint8 (N, C, H, W) of the expected
    geometry, clinical records float (N, D)."""
    parts = tuple(np.asarray(a) for a in as_tuple(inputs))
    if not parts:
        raise DataError(f"{name} split has no inputs")
    rows = {len(a) for a in parts}
    if len(rows) != 1:
        raise DataError(f"{name} inputs disagree on the number of cases: {sorted(rows)}")
    for array in parts:
        if is_image(array):
            if tuple(array.shape[1:]) != (channels, size, size):
                raise DataError(
                    f"{name} images have shape {tuple(array.shape[1:])}, the model expects "
                    f"{(channels, size, size)}; rebuild the image cache with this preprocessing"
                )
        elif array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
            raise DataError(
                f"{name} inputs must be uint8 images (N, C, H, W) or float clinical records "
                f"(N, D); got {array.dtype} {array.shape}"
            )
    return parts


def num_rows(inputs: Inputs) -> int:
    return len(as_tuple(inputs)[0])


__all__ = [
    "CLINICAL",
    "IMAGE",
    "Inputs",
    "as_tuple",
    "check_inputs",
    "input_kinds",
    "is_image",
    "num_rows",
]
