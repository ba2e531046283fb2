"""`TrainingProgress`: a Lightning callback that reports training progress through `logging`.

One line per epoch (epoch k/N, training loss, validation metrics, epoch time, elapsed time, time
left, best epoch so far) and, for long epochs, a throttled line inside the epoch (batch i/n,
running loss, time left in the epoch). Only numbers are logged: no file names, no images, no
identifiers. Every record also carries the figures as `record.progress` (a dict), for tools and
tests that would rather not parse text.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch

log = logging.getLogger(__name__)

# validation metrics shown when logged, in this order, with their display names
VAL_METRICS = (("val_macro_f1", "val macro-F1"), ("val_acc", "val acc"), ("val_loss", "val loss"))


def format_duration(seconds: float) -> str:
    """`42s`, `3m05s`, `1h02m`: short and readable in a log line."""
    if not math.isfinite(seconds):
        return "?"
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _batch_loss(outputs: Any) -> torch.Tensor | None:
    """The training objective of one batch from `training_step`'s output (tensor or dict)."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    return loss.detach().float() if isinstance(loss, torch.Tensor) else None


def _batch_size(batch: Any) -> int:
    try:
        return len(batch[1])
    except (TypeError, IndexError):
        return 1


class TrainingProgress(L.Callback):
    """Log training progress: one line per epoch, plus one every `interval_s` within an epoch.

    `label` prefixes every line (e.g. a site name). `monitor`/`mode` say which validation
    metric decides the best epoch (none: no best-epoch note). `interval_s=None` turns the
    in-epoch lines off. The time left is the mean epoch time so far times the epochs still
    allowed (early stopping may end sooner). `clock` is injectable for tests.
    """

    def __init__(
        self,
        *,
        label: str | None = None,
        level: int = logging.INFO,
        interval_s: float | None = 30.0,
        monitor: str | None = "val_macro_f1",
        mode: str = "max",
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError("mode must be 'max' or 'min'")
        self.prefix = f"[{label}] " if label else ""
        self.level = level
        self.interval_s = interval_s
        self.monitor = monitor
        self.mode = mode
        self.logger = logger or log
        self.clock = clock
        self.best: tuple[int, float] | None = None  # (1-based epoch, score)
        self.epochs_done = 0
        self._fit_start = 0.0
        self._epoch_start = 0.0
        self._last_note = 0.0
        self._loss_sum: torch.Tensor | float = 0.0
        self._seen = 0

    def _emit(self, message: str, figures: dict[str, Any]) -> None:
        if self.logger.isEnabledFor(self.level):
            self.logger.log(self.level, self.prefix + message, extra={"progress": figures})

    def on_train_start(self, trainer, pl_module) -> None:
        self._fit_start = self.clock()
        self.best, self.epochs_done = None, 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = self._last_note = self.clock()
        self._loss_sum, self._seen = 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss, size = _batch_loss(outputs), _batch_size(batch)
        if loss is not None and size:
            self._loss_sum = self._loss_sum + loss * size
            self._seen += size
        if self.interval_s is None:
            return
        now = self.clock()
        if now - self._last_note < self.interval_s:
            return
        self._last_note = now
        done, total = batch_idx + 1, trainer.num_training_batches
        spent = now - self._epoch_start
        left = spent / done * (total - done) if math.isfinite(total) else math.nan
        loss_now = self._mean_loss()
        total_text = str(int(total)) if math.isfinite(total) else "?"
        self._emit(
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} batch {done}/{total_text}: "
            f"loss {loss_now:.4f}, epoch time left {format_duration(left)}",
            {
                "epoch": trainer.current_epoch + 1,
                "batch": done,
                "batches": total,
                "loss": loss_now,
                "epoch_eta_s": left,
            },
        )

    def _mean_loss(self) -> float:
        return float(self._loss_sum) / self._seen if self._seen else math.nan

    def _update_best(self, epoch: int, metrics: Mapping[str, float]) -> None:
        if self.monitor is None or self.monitor not in metrics:
            return
        score = float(metrics[self.monitor])
        best = self.best[1] if self.best is not None else None
        if best is None or (score > best if self.mode == "max" else score < best):
            self.best = (epoch, score)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        now = self.clock()
        epoch, total = trainer.current_epoch + 1, trainer.max_epochs
        self.epochs_done = epoch
        elapsed, epoch_s = now - self._fit_start, now - self._epoch_start
        eta = elapsed / epoch * max(0, total - epoch)
        metrics = {
            name: float(trainer.callback_metrics[name])
            for name, _ in VAL_METRICS
            if name in trainer.callback_metrics
        }
        self._update_best(epoch, metrics)
        loss = self._mean_loss()
        parts = [f"train loss {loss:.4f}"]
        parts += [f"{shown} {metrics[name]:.4f}" for name, shown in VAL_METRICS if name in metrics]
        if self.best is not None:
            shown = dict(VAL_METRICS).get(self.monitor, self.monitor)
            parts.append(f"best epoch {self.best[0]} ({shown} {self.best[1]:.4f})")
        self._emit(
            f"epoch {epoch}/{total}: {', '.join(parts)} | {format_duration(epoch_s)}/epoch, "
            f"elapsed {format_duration(elapsed)}, time left {format_duration(eta)}",
            {
                "epoch": epoch,
                "epochs": total,
                "train_loss": loss,
                **metrics,
                "epoch_s": epoch_s,
                "elapsed_s": elapsed,
                "eta_s": eta,
                "best_epoch": self.best[0] if self.best else None,
            },
        )

    def on_train_end(self, trainer, pl_module) -> None:
        total = trainer.max_epochs
        if self.epochs_done and self.epochs_done < total:
            elapsed = self.clock() - self._fit_start
            self._emit(
                f"stopped early after {self.epochs_done}/{total} epochs "
                f"(elapsed {format_duration(elapsed)}, time left 0s)",
                {"epoch": self.epochs_done, "epochs": total, "elapsed_s": elapsed, "eta_s": 0.0},
            )


__all__ = ["TrainingProgress", "format_duration"]
