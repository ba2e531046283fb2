"""A faster copy of a model for batched prediction: BatchNorm folded into convolutions, and
channels-last memory for convolutional networks.

Both are standard CPU inference rewrites that keep the function the model computes (up to
float rounding). `for_inference` checks that on the caller's example inputs and keeps the plain
copy where a rewrite would change the outputs (logged), so a model it cannot handle is served
as trained. Only prediction uses the copy: explanations hook into the original layers.
"""

from __future__ import annotations

import copy
import logging

log = logging.getLogger(__name__)

RTOL = 1e-3
ATOL = 1e-4


def fold_batchnorm(model, example: tuple) -> int:
    """Fold every eval-mode BatchNorm2d whose input is a Conv2d's output into that conv, in
    place (the BatchNorm becomes Identity); returns the number of pairs folded.

    Pairs are found by running `example` once: a BatchNorm is folded only when the tensor it
    normalises is exactly what one convolution returned.
    """
    import torch
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    made_by: dict[int, nn.Conv2d] = {}
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []

    def after_conv(module, inputs, output) -> None:
        made_by[id(output)] = module

    def after_norm(module, inputs, output) -> None:
        conv = made_by.get(id(inputs[0]))
        if conv is not None and not module.training and module.track_running_stats:
            pairs.append((conv, module))

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(after_conv))
        elif isinstance(module, nn.BatchNorm2d):
            hooks.append(module.register_forward_hook(after_norm))
    try:
        with torch.no_grad():
            model(*example)
    finally:
        for hook in hooks:
            hook.remove()
    convs = [conv for conv, _ in pairs]
    if len(set(map(id, convs))) != len(convs):  # a conv feeding two norms: leave it alone
        return 0
    names = {module: name for name, module in model.named_modules()}
    for conv, norm in pairs:
        weight, bias = fuse_conv_bn_weights(
            conv.weight,
            conv.bias,
            norm.running_mean,
            norm.running_var,
            norm.eps,
            norm.weight,
            norm.bias,
        )
        conv.weight, conv.bias = weight, bias
        parent, _, attribute = names[norm].rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attribute, nn.Identity())
    return len(pairs)


def for_inference(model, example: tuple):
    """A rewritten copy of the eval-mode `model` for prediction, checked on `example` (a tuple
    of input tensors, the first one images (N, C, H, W) for an image model); the plain copy
    if the rewrite is not faithful."""
    import torch
    from torch import nn

    plain = copy.deepcopy(model).eval()
    has_conv = any(isinstance(m, nn.Conv2d) for m in plain.modules())
    if not has_conv:
        return plain
    fast = copy.deepcopy(plain)
    try:
        folded = fold_batchnorm(fast, example)
        fast = fast.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            expected = plain(*example).float()
            got = fast(*example).float()
        faithful = torch.allclose(got, expected, rtol=RTOL, atol=ATOL, equal_nan=True)
    except (AttributeError, RuntimeError, TypeError, ValueError) as exc:
        log.warning("prediction model left as trained (rewrite failed: %s)", exc)
        return plain
    if not faithful:
        log.warning("prediction model left as trained (the rewrite changed its outputs)")
        return plain
    log.info("prediction model: %d BatchNorm layers folded, channels-last", folded)
    return fast


__all__ = ["fold_batchnorm", "for_inference"]
