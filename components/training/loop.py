"""The one training loop: an `ArrayDataModule` and a `ClassifierModule` run by a Lightning
`Trainer`. `fit_local` (a few epochs on one federated site) uses it directly; central training
(`components.training.central.train_classifier`) adds validation, early stopping and
checkpoints on top of the same pieces.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from components.data.preprocess import Preprocessing
from components.errors import ConfigError, ModelError
from components.training.datamodule import ArrayDataModule, Arrays, Augmentation
from components.training.module import ClassifierModule, OptimizerHook
from components.training.progress import TrainingProgress

LoaderHook = Callable[[DataLoader], DataLoader]


class ThroughputTimer(L.Callback):
    """Time spent in training batches (validation excluded) and images seen."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.images = 0
        self._start: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def _stop(self) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.images += len(batch[1])

    def on_validation_start(self, trainer, pl_module) -> None:
        self._stop()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop()

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def model_num_classes(model: nn.Module) -> int:
    """The `num_classes` that `components.models.build_model` sets on every model."""
    num_classes = getattr(model, "num_classes", None)
    if not isinstance(num_classes, int):
        raise ModelError("model must be built by components.models.build_model (no num_classes)")
    return num_classes


def check_fit_settings(max_epochs: int, batch_size: int, lr: float) -> None:
    if max_epochs < 1 or batch_size < 1 or lr <= 0:
        raise ConfigError("epochs, batch_size and lr must be positive")


@contextmanager
def quiet_lightning():
    """Silence Lightning's chatter about workers, devices and log intervals for small runs."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*number of training batches.*")
        warnings.filterwarnings("ignore", message=r".*GPU available but not used.*")
        warnings.filterwarnings("ignore", message=r".*deterministic.*")
        warnings.filterwarnings("ignore", message=r".*have no `val_dataloader`.*")
        warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec.*")
        for lg in loggers:
            lg.setLevel(max(lg.level, logging.WARNING))
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def make_trainer(
    *,
    out_dir: Path | None,
    max_epochs: int,
    callbacks: list[L.Callback],
    deterministic: bool,
    accelerator: str,
    validate: bool,
    checkpointing: bool = False,
    logger: Any = False,
    steps_per_epoch: int,
) -> L.Trainer:
    """A single-device Trainer without sanity checks or progress bar: progress is logged by a
    `TrainingProgress` callback instead (a bar would garble log lines on the same terminal)."""
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=1,
        callbacks=callbacks,
        logger=logger,
        default_root_dir=str(out_dir) if out_dir is not None else None,
        enable_checkpointing=checkpointing,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=None if validate else 0,
        log_every_n_steps=max(1, min(50, steps_per_epoch)),
        # "warn": some CUDA kernels (e.g. adaptive pooling backward) have no deterministic version
        deterministic="warn" if deterministic else False,
    )


def seeded_data_and_module(
    model: nn.Module,
    train: Arrays,
    val: Arrays | None,
    preprocessing: Preprocessing,
    *,
    seed: int,
    batch_size: int,
    imbalance: str,
    augment: Augmentation | bool,
    num_workers: int,
    lr: float,
    weight_decay: float,
    max_epochs: int,
    optimizer_hook: OptimizerHook | None,
    proximal_mu: float = 0.0,
    global_params: Any = None,
    warmup_epochs: float = 0.0,
) -> tuple[ArrayDataModule, ClassifierModule]:
    """Seed everything, then the data module and the LightningModule every fit uses."""
    num_classes = model_num_classes(model)
    L.seed_everything(seed, workers=True, verbose=False)
    data = ArrayDataModule(
        train,
        val,
        preprocessing,
        num_classes=num_classes,
        batch_size=batch_size,
        imbalance=imbalance,
        augment=augment,
        seed=seed,
        num_workers=num_workers,
    )
    module = ClassifierModule(
        model,
        num_classes,
        lr=lr,
        weight_decay=weight_decay,
        max_epochs=max_epochs,
        warmup_epochs=warmup_epochs,
        class_weights=data.class_weights,
        proximal_mu=proximal_mu,
        global_params=global_params,
        optimizer_hook=optimizer_hook,
    )
    return data, module


def fit_local(
    model: nn.Module,
    train: Arrays,
    preprocessing: Preprocessing,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 1e-4,
    imbalance: str = "none",
    augment: bool | Augmentation = False,
    seed: int = 0,
    proximal_mu: float = 0.0,
    global_params: Iterable[torch.Tensor] | None = None,
    deterministic: bool = True,
    num_workers: int = 0,
    accelerator: str = "auto",
    callbacks: list[L.Callback] | None = None,
    optimizer_hook: OptimizerHook | None = None,
    loader_hook: LoaderHook | None = None,
    progress_label: str | None = None,
) -> dict[str, Any]:
    """Train `model` in place for `epochs` epochs on one site's data (no validation).

    The learning-rate schedule spans the `epochs` of this call. With `proximal_mu > 0` the
    FedProx term pulls the weights toward `global_params` (default: the model's parameters at
    the start of the call, i.e. the global model the site just received). Use a different
    `seed` per site and round. Returns JSON-safe metrics: `train_loss` (last epoch),
    `num_examples`, `epochs`, `wall_seconds`, `images_per_second`, `history`.

    Extension points, for DP-SGD and the like: `loader_hook(train_loader) -> loader` replaces
    the training loader (e.g. Poisson sampling), `optimizer_hook(module, optimizer) ->
    optimizer` wraps the optimiser (e.g. Opacus `make_private` on `module`), and `callbacks`
    are added to the Trainer.

    Progress: one log line per local epoch (no in-epoch lines), at INFO prefixed with
    `progress_label` (e.g. the site's name) when given, else at DEBUG.
    """
    check_fit_settings(epochs, batch_size, lr)
    data, module = seeded_data_and_module(
        model,
        train,
        None,
        preprocessing,
        seed=seed,
        batch_size=batch_size,
        imbalance=imbalance,
        augment=augment,
        num_workers=num_workers,
        lr=lr,
        weight_decay=weight_decay,
        max_epochs=epochs,
        optimizer_hook=optimizer_hook,
        proximal_mu=proximal_mu,
        global_params=global_params,
    )
    timer = ThroughputTimer()
    progress = TrainingProgress(
        label=progress_label,
        level=logging.INFO if progress_label else logging.DEBUG,
        interval_s=None,
        monitor=None,
    )
    start = time.perf_counter()
    with quiet_lightning():
        trainer = make_trainer(
            out_dir=None,
            max_epochs=epochs,
            callbacks=[timer, progress, *(callbacks or [])],
            deterministic=deterministic,
            accelerator=accelerator,
            validate=False,
            steps_per_epoch=-(-data.num_train // batch_size),
        )
        train_loader = data.train_dataloader()
        if loader_hook is not None:
            train_loader = loader_hook(train_loader)
        trainer.fit(module, train_dataloaders=train_loader)
    wall = time.perf_counter() - start
    module.model.cpu()
    history = module.history
    return {
        "train_loss": float(history[-1]["train_loss"]) if history else float("nan"),
        "num_examples": data.num_train,
        "epochs": len(history),
        "wall_seconds": wall,
        "images_per_second": timer.images_per_second,
        "history": history,
    }


__all__ = [
    "LoaderHook",
    "ThroughputTimer",
    "check_fit_settings",
    "fit_local",
    "make_trainer",
    "model_num_classes",
    "quiet_lightning",
]
