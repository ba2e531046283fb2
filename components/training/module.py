"""`ClassifierModule`: the one LightningModule training every classifier, central or per site."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score

OptimizerHook = Callable[["ClassifierModule", torch.optim.Optimizer], torch.optim.Optimizer]


class ClassifierModule(L.LightningModule):
    """Cross-entropy (optionally class-weighted) with AdamW and a per-epoch cosine schedule.

    Logs `train_loss` (task loss) per epoch and, when a validation loader is given, `val_loss`,
    `val_acc`, `val_macro_f1` and `val_auroc` (macro one-vs-rest; NaN when a class is
    absent). With `proximal_mu > 0` the FedProx term mu/2 · ||w - w_global||² is added to the
    training objective (logged as `train_proximal`), where `global_params` are the trainable
    parameters of the round's global model (by default a snapshot of the model's own
    parameters when the module is built).

    `optimizer_hook(module, optimizer) -> optimizer` is an extension point (e.g. for Opacus'
    `make_private`): it receives the AdamW optimiser before the schedule is attached and
    returns the one to use.

    `history` holds one dict per completed training epoch (epoch, train_loss and val metrics).
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        max_epochs: int = 10,
        warmup_epochs: float = 0.0,
        class_weights: torch.Tensor | None = None,
        proximal_mu: float = 0.0,
        global_params: Iterable[torch.Tensor] | None = None,
        optimizer_hook: OptimizerHook | None = None,
    ) -> None:
        super().__init__()
        if proximal_mu < 0:
            raise ValueError("proximal_mu must be non-negative")
        self.model = model
        self.num_classes = num_classes
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max(1, int(max_epochs))
        self.warmup_epochs = float(warmup_epochs)
        self.proximal_mu = float(proximal_mu)
        self.optimizer_hook = optimizer_hook
        if class_weights is not None:
            class_weights = torch.as_tensor(class_weights, dtype=torch.float32)
            if class_weights.shape != (num_classes,):
                raise ValueError(f"class_weights must have shape ({num_classes},)")
        self.register_buffer("class_weights", class_weights, persistent=False)
        self._global: list[torch.Tensor] | None = None
        if self.proximal_mu > 0:
            trainable = [p for p in model.parameters() if p.requires_grad]
            source = list(global_params) if global_params is not None else trainable
            if len(source) != len(trainable):
                raise ValueError("global_params must match the model's trainable parameters")
            self._global = [g.detach().clone() for g in source]
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_f1 = MulticlassF1Score(num_classes=num_classes, average="macro")
        self.val_auroc = MulticlassAUROC(num_classes=num_classes, average="macro")
        self.history: list[dict[str, float]] = []
        self._train_sum: torch.Tensor | float = 0.0
        self._prox_sum: torch.Tensor | float = 0.0
        self._train_count = 0
        self._val_sum: torch.Tensor | float = 0.0
        self._val_count: torch.Tensor | float = 0
        self._last_val: dict[str, float] = {}

    def forward(self, x: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Logits; `x` is one input tensor or the tuple of the model's inputs (image, record)."""
        return self.model(*x) if isinstance(x, tuple | list) else self.model(x)

    def _proximal(self) -> torch.Tensor:
        assert self._global is not None
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        total = torch.zeros((), device=self.device)
        for param, ref in zip(trainable, self._global, strict=True):
            total = total + (param - ref.to(param.device)).pow(2).sum()
        return 0.5 * self.proximal_mu * total

    def on_train_epoch_start(self) -> None:
        self._train_sum, self._train_count, self._prox_sum = 0.0, 0, 0.0

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, weight=self.class_weights)
        self._train_sum = self._train_sum + loss.detach() * len(y)
        self._train_count += len(y)
        if self._global is not None:
            prox = self._proximal()
            self._prox_sum = self._prox_sum + prox.detach() * len(y)
            loss = loss + prox
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sum, self._val_count = 0.0, 0
        self.val_acc.reset()
        self.val_f1.reset()
        self.val_auroc.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, weight=self.class_weights, reduction="sum")
        self._val_sum = self._val_sum + loss.detach()
        if self.class_weights is None:
            self._val_count = self._val_count + len(y)
        else:
            self._val_count = self._val_count + self.class_weights[y].sum()
        preds = logits.argmax(dim=1)
        self.val_acc.update(preds, y)
        self.val_f1.update(preds, y)
        self.val_auroc.update(logits.float().softmax(dim=1), y)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not float(self._val_count):
            return
        metrics = {
            "val_loss": float(self._val_sum) / float(self._val_count),
            "val_acc": float(self.val_acc.compute()),
            "val_macro_f1": float(self.val_f1.compute()),
            "val_auroc": self._auroc(),
        }
        self._last_val = metrics
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name != "val_loss")

    def _auroc(self) -> float:
        """Macro AUROC, NaN when a class has no positive or no negative example."""
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchmetrics warns about an absent class
            value = float(self.val_auroc.compute())
        return value if math.isfinite(value) else math.nan

    def on_train_epoch_end(self) -> None:
        row: dict[str, float] = {"epoch": int(self.current_epoch)}
        count = self._train_count
        row["train_loss"] = float(self._train_sum) / count if count else math.nan
        if self._global is not None:
            row["train_proximal"] = float(self._prox_sum) / count if count else math.nan
        for name in ("train_loss", "train_proximal"):
            if name in row:
                self.log(name, row[name])
        row.update(self._last_val)
        self._last_val = {}
        self.history.append(row)

    def configure_optimizers(self):
        inner = getattr(self.model, "_module", self.model)  # through Opacus' wrapper
        if hasattr(inner, "parameter_groups"):
            params = inner.parameter_groups(self.lr)
        else:
            params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer_hook is not None:
            optimizer = self.optimizer_hook(self, optimizer)
        if self.warmup_epochs:
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": self._warmup_cosine(optimizer), "interval": "step"},
            }
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.max_epochs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    def _warmup_cosine(self, optimizer):
        """Per step: the rate rises linearly over `warmup_epochs`, then decays as a cosine to
        zero at the last step of `max_epochs`."""
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warm = max(1, round(total * self.warmup_epochs / self.max_epochs))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
