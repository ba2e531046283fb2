"""Batched inference over uint8 image arrays (the form the image cache stores)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from components.data.preprocess import Preprocessing
from components.errors import DataError, ModelError


def _check_images(x: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise DataError(f"images must be uint8 (N, C, H, W); got {x.dtype} {x.shape}")
    expected = (preprocessing.channels, preprocessing.size, preprocessing.size)
    if tuple(x.shape[1:]) != expected:
        raise DataError(f"images have shape {tuple(x.shape[1:])}, the model expects {expected}")
    return x


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration as exc:
        raise ModelError("model has no parameters") from exc


@torch.no_grad()
def _batched(model: nn.Module, fn, x: np.ndarray, preprocessing: Preprocessing, batch_size: int):
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    x = _check_images(x, preprocessing)
    device = _device(model)
    was_training = model.training
    model.eval()
    try:
        outputs = []
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size]))
            outputs.append(fn(preprocessing.normalise(batch).to(device)).float().cpu())
    finally:
        model.train(was_training)
    if not outputs:
        return None
    return torch.cat(outputs).numpy()


def predict_proba(
    model: nn.Module, x_uint8: np.ndarray, preprocessing: Preprocessing, batch_size: int = 256
) -> np.ndarray:
    """Softmax probabilities (N, K) as float32, computed in eval mode without gradients."""
    out = _batched(
        model, lambda t: torch.softmax(model(t), dim=1), x_uint8, preprocessing, batch_size
    )
    if out is None:
        return np.zeros((0, int(getattr(model, "num_classes", 0))), dtype=np.float32)
    return out


def predict_logits(
    model: nn.Module, x_uint8: np.ndarray, preprocessing: Preprocessing, batch_size: int = 256
) -> np.ndarray:
    """Logits (N, K) as float32 (what calibration is fitted on), eval mode, no gradients."""
    out = _batched(model, model, x_uint8, preprocessing, batch_size)
    if out is None:
        return np.zeros((0, int(getattr(model, "num_classes", 0))), dtype=np.float32)
    return out


def embed_arrays(
    model: nn.Module, x_uint8: np.ndarray, preprocessing: Preprocessing, batch_size: int = 256
) -> np.ndarray:
    """Penultimate features (N, D) from `model.embed`, float32, eval mode, no gradients."""
    if not hasattr(model, "embed"):
        raise ModelError("model has no embed(); build it with components.models.build_model")
    out = _batched(model, model.embed, x_uint8, preprocessing, batch_size)
    if out is None:
        return np.zeros((0, int(getattr(model, "embed_dim", 0))), dtype=np.float32)
    return out
