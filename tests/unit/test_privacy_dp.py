"""DP-SGD on the one training loop: accounting against Opacus, ledger, budget stop, model fixes."""

from __future__ import annotations

import json
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from components.errors import ConfigError, ModelError
from components.models import build_model
from components.privacy.dp import (
    DPSGD,
    PrivacyLedger,
    calibrate_noise,
    make_private_compatible,
    plan_noise,
)
from components.privacy.settings import validate_privacy
from components.training.central import train_classifier
from components.training.loop import fit_local

sys.path.insert(0, str(Path(__file__).parent))
from test_training import PREP, square_task

torch.set_num_threads(1)


def _model():
    torch.manual_seed(0)
    return build_model("small_cnn", num_classes=2, width=8, norm="batch")


def test_epsilon_matches_an_independent_opacus_accountant():
    from opacus.accountants import PRVAccountant, RDPAccountant

    q, sigma, steps = 0.05, 1.1, 300
    for kind, cls in (("rdp", RDPAccountant), ("prv", PRVAccountant)):
        ledger = PrivacyLedger(kind, delta=1e-5)
        for _ in range(3):  # three rounds of 100 steps, composed
            ledger.step(sigma, q, 100)
        reference = cls()
        for _ in range(steps):
            reference.step(noise_multiplier=sigma, sample_rate=q)
        assert ledger.steps == steps
        assert ledger.epsilon() == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-6)


def test_calibration_reaches_the_target_over_the_whole_plan():
    sigma = calibrate_noise(3.0, 1e-5, 0.02, 1000)
    ledger = PrivacyLedger("rdp", 1e-5)
    ledger.step(sigma, 0.02, 1000)
    assert 2.9 < ledger.epsilon() <= 3.0
    assert calibrate_noise(3.0, 1e-5, 0.02, 2000) > sigma  # longer plans need more noise


def test_ledger_round_trips_through_json_and_continues():
    ledger = PrivacyLedger("rdp", 1e-5, budget=8.0)
    ledger.step(1.0, 0.1, 50)
    resumed = PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict())))
    assert resumed.epsilon() == pytest.approx(ledger.epsilon())
    resumed.step(1.0, 0.1, 50)
    fresh = PrivacyLedger("rdp", 1e-5)
    fresh.step(1.0, 0.1, 100)
    assert resumed.epsilon() == pytest.approx(fresh.epsilon())


def test_epsilon_grows_each_round_and_the_budget_stop_fires_before_exceeding():
    sigma, q, steps_per_round, budget = 1.2, 0.05, 25, 3.0
    ledger = PrivacyLedger("rdp", 1e-5, budget=budget)
    spent, rounds_run = [], 0
    for _ in range(50):
        if ledger.would_exceed(sigma, q, steps_per_round):
            break
        ledger.step(sigma, q, steps_per_round)  # the round "runs"; its model is kept
        spent.append(ledger.epsilon())
        rounds_run += 1
    assert 1 < rounds_run < 50
    assert all(b > a for a, b in pairwise(spent))
    assert spent[-1] <= budget  # the last kept model is within budget
    assert ledger.projected_epsilon(sigma, q, steps_per_round) > budget  # the refused round
    assert ledger.epsilon() == spent[-1]  # projecting did not touch the ledger


def test_batchnorm_model_is_fixed_and_validated():
    from opacus.validators import ModuleValidator

    model = _model()
    assert ModuleValidator.validate(model, strict=False)
    fixed, converted = make_private_compatible(model)
    assert converted and not ModuleValidator.validate(fixed, strict=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fixed.modules())
    # the same state-dict layout as a model built with norm="group" (bundles reload strictly)
    group = build_model("small_cnn", num_classes=2, width=8, norm="group")
    group.load_state_dict(fixed.state_dict(), strict=True)


def test_unfixable_module_raises_a_clear_error():
    class WithSyncBatchNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.SyncBatchNorm(4)  # not convertible by our BatchNorm2d swap

        def forward(self, x):
            return self.norm(x)

    with pytest.raises(ModelError, match=r"DP-compatible|DP-SGD"):
        make_private_compatible(WithSyncBatchNorm())

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 4)

        def forward(self, x):
            return self.rnn(x)[0]

    with pytest.raises(ModelError, match=r"cannot be trained with DP-SGD.*LSTM"):
        make_private_compatible(Recurrent())


def test_hooks_refuse_a_model_that_was_not_made_compatible(tmp_path):
    train = square_task(32, 0)
    hooks = DPSGD(1.0, 1.0, PrivacyLedger())
    with pytest.raises(ModelError, match="make_private_compatible"):
        fit_local(
            _model(),
            train,
            PREP,
            epochs=1,
            batch_size=8,
            lr=1e-2,
            optimizer_hook=hooks.optimizer_hook,
            loader_hook=hooks.loader_hook,
        )


def test_weighted_imbalance_is_refused_under_dp(tiny_cfg):
    with pytest.raises(ConfigError, match="imbalance=none"):
        tiny_cfg("privacy=dp_eps8", "trainer.imbalance=weighted_loss")
    with pytest.raises(ConfigError, match="imbalance=none"):
        validate_privacy({"mode": "dp_sgd", "epsilon": 8}, None, {"imbalance": "weighted_loss"})


def test_central_dp_sgd_learns_at_a_loose_budget_and_reports(tmp_path, tiny_cfg):
    cfg = tiny_cfg(
        "privacy=dp_eps8", "trainer.imbalance=none", privacy={"epsilon": 50.0, "delta": 1e-3}
    )
    settings = validate_privacy(cfg["privacy"], None, cfg["trainer"])
    train, val = square_task(512, 0), square_task(64, 1)
    torch.manual_seed(0)  # noise norm ~ σ·sqrt(d)/B: a narrow net and big batches
    model, _ = make_private_compatible(
        build_model("small_cnn", num_classes=2, width=4, norm="batch")
    )
    sigma, q, total = plan_noise(settings, num_examples=512, batch_size=128, epochs_total=6)
    ledger = PrivacyLedger(settings.accountant, settings.delta, settings.epsilon)
    hooks = DPSGD(sigma, settings.max_grad_norm, ledger)
    result = train_classifier(
        model,
        train,
        val,
        PREP,
        max_epochs=6,
        batch_size=128,
        lr=3e-3,
        weight_decay=0.0,
        early_stopping_patience=6,
        imbalance="none",
        augment=False,
        seed=0,
        out_dir=tmp_path / "run",
        optimizer_hook=hooks.optimizer_hook,
        loader_hook=hooks.loader_hook,
    )
    hooks.close()
    report = hooks.report()
    assert type(result.model).__name__ == "Classifier"  # not an Opacus wrapper
    assert report["steps"] == hooks.steps > 0 and report["sample_rate"] == q == 1 / 4
    assert report["epsilon"] <= 50.0 and report["noise_multiplier"] == sigma
    assert ledger.steps == total or ledger.steps < total  # early stop may end sooner
    first, last = result.history[0]["train_loss"], min(r["train_loss"] for r in result.history)
    assert last < first
    assert result.best_score is not None and result.best_score > 0.6
    assert np.isfinite([r["train_loss"] for r in result.history]).all()


def test_resnet18_trains_under_dp_sgd_with_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=2, width=8, norm="group", small_input=True)
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    before = model(x).detach()
    make_private_compatible(model)  # residual adds out of place: same maths
    assert torch.allclose(model(x), before, atol=1e-6)
    model.train()
    hooks = DPSGD(1.0, 1.0, PrivacyLedger())
    out = fit_local(
        model,
        square_task(16, 0),
        PREP,
        epochs=1,
        batch_size=8,
        lr=1e-3,
        optimizer_hook=hooks.optimizer_hook,
        loader_hook=hooks.loader_hook,
    )
    hooks.close()
    assert hooks.steps == 2 and np.isfinite(out["train_loss"])
