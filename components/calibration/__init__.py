"""Calibrated probabilities and conformal referral for a trained classifier.

- `temperature`: one scalar T > 0 fitted on held-out logits (minimum NLL); probabilities are
  softmax(logits / T).
- `conformal`: split-conformal prediction sets (APS, not randomised) at a configured coverage.
- `referral`: the per-case `refer` rule and its plain-words reason.
- `record`: `Calibration`, what a model bundle carries and serving applies.
- `fit`: fit all of it on one held-out split and report its effect on another.

Plain numpy; no torch. Submodules are imported on demand.
"""
