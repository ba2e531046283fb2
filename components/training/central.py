"""Central training: `train_classifier` (the one training loop plus validation, early stopping
and the best checkpoint) and `train_central`, the pipeline's central training step assembled
from the run config (architecture, preprocessing, augmentation, DP-SGD with Opacus).
The federated counterpart is `components.federated.engines.run_federated`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from components.data.preprocess import Preprocessing
from components.errors import ConfigError, ModelError
from components.training.assembly import (
    architecture_from_config,
    augmentation_from_config,
    fit_settings_from_config,
    preprocessing_from_config,
)
from components.training.datamodule import Arrays, Augmentation
from components.training.loop import (
    LoaderHook,
    ThroughputTimer,
    check_fit_settings,
    make_trainer,
    quiet_lightning,
    seeded_data_and_module,
)
from components.training.module import OptimizerHook
from components.training.progress import TrainingProgress
from components.training.selection import SelectionRule, select_epoch

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Outcome of `train_classifier`; `model` holds the best weights, in eval mode."""

    model: nn.Module
    history: list[dict[str, float]]
    best_epoch: int
    best_checkpoint: Path
    epochs_run: int
    wall_seconds: float
    images_per_second: float
    best_score: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)  # `Selection.to_dict()`

    def summary(self) -> dict[str, Any]:
        """JSON-safe summary (no model)."""
        return {
            "best_epoch": self.best_epoch,
            "best_score": self.best_score,
            "epochs_run": self.epochs_run,
            "wall_seconds": self.wall_seconds,
            "images_per_second": self.images_per_second,
            "best_checkpoint": str(self.best_checkpoint),
            "selection": self.selection,
            "history": self.history,
        }


def train_classifier(
    model: nn.Module,
    train: Arrays,
    val: Arrays,
    preprocessing: Preprocessing,
    *,
    max_epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    early_stopping_patience: int,
    imbalance: str,
    augment: bool | Augmentation,
    seed: int,
    out_dir: Path,
    deterministic: bool = True,
    num_workers: int = 0,
    accelerator: str = "auto",
    optimizer_hook: OptimizerHook | None = None,
    loader_hook: LoaderHook | None = None,
    progress_interval_s: float | None = 30.0,
    selection: SelectionRule | None = None,
    warmup_epochs: float = 0.0,
) -> TrainResult:
    """Train `model` on `train` and keep the epoch `selection` chooses (default: the schema's
    `trainer` rule, the best validation macro-F1, later epoch on a tie).

    Early stopping watches the rule's monitor (its mode, `early_stopping_patience` epochs
    without improvement); every epoch is checkpointed under `out_dir/checkpoints`, the chosen
    one (`selection.select_epoch` on the history) is restored into `model` and returned in
    eval mode, the others are deleted. Per-epoch metrics go to `history` and to
    `out_dir/metrics.csv`. Progress is logged at INFO (`TrainingProgress`: one line per epoch,
    one every `progress_interval_s` within a long epoch). `optimizer_hook` and `loader_hook` are
    extension points (e.g. DP-SGD): see `fit_local`.
    """
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    check_fit_settings(max_epochs, batch_size, lr)
    if early_stopping_patience < 1:
        raise ConfigError("early_stopping_patience must be at least 1")
    if not 0.0 <= warmup_epochs < max_epochs:
        raise ConfigError(
            f"trainer.warmup_epochs must lie in [0, max_epochs={max_epochs}), got {warmup_epochs}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data, module = seeded_data_and_module(
        model,
        train,
        val,
        preprocessing,
        seed=seed,
        batch_size=batch_size,
        imbalance=imbalance,
        augment=augment,
        num_workers=num_workers,
        lr=lr,
        weight_decay=weight_decay,
        max_epochs=max_epochs,
        optimizer_hook=optimizer_hook,
        warmup_epochs=warmup_epochs,
    )
    rule = selection or SelectionRule.schema_default()
    checkpoint = ModelCheckpoint(
        dirpath=out_dir / "checkpoints",
        filename="epoch-{epoch:03d}",
        auto_insert_metric_name=False,
        monitor=None,
        save_top_k=-1,
        save_weights_only=True,
        enable_version_counter=False,
    )
    stopper = EarlyStopping(monitor=rule.monitor, mode=rule.mode, patience=early_stopping_patience)
    timer = ThroughputTimer()
    log.info(
        "training on %d images (validation %d), up to %d epochs of %d batches",
        data.num_train,
        len(val[1]),
        max_epochs,
        -(-data.num_train // batch_size),
    )
    start = time.perf_counter()
    with quiet_lightning():
        trainer = make_trainer(
            out_dir=out_dir,
            max_epochs=max_epochs,
            callbacks=[
                checkpoint,
                stopper,
                timer,
                TrainingProgress(
                    interval_s=progress_interval_s, monitor=rule.monitor, mode=rule.mode
                ),
            ],
            deterministic=deterministic,
            accelerator=accelerator,
            validate=True,
            checkpointing=True,
            logger=CSVLogger(out_dir, name="", version=""),
            steps_per_epoch=-(-data.num_train // batch_size),
        )
        train_loader = data.train_dataloader()
        if loader_hook is not None:
            train_loader = loader_hook(train_loader)
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=data.val_dataloader())
    wall = time.perf_counter() - start

    history = module.history
    if not history:
        raise ModelError("training produced no checkpoint (no validation epoch completed)")
    chosen = select_epoch(history, rule)
    checkpoints = out_dir / "checkpoints"
    best_path = checkpoints / f"epoch-{chosen.epoch:03d}.ckpt"
    if not best_path.exists():
        raise ModelError(f"no checkpoint for the selected epoch {chosen.epoch} in {checkpoints}")
    for other in checkpoints.glob("epoch-*.ckpt"):
        if other != best_path:
            other.unlink()
    state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    model = module.model.cpu().eval()
    best_epoch, best_score = chosen.epoch, chosen.score
    log.info(
        "trained %d epochs in %.1fs; kept %s (epochs counted from 0)",
        len(history),
        wall,
        chosen.reason,
    )
    return TrainResult(
        model=model,
        history=history,
        best_epoch=best_epoch,
        best_checkpoint=best_path,
        epochs_run=len(history),
        wall_seconds=wall,
        images_per_second=timer.images_per_second,
        best_score=best_score,
        selection=chosen.to_dict(),
    )


@dataclass
class CentralResult:
    """What central training returns to the pipeline (cf. `FederatedResult`)."""

    training: TrainResult
    architecture: dict[str, Any]  # `build_model` kwargs
    privacy: dict[str, Any] | None = None  # DP-SGD report (ε, δ, σ, steps...) and `mode`

    @property
    def model(self) -> nn.Module:
        return self.training.model

    @property
    def history(self) -> list[dict[str, float]]:
        return self.training.history

    @property
    def epochs_run(self) -> int:
        return self.training.epochs_run


def train_central(
    cfg: Mapping[str, Any],
    arrays: Mapping[str, Any],
    out_dir: Path,
    architecture: dict[str, Any] | None = None,
) -> CentralResult:
    """The central training step of the pipeline: build the model the config describes (or
    `architecture`, e.g. a fusion run's image-only baseline) and train it on
    `arrays["train"]`, selecting on `arrays["val"]` (`SplitArrays`), with DP-SGD when
    `privacy` asks for it (the model then uses GroupNorm). A model that reads clinical records
    gets the splits' schema and its imputation and scaling statistics from the training
    records. Writes under `out_dir`."""
    from components.privacy.settings import validate_privacy

    tr = cfg["trainer"]
    privacy = validate_privacy(cfg["privacy"], None, tr)
    if architecture is None:
        architecture = architecture_from_config(cfg, privacy=privacy)
    train, val = arrays["train"], arrays["val"]
    L.seed_everything(cfg["seed"], workers=True, verbose=False)  # the initial weights too
    model = build_clinical_aware(architecture, train, from_schema=privacy.mode != "none")
    dp = None
    if privacy.dp_sgd:
        model, dp = _dp_sgd(model, privacy, len(train.y), tr)
    hooks = {"optimizer_hook": dp.optimizer_hook, "loader_hook": dp.loader_hook} if dp else {}
    try:
        result = train_classifier(
            model,
            (_inputs(train, architecture), train.y),
            (_inputs(val, architecture), val.y),
            preprocessing_from_config(cfg),
            max_epochs=tr["max_epochs"],
            warmup_epochs=tr["warmup_epochs"],
            early_stopping_patience=tr["early_stopping_patience"],
            augment=augmentation_from_config(cfg),
            seed=cfg["seed"],
            out_dir=out_dir,
            num_workers=tr["num_workers"],
            selection=SelectionRule.from_config(tr),
            **fit_settings_from_config(cfg),
            **hooks,
        )
    finally:
        if dp:
            dp.close()
    report = dp.report() | {"mode": privacy.mode} if dp else None
    return CentralResult(training=result, architecture=architecture, privacy=report)


def build_clinical_aware(
    architecture: Mapping[str, Any], train: Any, *, from_schema: bool = False
) -> nn.Module:
    """`build_model(**architecture)`; for a model reading clinical records, with the split's
    schema and its imputation and scaling statistics fitted on the split's (training) records,
    or, `from_schema` (private runs: they would be released un-noised), on the schema alone."""
    from components.data.inputs import CLINICAL, input_kinds
    from components.models import build_model

    if CLINICAL not in input_kinds(architecture["name"]):
        return build_model(**architecture)
    if train.clinical is None or not train.schema:
        raise ConfigError(
            f"model {architecture['name']!r} reads clinical records, but dataset "
            f"{'has no clinical table' if not train.schema else 'records are missing'}: use a "
            "dataset with `clinical.features` (e.g. dataset=pad_ufes_20) or an image model"
        )
    model = build_model(**architecture, tabular_schema=train.schema)
    if from_schema:
        model.fit_normalisation_from_schema(train.schema)
    else:
        model.fit_normalisation(torch.from_numpy(train.clinical))
    return model


def _inputs(split: Any, architecture: Mapping[str, Any]):
    """What the data module feeds the model: the image array alone, or a tuple of arrays."""
    parts = split.inputs(architecture["name"])
    return parts[0] if len(parts) == 1 else parts


def _dp_sgd(model: nn.Module, privacy: Any, num_examples: int, trainer: Mapping[str, Any]):
    """Make `model` Opacus-compatible and plan σ over the whole training (all epochs)."""
    from components.privacy.dp import DPSGD, PrivacyLedger, make_private_compatible, plan_noise

    model, _ = make_private_compatible(model)
    sigma, _, _ = plan_noise(
        privacy,
        num_examples=num_examples,
        batch_size=trainer["batch_size"],
        epochs_total=trainer["max_epochs"],
    )
    ledger = PrivacyLedger(privacy.accountant, privacy.delta, privacy.epsilon)
    dp = DPSGD(
        sigma,
        privacy.max_grad_norm,
        ledger,
        grad_sample_mode=privacy.grad_sample_mode,
        secure_mode=privacy.secure_mode,
    )
    return model, dp


__all__ = ["CentralResult", "TrainResult", "train_central", "train_classifier"]
