"""Grad-CAM and image SHAP from one batched forward and backward pass (what `/explain` runs).

The SHAP map is expected gradients (Erion et al., 2021), the quantity `shap.GradientExplainer`
estimates: for the target class's softmax probability f,

    phi(x) = E_{b ~ background, a ~ U(0, 1)} [ (x - b) * grad f(b + a (x - b)) ].

shap draws each sample's reference b and position a independently at random. Here the same
expectation is estimated from *stratified* samples: the references by systematic sampling over
the background (every reference is used about equally often), the positions by stratified
jitter over [0, 1) paired with the references in random order. The estimate stays unbiased
(a unit test checks it against shap's estimator and completeness). It is no substitute for
samples: `bench/explain_latency.py RUN_DIR --accuracy` measures each setting's distance to a
converged reference, and the default 8 samples give a noisier map than shap's 32 did.

All samples and the image itself run through the model as one batch. The image's row gives the
probabilities and, at the model's CAM layers, the activations and gradients Grad-CAM weighs
(of the target *logit*, as pytorch-grad-cam's `ClassifierOutputTarget`); the other rows give the
SHAP gradients. One `torch.autograd.grad` call on the inputs and the CAM activations computes
no weight gradients. The base value (the background's mean probability) depends only on model
and background: `background_probabilities` computes it once for a served model.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np

from components.errors import InputError, ModelError
from components.explain.gradcam import (
    _LOCK,
    CamResult,
    _as_batch,
    _check_class,
    _image_only,
    _model_device,
    _num_classes,
    _target_layers,
)
from components.explain.shap_image import (
    ShapImageResult,
    _as_background,
    _check_nsamples,
)

DEFAULT_NSAMPLES = 8
ESTIMATOR = "expected gradients, stratified samples (one batched backward pass)"


@dataclass(frozen=True)
class ImageExplanation:
    """What one pass yields: the model's (uncalibrated) probabilities for the image, the class
    explained, its Grad-CAM map (None when not asked for) and its SHAP map (None without a
    background or when not asked for)."""

    probabilities: list[float]
    target_class: int
    cam: CamResult | None
    shap: ShapImageResult | None


def stratified_samples(nsamples: int, references: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(reference indices (n,), positions (n,) in [0, 1)) for `nsamples` expected-gradient
    samples over `references` background images.

    References: systematic sampling with a random start, so each reference's expected count is
    exactly n / references. Positions: one uniform draw in each of n equal strata of [0, 1),
    in random order, so each is uniform and independent of the reference it is paired with.
    Together an unbiased estimate of the expectation over (reference, position).
    """
    rng = np.random.default_rng(seed)
    start = rng.random()
    indices = np.floor((np.arange(nsamples) + start) * references / nsamples).astype(np.int64)
    indices = np.minimum(indices, references - 1)
    positions = (rng.permutation(nsamples) + rng.random(nsamples)) / nsamples
    return indices, positions.astype(np.float32)


def background_probabilities(model, background, tabular=None, batch_size: int = 64) -> np.ndarray:
    """Mean softmax probabilities (K,) of `model` over the background images (N, C, H, W):
    the SHAP base value of every class. `tabular`: a fusion model's record, held fixed."""
    import torch

    bg = torch.as_tensor(background).detach().float().to(_model_device(model))
    net = _image_only(model, tabular) if tabular is not None else model
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            probs = [
                torch.softmax(net(bg[i : i + batch_size]).float(), dim=1)
                for i in range(0, len(bg), batch_size)
            ]
    finally:
        model.train(was_training)
    return torch.cat(probs).mean(dim=0).cpu().numpy().astype(np.float64)


def explain_image(
    model,
    image,
    background=None,
    *,
    target_class: int | None = None,
    cam: bool = True,
    shap: bool = True,
    nsamples: int = DEFAULT_NSAMPLES,
    seed: int = 0,
    tabular=None,
    expected: np.ndarray | None = None,
    batch_size: int = 64,
) -> ImageExplanation:
    """Grad-CAM and/or expected-gradients SHAP of `image` (normalised (C, H, W)) for one class
    (default: the predicted one), from one batched pass.

    `background`: normalised images (N, C, H, W); without one no SHAP map is made. `expected`:
    `background_probabilities(model, background)` when already known (else computed here).
    `tabular`: a fusion model's encoded record (D,), held fixed. Up to `batch_size` rows go
    through the model at once (the default explanation is one batch).
    """
    import torch

    x = _as_batch(image, getattr(model, "in_channels", None)).to(_model_device(model))
    num_classes = _num_classes(model)
    if target_class is not None:
        target_class = _check_class(target_class, num_classes)
    if batch_size < 2:
        raise InputError(f"batch_size must be at least 2, got {batch_size}")
    layers = _target_layers(model) if cam else []
    net = _image_only(model, tabular) if tabular is not None else model
    use_shap = shap and background is not None
    points = x[:0]
    if use_shap:
        nsamples = _check_nsamples(nsamples)
        bg = _as_background(background, x.shape[1:]).to(x.device)
        indices, positions = stratified_samples(nsamples, len(bg), seed)
        references = bg[torch.from_numpy(indices).to(x.device)]
        alpha = torch.from_numpy(positions).to(x.device).view(-1, 1, 1, 1)
        points = references + alpha * (x - references)
    # The CAM hooks record only their own thread's forward pass, so calls on an eval-mode
    # model may run concurrently; a model in training mode is switched under the lock.
    with _LOCK if model.training else nullcontext():
        was_training = model.training
        model.eval()
        try:
            # the image with the last samples first: its row names the class the rest explain
            tail = points[max(0, len(points) - (batch_size - 1)) :]
            chosen, probabilities, cam_grads, tail_grads = _image_pass(
                net, layers, x, tail, target_class, cam
            )
            head = points[: len(points) - len(tail)]
            input_grads = [
                _sample_gradients(net, head[i : i + batch_size], chosen)
                for i in range(0, len(head), batch_size)
            ]
        finally:
            if was_training:
                model.train()
    probs = [float(p) for p in probabilities]
    cam_result = None
    if cam:
        heatmap = _gradcam_map(*cam_grads, tuple(x.shape[-2:]))
        cam_result = CamResult(
            heatmap=heatmap, target_class=chosen, method="gradcam", probabilities=probs
        )
    shap_result = None
    if use_shap:
        gradients = torch.cat([*input_grads, tail_grads])
        values = ((x - references) * gradients).mean(dim=0)  # (C, H, W)
        if expected is None:
            expected = background_probabilities(model, bg, tabular)
        shap_result = ShapImageResult(
            attribution=values.sum(dim=0).detach().cpu().numpy().astype(np.float32),
            target_class=chosen,
            expected=float(expected[chosen]),
            probability=probs[chosen],
            nsamples=nsamples,
            background_size=int(bg.shape[0]),
        )
    return ImageExplanation(
        probabilities=probs, target_class=chosen, cam=cam_result, shap=shap_result
    )


def _image_pass(net, layers, x, points, target_class, cam: bool):
    """One forward/backward of [points, x]: (class explained, the image's probabilities,
    (CAM activations, their gradients) of the image's row, the points' input gradients)."""
    import torch

    batch = torch.cat([points, x]).detach().requires_grad_(True)
    captured: list = []
    hooks = [layer.register_forward_hook(_capture(captured)) for layer in layers]
    try:
        with torch.enable_grad():
            logits = net(batch).float()
    finally:
        for hook in hooks:
            hook.remove()
    if len(captured) != len(layers):
        raise ModelError("a CAM layer ran more than once in one forward pass")
    probabilities = torch.softmax(logits[-1].detach(), dim=0)
    chosen = int(probabilities.argmax()) if target_class is None else target_class
    objective = logits.new_zeros(())
    if cam:
        objective = objective + logits[-1, chosen]
    if len(points):
        objective = objective + torch.softmax(logits[:-1], dim=1)[:, chosen].sum()
    if not objective.requires_grad:  # neither map asked for: nothing to differentiate
        return chosen, probabilities, ([], []), batch[:-1].detach()
    grads = torch.autograd.grad(objective, [batch, *captured], allow_unused=True)
    return chosen, probabilities, (captured, grads[1:]), grads[0][:-1]


def _sample_gradients(net, points, chosen: int):
    """Input gradients of the class's probability at `points` (one forward/backward)."""
    import torch

    batch = points.detach().requires_grad_(True)
    with torch.enable_grad():
        objective = torch.softmax(net(batch).float(), dim=1)[:, chosen].sum()
        return torch.autograd.grad(objective, batch)[0]


def _capture(store: list):
    """A forward hook appending the layer's output to `store`, for this thread's calls only."""
    owner = threading.get_ident()

    def hook(_module, _inputs, output) -> None:
        if threading.get_ident() != owner:  # a concurrent explanation's pass
            return
        if not hasattr(output, "requires_grad"):
            raise ModelError("a CAM layer must return one tensor")
        store.append(output)

    return hook


def _gradcam_map(activations, gradients, size: tuple[int, int]) -> np.ndarray:
    """Grad-CAM of the batch's last row, computed as pytorch-grad-cam's `GradCAM` does: channel
    weights = spatial mean of the gradients, ReLU of the weighted sum, each layer min-max scaled
    and resized (bilinear) to the input, the layers averaged and scaled again; (H, W) in [0, 1]."""
    import cv2

    def scaled(cam: np.ndarray, target: tuple[int, int] | None) -> np.ndarray:
        cam = cam - cam.min()
        cam = cam / (1e-7 + cam.max())
        return cv2.resize(np.float32(cam), target) if target else np.float32(cam)

    maps = []
    for activation, gradient in zip(activations, gradients, strict=True):
        if gradient is None:
            raise ModelError("the CAM layer does not lead to the model's output")
        a = activation[-1].detach().float().cpu().numpy()
        g = gradient[-1].detach().float().cpu().numpy()
        weights = g.mean(axis=(1, 2))
        cam = np.maximum((weights[:, None, None] * a).sum(axis=0), 0)
        maps.append(scaled(cam, (size[1], size[0])))
    heatmap = scaled(np.maximum(np.stack(maps), 0).mean(axis=0), None)
    return np.clip(np.nan_to_num(heatmap, nan=0.0), 0.0, 1.0).astype(np.float32)


__all__ = [
    "DEFAULT_NSAMPLES",
    "ESTIMATOR",
    "ImageExplanation",
    "background_probabilities",
    "explain_image",
    "stratified_samples",
]
