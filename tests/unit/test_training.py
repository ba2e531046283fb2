"""The training loop on a tiny synthetic task: learning, early stopping, seeding, imbalance,
local (federated) fits with the FedProx term."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch

from components.data.preprocess import Preprocessing
from components.errors import ConfigError, DataError
from components.evaluation.predict import predict_proba
from components.models import build_model
from components.training.central import train_classifier
from components.training.datamodule import (
    ArrayDataModule,
    Augmentation,
    inverse_frequency_weights,
)
from components.training.loop import fit_local

SIZE = 32
PREP = Preprocessing(size=SIZE, channels=3)
NO_FLIP = Augmentation(hflip=False)  # the label is the side of the square: never flip


def square_task(n: int, seed: int, p_right: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Noise with a bright 8×8 square in the left (class 0) or right (class 1) half."""
    rng = np.random.default_rng(seed)
    x = rng.normal(60, 20, size=(n, 3, SIZE, SIZE)).clip(0, 255).astype(np.uint8)
    y = (rng.random(n) < p_right).astype(np.int64)
    for i in range(n):
        top = rng.integers(0, SIZE - 8)
        left = rng.integers(0, SIZE // 2 - 8) + (SIZE // 2 if y[i] else 0)
        x[i, :, top : top + 8, left : left + 8] = 230
    return x, y


def _model(norm: str = "batch", seed: int = 0):
    torch.manual_seed(seed)
    return build_model("small_cnn", num_classes=2, width=8, norm=norm)


def _train(model, tmp_path, train, val, **overrides):
    settings = {
        "max_epochs": 4,
        "batch_size": 16,
        "lr": 3e-3,
        "weight_decay": 1e-4,
        "early_stopping_patience": 3,
        "imbalance": "none",
        "augment": False,
        "seed": 7,
        "out_dir": tmp_path / "run",
    } | overrides
    return train_classifier(model, train, val, PREP, **settings)


def test_learns_the_tiny_task_and_restores_best_weights(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    train, val = square_task(128, seed=1), square_task(48, seed=2)
    result = _train(_model(), tmp_path, train, val, max_epochs=6)

    assert result.epochs_run == len(result.history) <= 6
    assert {"train_loss", "val_loss", "val_acc", "val_macro_f1"} <= set(result.history[0])
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    best = result.history[result.best_epoch]
    assert best["val_macro_f1"] == max(row["val_macro_f1"] for row in result.history)
    assert best["val_acc"] >= 0.9

    # the returned model carries the best epoch's weights, in eval mode
    assert not result.model.training
    probs = predict_proba(result.model, val[0], PREP)
    accuracy = float((probs.argmax(1) == val[1]).mean())
    assert accuracy == pytest.approx(best["val_acc"], abs=1e-6)

    assert result.best_checkpoint.is_file()
    assert result.best_checkpoint.is_relative_to(tmp_path / "run")
    assert (tmp_path / "run" / "metrics.csv").is_file()
    assert result.images_per_second > 0 and result.wall_seconds > 0
    assert list(cwd.iterdir()) == []  # nothing written to the working directory


def test_early_stopping_stops_when_the_metric_plateaus(tmp_path):
    # GroupNorm has no running statistics and lr is negligible: the metric cannot move
    train, val = square_task(32, seed=3), square_task(16, seed=4)
    result = _train(
        _model(norm="group"),
        tmp_path,
        train,
        val,
        max_epochs=10,
        lr=1e-12,
        early_stopping_patience=2,
    )
    assert result.epochs_run == 3 < 10
    assert result.best_epoch == 2  # every epoch ties: the default tie-break keeps the later
    assert result.selection["tied"] == [0, 1, 2]
    assert len({row["val_macro_f1"] for row in result.history}) == 1


def test_selection_rule_last_keeps_the_last_epoch_and_only_its_checkpoint(tmp_path):
    from components.training.selection import SelectionRule

    train, val = square_task(32, seed=3), square_task(16, seed=4)
    rule = SelectionRule("last", "val_loss", "auto", 0.0, "later")
    result = _train(_model(), tmp_path, train, val, max_epochs=3, selection=rule)
    assert result.best_epoch == result.epochs_run - 1 == 2
    assert result.selection["reason"].startswith("last epoch")
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["epoch-002.ckpt"]
    assert "val_auroc" in result.history[0]


def test_same_seed_gives_identical_runs(tmp_path):
    train, val = square_task(48, seed=5), square_task(16, seed=6)
    runs = [
        _train(
            _model(seed=3),
            tmp_path / str(i),
            train,
            val,
            max_epochs=2,
            augment=NO_FLIP,
            imbalance="weighted_sampler",
            out_dir=tmp_path / str(i) / "run",
        )
        for i in range(2)
    ]
    assert runs[0].history == runs[1].history
    for (k0, v0), (k1, v1) in zip(
        runs[0].model.state_dict().items(), runs[1].model.state_dict().items(), strict=True
    ):
        assert k0 == k1 and torch.equal(v0, v1), k0


def test_inverse_frequency_weights():
    y = np.array([0, 0, 0, 1])
    # n / (K · n_c): 4 / (3 · 3), 4 / (3 · 1), absent class -> 0
    np.testing.assert_allclose(inverse_frequency_weights(y, 3), [4 / 9, 4 / 3, 0.0])


def test_imbalance_options(tmp_path):
    x, y = square_task(100, seed=8, p_right=0.1)
    counts = np.bincount(y, minlength=2)

    loss_dm = ArrayDataModule((x, y), None, PREP, num_classes=2, imbalance="weighted_loss")
    expected = len(y) / (2 * counts)
    np.testing.assert_allclose(loss_dm.class_weights.numpy(), expected, rtol=1e-6)
    assert ArrayDataModule((x, y), None, PREP, num_classes=2).class_weights is None

    sampler_dm = ArrayDataModule(
        (x, y), None, PREP, num_classes=2, imbalance="weighted_sampler", batch_size=50, seed=1
    )
    np.testing.assert_allclose(sampler_dm.sample_weights(), 1.0 / counts[y])
    drawn = np.concatenate(
        [labels.numpy() for _ in range(10) for _, labels in sampler_dm.train_dataloader()]
    )
    assert len(drawn) == 10 * len(y)
    assert 0.4 < drawn.mean() < 0.6  # minority class drawn about as often as the majority

    # both paths train end to end
    val = square_task(20, seed=9)
    for mode in ("weighted_loss", "weighted_sampler"):
        result = _train(
            _model(),
            tmp_path / mode,
            (x, y),
            val,
            max_epochs=1,
            imbalance=mode,
            out_dir=tmp_path / mode,
        )
        assert result.epochs_run == 1


def test_augmented_batches_are_normalised_and_vary():
    x, y = square_task(8, seed=10)
    dm = ArrayDataModule((x, y), None, PREP, num_classes=2, augment=True, batch_size=8, seed=0)
    first = next(iter(dm.train_dataloader()))
    second = next(iter(dm.train_dataloader()))
    assert first[0].dtype == torch.float32 and first[0].shape == (8, 3, SIZE, SIZE)
    assert first[0].min() < 0 < first[0].max()
    assert torch.equal(first[1], second[1])  # same seeded order ...
    assert not torch.equal(first[0], second[0])  # ... different random augmentation
    plain = ArrayDataModule((x, y), None, PREP, num_classes=2, augment=False, batch_size=8)
    a, b = next(iter(plain.train_dataloader())), next(iter(plain.train_dataloader()))
    assert torch.equal(a[0], b[0])


@pytest.mark.parametrize(
    ("train", "error"),
    [
        ((np.zeros((4, 3, SIZE, SIZE), np.float32), np.zeros(4, np.int64)), DataError),
        ((np.zeros((4, 1, SIZE, SIZE), np.uint8), np.zeros(4, np.int64)), DataError),
        ((np.zeros((4, 3, SIZE, SIZE), np.uint8), np.array([0, 1, 2, 0])), DataError),
        ((np.zeros((4, 3, SIZE, SIZE), np.uint8), np.zeros(3, np.int64)), DataError),
    ],
)
def test_bad_training_data_is_refused(train, error):
    with pytest.raises(error):
        ArrayDataModule(train, None, PREP, num_classes=2)


def test_bad_settings_are_refused(tmp_path):
    data = square_task(8, seed=11)
    with pytest.raises(ConfigError):
        ArrayDataModule(data, None, PREP, num_classes=2, imbalance="oversample")
    with pytest.raises(ConfigError):
        _train(_model(), tmp_path, data, data, max_epochs=0)
    with pytest.raises(ConfigError, match="warmup_epochs"):
        _train(_model(), tmp_path, data, data, max_epochs=2, warmup_epochs=2)


def test_warm_up_rises_step_by_step_then_the_cosine_decays_to_zero():
    from types import SimpleNamespace

    from components.training.module import ClassifierModule

    module = ClassifierModule(_model(), 2, lr=0.01, max_epochs=4, warmup_epochs=1)
    module._trainer = SimpleNamespace(estimated_stepping_batches=40)  # 10 steps an epoch
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    rates = []
    for _ in range(40):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.001) and rates[9] == pytest.approx(0.01)
    assert all(a < b for a, b in pairwise(rates[:10]))
    assert all(a >= b for a, b in pairwise(rates[9:]))
    assert rates[-1] < 0.0002
    plain = ClassifierModule(_model(), 2, lr=0.01, max_epochs=4).configure_optimizers()
    assert plain["lr_scheduler"]["interval"] == "epoch"  # no warm-up: as before


def _distance(model, reference):
    return sum(
        float((p.detach() - r).pow(2).sum())
        for p, r in zip(model.parameters(), reference, strict=True)
    )


def test_fit_local_trains_in_place_and_fedprox_pulls_to_global(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = square_task(48, seed=12)
    distances = {}
    for mu in (0.0, 10.0):
        model = _model(seed=4)
        start = [p.detach().clone() for p in model.parameters()]
        metrics = fit_local(
            model, train, PREP, epochs=2, batch_size=16, lr=3e-3, seed=1, proximal_mu=mu
        )
        assert metrics["num_examples"] == 48 and metrics["epochs"] == 2
        assert np.isfinite(metrics["train_loss"]) and metrics["images_per_second"] > 0
        distances[mu] = _distance(model, start)
    assert distances[0.0] > 0
    assert distances[10.0] < distances[0.0]
    assert list(tmp_path.iterdir()) == []  # a local fit writes nothing


def test_fit_local_accepts_explicit_global_params():
    train = square_task(16, seed=13)
    model = _model(seed=5)
    global_params = [torch.zeros_like(p) for p in model.parameters()]
    metrics = fit_local(
        model,
        train,
        PREP,
        epochs=1,
        batch_size=8,
        lr=1e-3,
        seed=0,
        proximal_mu=0.1,
        global_params=global_params,
    )
    assert metrics["epochs"] == 1
    with pytest.raises(ValueError):
        fit_local(
            model,
            train,
            PREP,
            epochs=1,
            batch_size=8,
            lr=1e-3,
            proximal_mu=0.1,
            global_params=global_params[:-1],
        )


def test_fit_local_extension_points_are_used():
    import lightning as L
    from torch.utils.data import DataLoader

    class BatchCounter(L.Callback):
        batches = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            BatchCounter.batches += 1

    seen = {}

    def optimizer_hook(module, optimizer):
        seen["optimizer"] = type(optimizer).__name__
        seen["module"] = type(module).__name__
        return optimizer

    def loader_hook(loader):
        return DataLoader(loader.dataset, batch_size=4, collate_fn=loader.collate_fn)

    fit_local(
        _model(),
        square_task(16, seed=14),
        PREP,
        epochs=1,
        batch_size=16,
        lr=1e-3,
        callbacks=[BatchCounter()],
        optimizer_hook=optimizer_hook,
        loader_hook=loader_hook,
    )
    assert seen == {"optimizer": "AdamW", "module": "ClassifierModule"}
    assert BatchCounter.batches == 4  # 16 images in batches of 4 from the hook's loader


# ----------------------------------------------------------------------------- from the config


def _config(*overrides: str) -> dict:
    from components.config import compose, to_container

    tiny = ["dataset=synthetic", "model=small_cnn", "model.width=4", "trainer.batch_size=16"]
    return to_container(compose([*tiny, *overrides]))


def test_architecture_from_config_uses_groupnorm_whenever_privacy_needs_it():
    from components.privacy.settings import validate_privacy
    from components.training.assembly import architecture_from_config

    cfg = _config()
    plain = architecture_from_config(cfg)
    assert plain == {
        "name": "small_cnn",
        "num_classes": 3,
        "in_channels": 3,
        "norm": "batch",
        "pretrained": False,
        "small_input": True,
        "width": 4,
    }
    dp_cfg = _config("privacy=dp_eps8", "trainer.imbalance=none")
    dp = validate_privacy(dp_cfg["privacy"], None, dp_cfg["trainer"])
    assert architecture_from_config(dp_cfg, privacy=dp)["norm"] == "group"
    assert architecture_from_config(cfg, 5)["num_classes"] == 5


def test_preprocessing_and_augmentation_follow_the_dataset():
    from components.training.assembly import augmentation_from_config, preprocessing_from_config

    cfg = _config("dataset.image_size=48")
    assert preprocessing_from_config(cfg).size == 48
    assert augmentation_from_config(cfg) == Augmentation(hflip=False)  # synthetic: no flips
    assert augmentation_from_config(_config("trainer.augment=false")) is False


def test_augmentation_strengths_come_from_the_trainer_section():
    from components.training.assembly import augmentation_from_config

    cfg = _config("trainer.crop_scale=0.6", "trainer.gamma=0.3", "trainer.blur=0.5")
    augmentation = augmentation_from_config(cfg)
    assert (augmentation.crop_scale, augmentation.gamma, augmentation.blur) == (0.6, 0.3, 0.5)
    torch.manual_seed(0)
    out = augmentation.build(32)(torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8  # the crop's output side
    with pytest.raises(ConfigError, match="image size"):
        Augmentation(crop_scale=0.5).build()
    with pytest.raises(ConfigError, match="crop_scale"):
        _config("trainer.crop_scale=0")


def test_random_gamma_moves_midtones_and_keeps_black_and_white():
    from components.training.datamodule import RandomGamma

    torch.manual_seed(0)
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 3)
    outs = [RandomGamma(0.5)(x).flatten().tolist() for _ in range(20)]
    assert all(o[0] == 0 and o[2] == 255 for o in outs)
    assert min(o[1] for o in outs) < 120 and max(o[1] for o in outs) > 136


def test_train_central_trains_the_configured_model(tmp_path):
    from components.data.cache import SplitArrays
    from components.training.central import train_central

    def split(n: int, seed: int) -> SplitArrays:
        x, y = square_task(n, seed)
        return SplitArrays(x=x, y=y, ids=[str(i) for i in range(n)])

    cfg = _config("trainer.max_epochs=2", "trainer.augment=false")
    result = train_central(cfg, {"train": split(48, 0), "val": split(24, 1)}, tmp_path)
    assert result.architecture["width"] == 4 and result.architecture["num_classes"] == 3
    assert result.model.num_classes == 3 and not result.model.training
    assert result.epochs_run == len(result.history) == 2
    assert result.privacy is None
    assert (tmp_path / "metrics.csv").is_file()
