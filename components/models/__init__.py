"""Model zoo: every architecture behind one interface (`Classifier`).

`build_model(name, num_classes, ...)` returns a `components.models.classifier.Classifier` with
`forward(x) -> logits`, `embed(x) -> (N, D)` features and `cam_target_layers()`. The keyword
arguments are exactly what a `ModelBundle` stores in `architecture_kwargs`, so
`ModelBundle.build_model()` rebuilds the same module and loads its weights strictly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from components.errors import ConfigError

if TYPE_CHECKING:
    from components.models.classifier import Classifier

ARCHITECTURES: tuple[str, ...] = (
    "small_cnn",
    "resnet18",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
)
CLINICAL_ARCHITECTURES: tuple[str, ...] = ("tabular_mlp", "fusion")  # need a tabular_schema
NORMS: tuple[str, ...] = ("batch", "group")
PRETRAINED: frozenset[str] = frozenset(
    {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
)


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    norm: str = "batch",
    pretrained: bool = False,
    small_input: bool = True,
    width: int = 16,
    **clinical,
) -> Classifier:
    """Build architecture `name` with a fresh `num_classes`-way head.

    - `in_channels`: 1 (grey) or 3 (RGB); pretrained stems are adapted by summing over RGB.
    - `norm`: "batch", or "group" to swap every BatchNorm for GroupNorm (needed for DP-SGD).
    - `pretrained`: load the locally installed ImageNet weights; only architectures in
      `PRETRAINED` have them, anything else raises `ConfigError` (never a silent random init).
    - `small_input`: adapt the stem to small images (≤ ~64 px) by removing its down-sampling.
    - `width`: base channel count of `small_cnn` (ignored by the other architectures).
    - `**clinical`: for `tabular_mlp` and `fusion` only — `tabular_schema` and their own
      options (see `components.models.tabular` / `components.models.fusion`).
    """
    if name in CLINICAL_ARCHITECTURES:
        return _build_clinical(
            name, num_classes, in_channels, norm, pretrained, small_input, width, clinical
        )
    if clinical:
        raise ConfigError(f"{name!r} takes no options {sorted(clinical)}")
    if name not in ARCHITECTURES:
        raise ConfigError(
            f"unknown architecture {name!r}; "
            f"choose one of {', '.join(ARCHITECTURES + CLINICAL_ARCHITECTURES)}"
        )
    if norm not in NORMS:
        raise ConfigError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if int(num_classes) < 2:
        raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
    if int(in_channels) < 1:
        raise ConfigError(f"in_channels must be positive, got {in_channels}")
    if pretrained and name not in PRETRAINED:
        raise ConfigError(
            f"no local pretrained weights for {name!r}; set model.pretrained=false "
            f"or use one of {', '.join(sorted(PRETRAINED))}"
        )
    if pretrained and int(in_channels) not in (1, 3):
        raise ConfigError(f"pretrained weights need in_channels 1 or 3, got {in_channels}")
    if int(width) < 1:
        raise ConfigError(f"width must be positive, got {width}")

    from components.models import zoo
    from components.models.norm import batch_to_group_norm

    builder = {
        "small_cnn": zoo.small_cnn,
        "resnet18": zoo.resnet18,
        "efficientnet_lite0": zoo.efficientnet_lite0,
        "efficientnet_lite1": zoo.efficientnet_lite1,
        "efficientnet_lite2": zoo.efficientnet_lite2,
    }[name]
    model = builder(
        num_classes=int(num_classes),
        in_channels=int(in_channels),
        pretrained=bool(pretrained),
        small_input=bool(small_input),
        width=int(width),
    )
    if norm == "group":
        batch_to_group_norm(model)
    return model


__all__ = ["ARCHITECTURES", "NORMS", "PRETRAINED", "build_model"]


def _build_clinical(name, num_classes, in_channels, norm, pretrained, small_input, width, options):
    """The architectures that take a clinical record (tabular-only MLP, image+tabular fusion)."""
    if not options.get("tabular_schema"):
        raise ConfigError(f"{name!r} needs a tabular_schema (the clinical feature schema)")
    if name == "tabular_mlp":
        from components.models.tabular import build_tabular_model

        return build_tabular_model(int(num_classes), **options)
    from components.models.fusion import build_fusion_model

    return build_fusion_model(
        int(num_classes),
        in_channels=int(in_channels),
        norm=norm,
        pretrained=bool(pretrained),
        small_input=bool(small_input),
        width=int(width),
        **options,
    )
