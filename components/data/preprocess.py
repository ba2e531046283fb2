"""Preprocessing shared by training and serving, so both see pixels the same way."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Resize to `size`×`size`, convert to `channels` (1 or 3), scale to [0,1], normalise."""

    size: int = 64
    channels: int = 3
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    std: tuple[float, ...] = field(default=IMAGENET_STD)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError("channels must be 1 or 3")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            object.__setattr__(self, "mean", tuple(self.mean[: self.channels]) or (0.5,))
            object.__setattr__(self, "std", tuple(self.std[: self.channels]) or (0.25,))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        return cls(
            size=int(data["size"]),
            channels=int(data["channels"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
        )

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
