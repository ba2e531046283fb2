"""Training progress in the logs: one line per epoch with loss, validation metric and time
left (reaching 0 at the end), throttled lines inside long epochs, quiet site-local fits."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from components.data.preprocess import Preprocessing
from components.models import build_model
from components.training.central import train_classifier
from components.training.loop import fit_local
from components.training.progress import TrainingProgress, format_duration

PREP = Preprocessing(size=16, channels=3)
PROGRESS = "components.training.progress"


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 255, size=(n, 3, 16, 16), dtype=np.uint8)
    y = rng.integers(0, 2, size=n).astype(np.int64)
    return x, y


def _model():
    torch.manual_seed(0)
    return build_model("small_cnn", num_classes=2, width=4)


def _progress_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == PROGRESS]


def test_central_fit_logs_one_line_per_epoch_with_loss_metric_and_time_left(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=PROGRESS)
    train_classifier(
        _model(),
        _data(48, 1),
        _data(16, 2),
        PREP,
        max_epochs=3,
        batch_size=16,
        lr=1e-3,
        weight_decay=0.0,
        early_stopping_patience=10,  # all three epochs run
        imbalance="none",
        augment=False,
        seed=0,
        out_dir=tmp_path / "run",
        progress_interval_s=None,
    )
    records = _progress_records(caplog)
    assert [r.progress["epoch"] for r in records] == [1, 2, 3]
    for record in records:
        figures = record.progress
        assert figures["epochs"] == 3
        assert math.isfinite(figures["train_loss"]) and figures["train_loss"] > 0
        assert 0.0 <= figures["val_macro_f1"] <= 1.0 and figures["val_loss"] > 0
        assert 1 <= figures["best_epoch"] <= figures["epoch"]
        message = record.getMessage()
        assert f"epoch {figures['epoch']}/3" in message
        assert "train loss" in message and "val macro-F1" in message and "time left" in message
    etas = [r.progress["eta_s"] for r in records]
    assert etas[-1] == 0.0 and all(eta > 0 for eta in etas[:-1])
    assert records[-1].getMessage().endswith("time left 0s")
    elapsed = [r.progress["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed)


def test_long_epochs_get_throttled_lines_inside_the_epoch(tmp_path, caplog):
    """A clock advancing 10 s per reading and a 25 s interval: a line every third batch."""
    caplog.set_level(logging.INFO, logger=PROGRESS)
    ticks = iter(range(0, 10_000, 10))
    progress = TrainingProgress(interval_s=25.0, monitor=None, clock=lambda: float(next(ticks)))
    fit_local(_model(), _data(64, 3), PREP, epochs=1, batch_size=8, lr=1e-3, callbacks=[progress])
    inner = [r.progress for r in _progress_records(caplog) if "batch" in r.progress]
    assert [f["batch"] for f in inner] == [3, 6]
    assert all(f["batches"] == 8 and f["epoch_eta_s"] > 0 and f["loss"] > 0 for f in inner)


def test_site_fit_logs_epochs_with_the_site_label_and_is_quiet_without_one(caplog):
    caplog.set_level(logging.INFO, logger=PROGRESS)
    fit_local(_model(), _data(32, 4), PREP, epochs=2, batch_size=16, lr=1e-3)
    assert _progress_records(caplog) == []  # unlabelled local fits log at DEBUG

    fit_local(
        _model(), _data(32, 4), PREP, epochs=2, batch_size=16, lr=1e-3, progress_label="site-a"
    )
    records = _progress_records(caplog)
    assert [r.progress["epoch"] for r in records] == [1, 2]  # no in-epoch lines
    assert all(r.getMessage().startswith("[site-a] epoch ") for r in records)
    assert all("val" not in r.getMessage() for r in records)


def test_format_duration():
    assert [format_duration(s) for s in (0, 4.6, 65, 3725)] == ["0s", "5s", "1m05s", "1h02m"]
    assert format_duration(math.nan) == "?"
