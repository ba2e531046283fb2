"""Batched inference over what a model reads: uint8 image arrays (the form the image cache
stores), encoded clinical records, or both (`components.data.inputs`).

`data` is an image array, a tuple of the model's input arrays, or a split (`SplitArrays`),
from which the arrays the model reads are taken.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from components.data.inputs import check_inputs, is_image
from components.data.preprocess import Preprocessing
from components.errors import DataError, ModelError


def model_inputs(model: nn.Module, data: Any) -> tuple[np.ndarray, ...]:
    """The arrays `model(*inputs)` reads from `data` (see the module docstring)."""
    if hasattr(data, "inputs"):
        return data.inputs(model)
    if isinstance(data, tuple | list):
        return tuple(np.asarray(a) for a in data)
    x = np.asarray(data)
    if x.ndim == 4 and x.dtype != np.uint8:
        raise DataError(f"images must be uint8 (N, C, H, W); got {x.dtype} {x.shape}")
    return (x,)


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration as exc:
        raise ModelError("model has no parameters") from exc


@torch.no_grad()
def _batched(model: nn.Module, fn, data: Any, preprocessing: Preprocessing, batch_size: int):
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    parts = model_inputs(model, data)
    if any(a.ndim == 4 and a.dtype != np.uint8 for a in parts):
        raise DataError("images must be uint8 (N, C, H, W)")
    parts = check_inputs(parts, preprocessing.channels, preprocessing.size, "input")
    device = _device(model)
    was_training = model.training
    model.eval()
    try:
        outputs = []
        for start in range(0, len(parts[0]), batch_size):
            batch = []
            for array in parts:
                chunk = torch.from_numpy(np.ascontiguousarray(array[start : start + batch_size]))
                chunk = preprocessing.normalise(chunk) if is_image(array) else chunk.float()
                batch.append(chunk.to(device))
            outputs.append(fn(*batch).float().cpu())
    finally:
        model.train(was_training)
    if not outputs:
        return None
    return torch.cat(outputs).numpy()


def predict_proba(
    model: nn.Module, data: Any, preprocessing: Preprocessing, batch_size: int = 256
) -> np.ndarray:
    """Softmax probabilities (N, K) as float32, computed in eval mode without gradients."""
    out = _batched(
        model, lambda *t: torch.softmax(model(*t), dim=1), data, preprocessing, batch_size
    )
    if out is None:
        return np.zeros((0, int(getattr(model, "num_classes", 0))), dtype=np.float32)
    return out


def predict_logits(
    model: nn.Module, data: Any, preprocessing: Preprocessing, batch_size: int = 256
) -> np.ndarray:
    """Logits (N, K) as float32 (what calibration is fitted on), eval mode, no gradients."""
    out = _batched(model, model, data, preprocessing, batch_size)
    if out is None:
        return np.zeros((0, int(getattr(model, "num_classes", 0))), dtype=np.float32)
    return out


def embed_arrays(
    model: nn.Module, data: Any, preprocessing: Preprocessing, batch_size: int = 256
) -> np.ndarray:
    """Penultimate features (N, D) from `model.embed`, float32, eval mode, no gradients."""
    if not hasattr(model, "embed"):
        raise ModelError("model has no embed(); build it with components.models.build_model")
    out = _batched(model, model.embed, data, preprocessing, batch_size)
    if out is None:
        return np.zeros((0, int(getattr(model, "embed_dim", 0))), dtype=np.float32)
    return out
