"""Preprocessing shared by training and serving, so both see pixels the same way, and the
test-time views (TTA) every prediction averages over."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TTA_VIEWS = ("crop", "hflip")  # what `Preprocessing.tta` may name
DEFAULT_TTA_CROP = 0.875  # share of each side the "crop" view keeps


@dataclass(frozen=True)
class Preprocessing:
    """Resize to `size`×`size`, convert to `channels` (1 or 3), scale to [0,1], normalise.

    `tta`: the test-time views a prediction averages the model's logits over (`views`): the
    image itself, with "crop" also its centre `tta_crop` of each side resized back to full
    size, and with "hflip" the mirror image of each. Empty: the image alone.
    """

    size: int = 64
    channels: int = 3
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)
    tta: tuple[str, ...] = ()
    tta_crop: float = DEFAULT_TTA_CROP

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError("channels must be 1 or 3")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            object.__setattr__(self, "mean", tuple(self.mean[: self.channels]) or (0.5,))
            object.__setattr__(self, "std", tuple(self.std[: self.channels]) or (0.25,))
        unknown = sorted(set(self.tta) - set(TTA_VIEWS))
        if unknown:
            raise ValueError(
                f"tta names unknown test-time views {unknown}; choose from {list(TTA_VIEWS)}"
            )
        object.__setattr__(self, "tta", tuple(v for v in TTA_VIEWS if v in self.tta))
        if not 0.5 <= float(self.tta_crop) < 1.0:
            raise ValueError(f"tta_crop must lie in [0.5, 1), got {self.tta_crop}")

    def to_dict(self) -> dict:
        """JSON-ready; without test-time views the TTA keys are left out, so a bundle without
        them reads (and fingerprints) as before they existed."""
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if not self.tta:
            del data["tta"], data["tta_crop"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        return cls(
            size=int(data["size"]),
            channels=int(data["channels"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            tta=tuple(data.get("tta", ())),
            tta_crop=float(data.get("tta_crop", DEFAULT_TTA_CROP)),
        )

    @property
    def view_count(self) -> int:
        """How many views `views` returns: forward passes per prediction."""
        return (2 if "crop" in self.tta else 1) * (2 if "hflip" in self.tta else 1)

    def views(self, images):
        """The test-time views of normalised images (N, C, H, W), the images themselves first.

        Mirroring, cropping and bilinear resizing commute with the per-channel normalisation,
        so views of normalised images equal normalised views of the pixels.
        """
        import torch.nn.functional as F

        out = [images]
        if "crop" in self.tta:
            height, width = images.shape[-2:]
            keep_h, keep_w = (
                max(1, round(height * self.tta_crop)),
                max(1, round(width * self.tta_crop)),
            )
            top, left = (height - keep_h) // 2, (width - keep_w) // 2
            centre = images[..., top : top + keep_h, left : left + keep_w]
            out.append(
                F.interpolate(centre, size=(height, width), mode="bilinear", align_corners=False)
            )
        if "hflip" in self.tta:
            out += [view.flip(-1) for view in out]
        return out

    def to_uint8(self, image: Image.Image) -> np.ndarray:
        """Resized uint8 array of shape (channels, size, size): the form caches store."""
        mode = "L" if self.channels == 1 else "RGB"
        resized = image.convert(mode).resize((self.size, self.size), Image.Resampling.BILINEAR)
        array = np.asarray(resized, dtype=np.uint8)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return np.ascontiguousarray(array)

    def normalise(self, batch_uint8):
        """uint8 tensor (N,C,H,W) or (C,H,W) -> float tensor normalised per channel."""
        import torch

        x = batch_uint8.float() / 255.0
        mean = torch.tensor(self.mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(-1, 1, 1)
        return (x - mean) / std

    def to_tensor(self, image: Image.Image):
        """PIL image -> normalised float tensor (C,H,W) ready for the model."""
        import torch

        return self.normalise(torch.from_numpy(self.to_uint8(image)))
