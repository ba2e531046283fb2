"""A faster copy of a model for batched prediction: BatchNorm folded into convolutions,
TensorFlow-style "same" padding computed once for the served image size instead of on every
call (EfficientNet-Lite pads each input with a copy before each convolution), and
channels-last memory for convolutional networks.

All are standard CPU inference rewrites that keep the function the model computes (up to
float rounding). `for_inference` checks that on the caller's example inputs and keeps the plain
copy where a rewrite would change the outputs (logged), so a model it cannot handle is served
as trained. Only prediction uses the copy: explanations hook into the original layers.
"""

from __future__ import annotations

import copy
import logging

from torch import nn

from components.errors import ModelError

log = logging.getLogger(__name__)

RTOL = 1e-3
ATOL = 1e-4


def _trace(model, example: tuple, hooks: list) -> None:
    """Run `example` through `model` once (no gradients) for `hooks` to see, then remove them."""
    import torch

    try:
        with torch.no_grad():
            model(*example)
    finally:
        for hook in hooks:
            hook.remove()


def _replace(model, name: str, new) -> None:
    """Put module `new` where the submodule called `name` is."""
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attribute, new)


def fold_batchnorm(model, example: tuple) -> int:
    """Fold every eval-mode BatchNorm2d whose input is a Conv2d's output into that conv, in
    place (the BatchNorm becomes Identity); returns the number of pairs folded.

    Pairs are found by running `example` once: a BatchNorm is folded only when the tensor it
    normalises is exactly what one convolution returned.
    """
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
    _trace(model, example, hooks)
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
        _replace(model, names[norm], nn.Identity())
    return len(pairs)


def _dynamic_same_padding_type():
    try:
        from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding
    except ImportError:  # the architecture's package is not installed: nothing to rewrite
        return None
    return Conv2dDynamicSamePadding


def static_same_padding(model, example: tuple) -> int:
    """Replace every dynamically "same"-padded convolution by a plain `Conv2d` (plus a
    `ZeroPad2d` where the padding is uneven) padded for the input size it sees on `example`,
    in place; returns the number replaced. The model then only computes the same function
    for inputs of that size."""
    dynamic = _dynamic_same_padding_type()
    if dynamic is None:
        return 0
    sizes: dict[nn.Module, tuple[int, int]] = {}

    def record(module, inputs) -> None:
        sizes[module] = tuple(inputs[0].shape[-2:])

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if type(m) is dynamic]
    _trace(model, example, hooks)
    names = {module: name for name, module in model.named_modules()}
    for module, (ih, iw) in sizes.items():
        (kh, kw), (sh, sw), (dh, dw) = module.weight.shape[-2:], module.stride, module.dilation
        pad_h = max((-(-ih // sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pad_w = max((-(-iw // sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        even = pad_h % 2 == 0 and pad_w % 2 == 0
        conv = nn.Conv2d(
            module.in_channels,
            module.out_channels,
            (kh, kw),
            stride=(sh, sw),
            padding=(pad_h // 2, pad_w // 2) if even else 0,
            dilation=(dh, dw),
            groups=module.groups,
            bias=module.bias is not None,
        )
        conv.weight, conv.bias = module.weight, module.bias
        if not even:
            pad = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
            conv = nn.Sequential(nn.ZeroPad2d(pad), conv)
        _replace(model, names[module], conv)
    return len(sizes)


class FixedInputSize(nn.Module):
    """`model` rewritten for one input size: refuses any other instead of padding wrongly."""

    def __init__(self, model: nn.Module, size: tuple[int, int]) -> None:
        super().__init__()
        self.model, self.size = model, tuple(int(v) for v in size)

    def forward(self, x, *rest):
        if tuple(x.shape[-2:]) != self.size:
            raise ModelError(
                f"the prediction model was built for {self.size} inputs, got {tuple(x.shape)}"
            )
        return self.model(x, *rest)


def for_inference(model, example: tuple):
    """A rewritten copy of the eval-mode `model` for prediction, checked on `example` (a tuple
    of input tensors, the first one images (N, C, H, W) for an image model); the plain copy
    if the rewrite is not faithful."""
    import torch

    plain = copy.deepcopy(model).eval()
    has_conv = any(isinstance(m, nn.Conv2d) for m in plain.modules())
    if not has_conv:
        return plain
    fast = copy.deepcopy(plain)
    try:
        folded = fold_batchnorm(fast, example)
        padded = static_same_padding(fast, example)
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
    log.info(
        "prediction model: %d BatchNorm layers folded, %d convolutions padded statically, "
        "channels-last",
        folded,
        padded,
    )
    return FixedInputSize(fast, example[0].shape[-2:]) if padded else fast


__all__ = ["FixedInputSize", "fold_batchnorm", "for_inference", "static_same_padding"]
