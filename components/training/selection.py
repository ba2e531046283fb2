"""Which epoch's weights a training run keeps: the rule (`trainer.select`, `monitor`,
`monitor_mode`, `select_tolerance`, `tie_break`) and `select_epoch`, applied to the run's
per-epoch history after training (every epoch is checkpointed, so any rule can be honoured).

A plain "best validation score" rule is brittle: on chest X-ray it kept epoch 0 (macro-F1
0.9724 against 0.9720 later) while the validation loss halved afterwards. A tolerance makes
epochs within it of the best count as tied, and the tie-break chooses among them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from components.errors import ConfigError

MONITORS = ("val_macro_f1", "val_loss", "val_auroc", "val_acc")
TIE_BREAKS = ("later", "earlier", "lower_loss")


@dataclass(frozen=True)
class SelectionRule:
    """The `trainer` keys of the same names (defaults: `TrainerConf`, see `schema_default`)."""

    select: str  # best | last
    monitor: str  # one of MONITORS
    monitor_mode: str  # auto | max | min
    tolerance: float  # `select_tolerance`
    tie_break: str  # one of TIE_BREAKS

    def __post_init__(self) -> None:
        if self.select not in ("best", "last"):
            raise ConfigError(f"select must be 'best' or 'last', got {self.select!r}")
        if self.monitor not in MONITORS:
            raise ConfigError(f"monitor must be one of {list(MONITORS)}, got {self.monitor!r}")
        if self.monitor_mode not in ("auto", "max", "min"):
            raise ConfigError(f"monitor_mode must be auto, max or min, got {self.monitor_mode!r}")
        if self.tie_break not in TIE_BREAKS:
            raise ConfigError(f"tie_break must be one of {list(TIE_BREAKS)}")
        if not self.tolerance >= 0:
            raise ConfigError("select_tolerance must be >= 0")

    @classmethod
    def from_config(cls, trainer: Mapping[str, Any]) -> SelectionRule:
        """From the composed `trainer` section."""
        return cls(
            select=trainer["select"],
            monitor=trainer["monitor"],
            monitor_mode=trainer["monitor_mode"],
            tolerance=float(trainer["select_tolerance"]),
            tie_break=trainer["tie_break"],
        )

    @classmethod
    def schema_default(cls) -> SelectionRule:
        """The rule of a default `trainer` section (the schema's defaults)."""
        from components.config import TrainerConf

        return cls.from_config(asdict(TrainerConf()))

    @property
    def mode(self) -> str:
        """max or min: `auto` is min for the loss and max for the scores."""
        if self.monitor_mode != "auto":
            return self.monitor_mode
        return "min" if self.monitor == "val_loss" else "max"


@dataclass(frozen=True)
class Selection:
    """The chosen epoch (0-based, as in the history) and why, JSON-safe via `to_dict`."""

    epoch: int
    monitor: str
    score: float | None
    tied: tuple[int, ...]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"tied": list(self.tied)}


def _value(row: Mapping[str, Any], key: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def select_epoch(history: Sequence[Mapping[str, Any]], rule: SelectionRule) -> Selection:
    """The epoch `rule` keeps from `history` (rows with `epoch` and validation metrics)."""
    if not history:
        raise ValueError("no epochs to select from")
    last = history[-1]
    scored = [(int(row["epoch"]), _value(row, rule.monitor), row) for row in history]
    scored = [(epoch, score, row) for epoch, score, row in scored if score is not None]
    if rule.select == "last" or not scored:
        why = "trainer.select=last" if rule.select == "last" else f"no epoch has {rule.monitor}"
        epoch = int(last["epoch"])
        return Selection(
            epoch, rule.monitor, _value(last, rule.monitor), (epoch,), f"last epoch ({why})"
        )
    sign = 1.0 if rule.mode == "max" else -1.0
    best = max(sign * score for _, score, _ in scored)
    tied = [(e, s, r) for e, s, r in scored if sign * s >= best - rule.tolerance - 1e-12]
    if rule.tie_break == "earlier":
        epoch, score, _ = min(tied, key=lambda t: t[0])
    elif rule.tie_break == "lower_loss":
        epoch, score, _ = min(tied, key=lambda t: (_value(t[2], "val_loss") or math.inf, -t[0]))
    else:
        epoch, score, _ = max(tied, key=lambda t: t[0])
    best_value = sign * best
    within = f" (within {rule.tolerance:g})" if rule.tolerance else ""
    reason = f"best {rule.monitor} ({rule.mode}) {best_value:.4f}"
    if len(tied) > 1:
        epochs = ", ".join(str(e) for e, _, _ in tied)
        reason += f"; epochs tied{within}: {epochs}; tie-break {rule.tie_break}"
    reason = f"epoch {epoch} ({rule.monitor} {score:.4f}): {reason}"
    return Selection(epoch, rule.monitor, score, tuple(e for e, _, _ in tied), reason)


__all__ = ["MONITORS", "TIE_BREAKS", "Selection", "SelectionRule", "select_epoch"]
