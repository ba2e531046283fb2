"""Lightning data module over in-memory uint8 image arrays.

Images stay uint8 (N, C, H, W) until a batch is formed: training samples are augmented one by
one on uint8 tensors (torchvision.transforms.v2), then the collate function stacks the batch and
normalises it with the run's `Preprocessing`, exactly as serving does.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from components.data.inputs import Inputs, as_tuple, check_inputs
from components.data.preprocess import Preprocessing
from components.errors import ConfigError, DataError

IMBALANCE_MODES = ("none", "weighted_loss", "weighted_sampler")
Arrays = tuple[Inputs, np.ndarray]  # (image array or tuple of the model's arrays, labels)


@dataclass(frozen=True)
class Augmentation:
    """Random train-time transforms. Turn `hflip` off when left/right carries the label."""

    hflip: bool = True
    degrees: float = 10.0
    translate: float = 0.05
    scale: tuple[float, float] = (0.95, 1.05)
    brightness: float = 0.2
    contrast: float = 0.2
    crop_scale: float = 1.0  # random-resized crop keeping >= this share of the area (1: none)
    gamma: float = 0.0  # random gamma in [1 - gamma, 1 + gamma] (0: none)
    blur: float = 0.0  # probability of a Gaussian blur, sigma 0.1-1.5 px (0: none)

    def build(self, size: int | None = None):
        """The torchvision v2 pipeline on uint8 (C,H,W); `size` is the crop's output side."""
        from torchvision.transforms import v2

        steps = []
        if self.crop_scale < 1.0:
            if size is None:
                raise ConfigError("a random-resized crop needs the image size")
            steps.append(v2.RandomResizedCrop(size, scale=(self.crop_scale, 1.0), antialias=True))
        if self.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if self.degrees or self.translate or self.scale != (1.0, 1.0):
            steps.append(
                v2.RandomAffine(
                    degrees=self.degrees,
                    translate=(self.translate, self.translate),
                    scale=self.scale,
                )
            )
        if self.brightness or self.contrast:
            steps.append(v2.ColorJitter(brightness=self.brightness, contrast=self.contrast))
        if self.gamma:
            steps.append(RandomGamma(self.gamma))
        if self.blur:
            steps.append(v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=self.blur))
        return v2.Compose(steps)


class RandomGamma(torch.nn.Module):
    """uint8 image -> (image / 255) ** g · 255, g uniform in [1 - spread, 1 + spread]: the
    intensity curve of another scanner or exposure."""

    def __init__(self, spread: float) -> None:
        super().__init__()
        if not 0 <= spread < 1:
            raise ConfigError("gamma spread must lie in [0, 1)")
        self.spread = spread

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        g = 1.0 + (2 * float(torch.rand(())) - 1) * self.spread
        return TF.adjust_gamma(image, g)


def resolve_augmentation(augment: bool | Augmentation | None) -> Augmentation | None:
    """`True` -> default `Augmentation()`, `False`/`None` -> no augmentation."""
    if isinstance(augment, Augmentation):
        return augment
    return Augmentation() if augment else None


def check_arrays(
    arrays: Arrays, preprocessing: Preprocessing, num_classes: int, name: str
) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Validate one split `(inputs, y)`: `inputs` an image array or a tuple of the model's
    arrays (`components.data.inputs`), int labels in range, one per case."""
    try:
        x, y = arrays
    except (TypeError, ValueError) as exc:
        raise DataError(f"{name} split must be an (inputs, labels) pair") from exc
    for array in as_tuple(x):
        array = np.asarray(array)
        if array.ndim == 4 and array.dtype != np.uint8:
            raise DataError(f"{name} images must be uint8 (N, C, H, W); got {array.dtype}")
    parts = check_inputs(x, preprocessing.channels, preprocessing.size, name)
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(parts[0]):
        raise DataError(f"{name} labels must be 1-D with one label per case ({len(parts[0])})")
    if len(y) == 0:
        raise DataError(f"{name} split is empty")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name} labels must be integers, got {y.dtype}")
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"{name} labels must lie in [0, {num_classes}); got {y.min()}..{y.max()}")
    return parts, y.astype(np.int64)


def class_counts(y: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(y, minlength=num_classes).astype(np.int64)


def inverse_frequency_weights(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Class weights n / (K · n_c) (mean weight 1 over samples); 0 for classes absent in `y`.

    An absent class has no sample to weight (common on a federated site), so its weight is moot.
    """
    counts = class_counts(y, num_classes)
    weights = np.zeros(num_classes, dtype=np.float64)
    present = counts > 0
    weights[present] = len(y) / (num_classes * counts[present])
    return weights


class ArrayDataset(Dataset):
    """(inputs, int64 label) per case; `inputs` is the image tensor (C,H,W) for an image model,
    else a tuple of per-case tensors (image (C,H,W) uint8 and/or record (D,) float32).
    `transform` augments images only."""

    def __init__(self, x: Inputs, y: np.ndarray, transform=None) -> None:
        self.parts = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in as_tuple(x))
        self.single = not isinstance(x, tuple | list) or len(self.parts) == 1
        self.y = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        items = []
        for part in self.parts:
            item = part[index]
            if self.transform is not None and item.dtype == torch.uint8 and item.ndim == 3:
                item = self.transform(item)
            items.append(item)
        return (items[0] if self.single else tuple(items)), self.y[index]


class NormaliseCollate:
    """Stack samples and normalise the image batch (picklable for worker processes); several
    inputs come out as a tuple in the same order."""

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.preprocessing = preprocessing

    def _stack(self, items: list[torch.Tensor]) -> torch.Tensor:
        batch = torch.stack(items)
        return self.preprocessing.normalise(batch) if batch.dtype == torch.uint8 else batch

    def __call__(self, samples):
        labels = torch.stack([label for _, label in samples])
        first = samples[0][0]
        if isinstance(first, tuple):
            inputs = tuple(self._stack([s[0][i] for s in samples]) for i in range(len(first)))
            return inputs, labels
        return self._stack([inputs for inputs, _ in samples]), labels


class ArrayDataModule(L.LightningDataModule):
    """Train/validation loaders over arrays, with augmentation and class-imbalance handling.

    `imbalance`: "none"; "weighted_loss" (see `class_weights`, passed to the loss);
    "weighted_sampler" (a seeded WeightedRandomSampler drawing classes equally often).
    """

    def __init__(
        self,
        train: Arrays,
        val: Arrays | None,
        preprocessing: Preprocessing,
        *,
        num_classes: int,
        batch_size: int = 32,
        imbalance: str = "none",
        augment: bool | Augmentation | None = False,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if imbalance not in IMBALANCE_MODES:
            raise ConfigError(f"imbalance={imbalance!r} is not one of {list(IMBALANCE_MODES)}")
        if batch_size < 1:
            raise ConfigError("batch_size must be positive")
        self.preprocessing = preprocessing
        self.num_classes = num_classes
        self.train_x, self.train_y = check_arrays(train, preprocessing, num_classes, "train")
        self.single_input = len(self.train_x) == 1
        self.val_arrays = None
        if val is not None:
            self.val_arrays = check_arrays(val, preprocessing, num_classes, "validation")
        self.batch_size = batch_size
        self.imbalance = imbalance
        self.augmentation = resolve_augmentation(augment)
        self.seed = seed
        self.num_workers = num_workers
        self._collate = NormaliseCollate(preprocessing)

    @property
    def num_train(self) -> int:
        return len(self.train_y)

    @property
    def class_weights(self) -> torch.Tensor | None:
        """Inverse-frequency loss weights when imbalance="weighted_loss", else None."""
        if self.imbalance != "weighted_loss":
            return None
        weights = inverse_frequency_weights(self.train_y, self.num_classes)
        return torch.tensor(weights, dtype=torch.float32)

    def sample_weights(self) -> np.ndarray:
        """Per-sample draw weights 1 / n_{y_i} (each present class drawn equally often)."""
        counts = class_counts(self.train_y, self.num_classes)
        return 1.0 / counts[self.train_y]

    def _loader(self, dataset: Dataset, **kwargs) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=self._collate,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        transform = self.augmentation.build(self.preprocessing.size) if self.augmentation else None
        dataset = ArrayDataset(self._inputs(self.train_x), self.train_y, transform)
        generator = torch.Generator().manual_seed(self.seed)
        if self.imbalance == "weighted_sampler":
            sampler = WeightedRandomSampler(
                torch.as_tensor(self.sample_weights(), dtype=torch.double),
                num_samples=len(dataset),
                replacement=True,
                generator=generator,
            )
            return self._loader(dataset, sampler=sampler)
        return self._loader(dataset, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        if self.val_arrays is None:
            return []  # type: ignore[return-value]
        x, y = self.val_arrays
        return self._loader(ArrayDataset(self._inputs(x), y), shuffle=False)

    def _inputs(self, parts: tuple[np.ndarray, ...]) -> Inputs:
        return parts[0] if self.single_input else parts
