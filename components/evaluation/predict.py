"""Batched inference over what a model reads: uint8 image arrays (the form the image cache
stores), encoded clinical records, or both (`components.data.inputs`).

`data` is an image array, a tuple of the model's input arrays, or a split (`SplitArrays`),
from which the arrays the model reads are taken. Logits and probabilities average the logits
over the preprocessing's test-time views (`Preprocessing.tta`), as the service does;
embeddings are of the image itself.
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


def mean_over_views(fn, inputs: tuple, preprocessing: Preprocessing) -> torch.Tensor:
    """Mean of `fn(*inputs)` over the test-time views of the image input (the 4-D one) that
    `preprocessing.tta` names; `fn(*inputs)` itself without views or without an image."""
    at = next((i for i, t in enumerate(inputs) if t.ndim == 4), None)
    if not preprocessing.tta or at is None:
        return fn(*inputs)
    views = preprocessing.views(inputs[at])
    total = sum(fn(*inputs[:at], view, *inputs[at + 1 :]).float() for view in views)
    return total / len(views)


def predict_proba(
    model: nn.Module, data: Any, preprocessing: Preprocessing, batch_size: int = 256
) -> np.ndarray:
    """Softmax probabilities (N, K) as float32 (of the logits averaged over the test-time
    views), computed in eval mode without gradients."""
    out = _batched(
        model,
        lambda *t: torch.softmax(mean_over_views(model, t, preprocessing), dim=1),
        data,
        preprocessing,
        batch_size,
    )
    if out is None:
        return np.zeros((0, int(getattr(model, "num_classes", 0))), dtype=np.float32)
    return out


def predict_logits(
    model: nn.Module, data: Any, preprocessing: Preprocessing, batch_size: int = 256
) -> np.ndarray:
    """Logits (N, K) as float32, averaged over the test-time views (what calibration is fitted
    on), eval mode, no gradients."""
    out = _batched(
        model, lambda *t: mean_over_views(model, t, preprocessing), data, preprocessing, batch_size
    )
    if out is None:
        return np.zeros((0, int(getattr(model, "num_classes", 0))), dtype=np.float32)
    return out


def embed_arrays(
    model: nn.Module, data: Any, preprocessing: Preprocessing, batch_size: int = 256
) -> np.ndarray:
    """Penultimate features (N, D) from `model.embed` of the images themselves (no test-time
    views), float32, eval mode, no gradients."""
    if not hasattr(model, "embed"):
        raise ModelError("model has no embed(); build it with components.models.build_model")
    out = _batched(model, model.embed, data, preprocessing, batch_size)
    if out is None:
        return np.zeros((0, int(getattr(model, "embed_dim", 0))), dtype=np.float32)
    return out
