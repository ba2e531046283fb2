"""DP-SGD with Opacus on top of the one training loop (`train_classifier` / `fit_local`).

- `make_private_compatible(model)`: BatchNorm -> GroupNorm, then Opacus' `ModuleValidator`.
- `calibrate_noise(...)`: the noise multiplier reaching (ε, δ) over the whole planned training.
- `PrivacyLedger`: an Opacus accountant whose history is JSON-serialisable, so a resumed run (or a
  site's next round) continues the same ledger; `would_exceed` simulates the next round.
- `DPSGD`: the `loader_hook` / `optimizer_hook` pair turning training into DP-SGD (Poisson
  sampling, per-sample clipping, Gaussian noise); each optimiser step is recorded in the ledger.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from components.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


class PrivacyBudgetExceeded(ConfigError):
    """The next round/epoch would spend more than the configured (ε, δ) budget."""


def make_private_compatible(model: nn.Module) -> tuple[nn.Module, bool]:
    """Make `model` trainable with Opacus (in place); returns (model, converted).

    BatchNorm layers are replaced by GroupNorm (`components.models.norm`, the same conversion as
    `build_model(norm="group")`, so a bundle built with `norm="group"` reloads the weights); then
    Opacus' `ModuleValidator.validate` must find nothing left. `converted` tells the caller to
    record `norm="group"` in the architecture kwargs. In-place activations are made
    out-of-place (Opacus' backward hooks need it). Raises `ModelError` naming the layers that
    cannot be made private.
    """

    from components.models.norm import batch_to_group_norm

    converted = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    try:
        batch_to_group_norm(model)
    except TypeError as exc:
        raise ModelError(f"model cannot be made DP-compatible: {exc}") from None
    # Opacus' full backward hooks forbid in-place ops on hooked outputs (ReLU(inplace=True)
    # after a norm layer); switching them off changes no weights.
    for layer in model.modules():
        if getattr(layer, "inplace", False) is True:
            layer.inplace = False
    _out_of_place_residuals(model)
    errors = _opacus_problems(model)
    if errors:
        details = "; ".join(sorted({str(e) for e in errors}))
        raise ModelError(
            "model cannot be trained with DP-SGD (Opacus needs per-sample gradients and no "
            f"cross-sample statistics): {details}. Use norm=group and standard layers."
        )
    return model, converted


def _opacus_problems(model: nn.Module) -> list:
    """Opacus' `ModuleValidator` findings for `model` as it trains (mode restored after)."""
    from opacus.validators import ModuleValidator

    was_training = model.training
    try:
        return list(ModuleValidator.validate(model.train(), strict=False))
    finally:
        model.train(was_training)


def _basic_block_forward(self, x):
    """torchvision's `BasicBlock.forward` with the residual added out of place (`out +=
    identity` modifies a tensor Opacus' backward hooks watch)."""
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + identity)


def _bottleneck_forward(self, x):
    """torchvision's `Bottleneck.forward` with an out-of-place residual add."""
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return self.relu(out + identity)


def _out_of_place_residuals(model: nn.Module) -> None:
    """Rebind the forward of torchvision ResNet blocks (same weights, same maths)."""
    import types

    from torchvision.models.resnet import BasicBlock, Bottleneck

    for block in model.modules():
        if isinstance(block, BasicBlock):
            block.forward = types.MethodType(_basic_block_forward, block)
        elif isinstance(block, Bottleneck):
            block.forward = types.MethodType(_bottleneck_forward, block)


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str = "rdp",
) -> float:
    """Noise multiplier σ so that `total_steps` steps at `sample_rate` spend ≤ (ε, δ)."""
    from opacus.accountants.utils import get_noise_multiplier

    if not 0 < sample_rate <= 1 or total_steps < 1:
        raise ConfigError(f"cannot calibrate noise: sample_rate={sample_rate}, steps={total_steps}")
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=int(total_steps),
                accountant=accountant,
            )
        )
    except ValueError as exc:
        raise ConfigError(f"cannot reach ε={target_epsilon}, δ={delta}: {exc}") from None


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Optimiser steps per epoch with Poisson sampling (Opacus: len of the original loader)."""
    return max(1, math.ceil(num_examples / batch_size))


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate q = 1 / steps per epoch (what `DPDataLoader` uses)."""
    return 1.0 / steps_per_epoch(num_examples, batch_size)


def _new_accountant(kind: str):
    from opacus.accountants import create_accountant

    return create_accountant(mechanism=kind)


@dataclass
class PrivacyLedger:
    """Composed privacy spending of one data holder (the central dataset, or one site).

    `history` is Opacus' accountant history: (noise_multiplier, sample_rate, steps) entries.
    """

    accountant: str = "rdp"
    delta: float = 1e-5
    budget: float | None = None  # ε budget; None: no stop
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def _accountant(self, history=None):
        acc = _new_accountant(self.accountant)
        acc.history = [tuple(h) for h in (self.history if history is None else history)]
        return acc

    @staticmethod
    def _epsilon(acc, delta: float) -> float:
        return float(acc.get_epsilon(delta=delta)) if acc.history else 0.0

    @property
    def steps(self) -> int:
        return int(sum(h[2] for h in self.history))

    def epsilon(self, delta: float | None = None) -> float:
        return self._epsilon(self._accountant(), self.delta if delta is None else delta)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record `steps` noisy steps (merged into the last entry when σ and q are equal)."""
        if steps < 1:
            return
        last = self.history[-1] if self.history else None
        if last and last[0] == noise_multiplier and last[1] == sample_rate:
            self.history[-1] = (last[0], last[1], int(last[2]) + int(steps))
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    def projected_epsilon(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε after `steps` more steps, computed on a copy (the ledger is unchanged)."""
        ghost = copy.deepcopy(self)
        ghost.step(noise_multiplier, sample_rate, steps)
        return ghost.epsilon()

    def would_exceed(
        self, noise_multiplier: float, sample_rate: float, steps: int, budget: float | None = None
    ) -> bool:
        budget = self.budget if budget is None else budget
        if budget is None:
            return False
        return self.projected_epsilon(noise_multiplier, sample_rate, steps) > budget

    def to_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant,
            "delta": self.delta,
            "budget": self.budget,
            "history": [list(h) for h in self.history],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyLedger:
        return cls(
            accountant=str(data["accountant"]),
            delta=float(data["delta"]),
            budget=None if data.get("budget") is None else float(data["budget"]),
            history=[(float(s), float(q), int(n)) for s, q, n in data.get("history", [])],
        )

    def report(self, noise_multiplier: float, max_grad_norm: float) -> dict[str, Any]:
        """What goes to MLflow, the bundle's `privacy` field and the model card."""
        rates = sorted({h[1] for h in self.history})
        return {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "epsilon_budget": self.budget,
            "noise_multiplier": float(noise_multiplier),
            "max_grad_norm": float(max_grad_norm),
            "sample_rate": rates[0] if len(rates) == 1 else rates,
            "steps": self.steps,
            "accountant": self.accountant,
        }


class DPSGD:
    """`loader_hook` + `optimizer_hook` making one `train_classifier`/`fit_local` call DP-SGD.

    The model must already be DP-compatible (`make_private_compatible`, before the optimiser is
    built). Use a fresh instance per call: `hooks = DPSGD(σ, C, ledger)`, pass
    `optimizer_hook=hooks.optimizer_hook, loader_hook=hooks.loader_hook`, then `hooks.close()`
    after training (removes Opacus' hooks from the model). Every optimiser step is recorded in
    `ledger` with the loader's sampling rate.
    """

    def __init__(
        self,
        noise_multiplier: float,
        max_grad_norm: float,
        ledger: PrivacyLedger,
        *,
        grad_sample_mode: str = "hooks",
        secure_mode: bool = False,
    ) -> None:
        if noise_multiplier < 0 or max_grad_norm <= 0:
            raise ConfigError("noise_multiplier must be >= 0 and max_grad_norm > 0")
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.ledger = ledger
        self.grad_sample_mode = grad_sample_mode
        self.secure_mode = secure_mode
        self.sample_rate: float | None = None
        self.expected_batch_size: int | None = None
        self.steps = 0
        self._grad_sample_module: Any = None

    def loader_hook(self, loader: DataLoader) -> DataLoader:
        """Replace the loader by Opacus' Poisson-sampling `DPDataLoader`."""
        from opacus.data_loader import DPDataLoader

        dp_loader = DPDataLoader.from_data_loader(loader, distributed=False)
        self.sample_rate = float(dp_loader.sample_rate)
        self.expected_batch_size = max(1, int(len(loader.dataset) * self.sample_rate))
        return dp_loader

    def optimizer_hook(self, module: nn.Module, optimizer):
        """Attach per-sample gradient hooks to `module.model` and wrap `optimizer` in
        `DPOptimizer` (clip each sample's gradient to C, add N(0, σ²C²))."""
        from opacus.grad_sample import GradSampleModule
        from opacus.optimizers import DPOptimizer

        if self.sample_rate is None:
            raise ConfigError("DPSGD.loader_hook must be used together with optimizer_hook")
        model = module.model
        errors = _opacus_problems(model)
        if errors or any(getattr(m, "inplace", False) is True for m in model.modules()):
            # Converting here would be too late: the optimiser already holds the old parameters.
            raise ModelError(
                "call components.privacy.dp.make_private_compatible(model) (or build the model "
                "with norm='group') before training with DP-SGD"
            )
        # The hooks live on model's layers, so module.model itself keeps its type and state-dict
        # keys (checkpoints and bundles are unchanged); we keep the wrapper to remove them later.
        self._grad_sample_module = GradSampleModule(
            model,
            batch_first=True,
            loss_reduction="mean",
            force_functorch=self.grad_sample_mode == "functorch",
        )
        dp_optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
            loss_reduction="mean",
            secure_mode=self.secure_mode,
        )
        dp_optimizer.attach_step_hook(self._on_step)
        return dp_optimizer

    def _on_step(self, optimizer) -> None:
        self.steps += 1
        self.ledger.step(self.noise_multiplier, float(self.sample_rate), 1)

    def close(self) -> None:
        """Remove Opacus' hooks and per-sample gradients from the model."""
        gsm, self._grad_sample_module = self._grad_sample_module, None
        if gsm is not None:
            gsm.remove_hooks()
            for param in gsm._module.parameters():
                if hasattr(param, "grad_sample"):
                    param.grad_sample = None

    def report(self) -> dict[str, Any]:
        return self.ledger.report(self.noise_multiplier, self.max_grad_norm)


def plan_noise(
    settings: Any, *, num_examples: int, batch_size: int, epochs_total: int
) -> tuple[float, float, int]:
    """(σ, q, total steps) for a DP-SGD plan of `epochs_total` epochs over `num_examples`.

    σ is `settings.noise_multiplier` when given, else calibrated to `settings.epsilon` over the
    whole plan (central: max_epochs; one site: rounds × local_epochs).
    """
    q = sample_rate(num_examples, batch_size)
    total = steps_per_epoch(num_examples, batch_size) * int(epochs_total)
    sigma = settings.noise_multiplier
    if sigma is None:
        sigma = calibrate_noise(settings.epsilon, settings.delta, q, total, settings.accountant)
        log.info(
            "calibrated σ=%.4f for ε=%s δ=%s over %d steps",
            sigma,
            settings.epsilon,
            settings.delta,
            total,
        )
    return float(sigma), q, total


__all__ = [
    "DPSGD",
    "PrivacyBudgetExceeded",
    "PrivacyLedger",
    "calibrate_noise",
    "make_private_compatible",
    "plan_noise",
    "sample_rate",
    "steps_per_epoch",
]
