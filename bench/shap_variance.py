"""Where the image SHAP map's sampling noise comes from, on a finished run's test images.

Expected gradients (what `/explain` estimates, components/explain/one_pass.py) average
(x - b) * grad f(b + a (x - b)) over the background's references b and positions a in [0, 1).
This bench evaluates that integrand on a full grid (``--positions`` mid-points x every
reference of the bundle's background) for each image, on the same rewritten copy of the model
`/explain` uses, and prints per image:

- ``noise/signal``: the integrand's per-sample variance over the squared norm of its mean (the
  grid mean, close to converged): n independent samples leave a relative L2 error of about
  sqrt(ratio / n);
- ``lag-1 corr``: the correlation of the integrand at neighbouring positions (one grid step),
  which is what stratified and quasi-random points could exploit;
- ``between refs`` / ``between positions``: the shares of the variance explained by the
  reference alone and by the position alone;
- ``control variate``: the variance left after subtracting the best multiple of the image's own
  gradient term (x - b) * grad f(x), whose mean is known exactly (1.0: no help).

    python bench/explain_latency.py RUN_DIR --accuracy   # the estimators' error, measured
    python bench/shap_variance.py RUN_DIR --images 4     # why it is what it is
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from explain_latency import test_images  # noqa: E402


def integrand_grid(model, x, background, target: int, positions: int):
    """The integrand summed over channels, (positions, references, H, W), at mid-points."""
    import torch

    grid = []
    alpha = ((torch.arange(positions) + 0.5) / positions).view(-1, 1, 1, 1)
    for reference in background:
        points = (reference + alpha * (x - reference)).requires_grad_(True)
        objective = torch.softmax(model(points), dim=1)[:, target].sum()
        (gradients,) = torch.autograd.grad(objective, points)
        grid.append(((x - reference) * gradients).sum(dim=1))
    return torch.stack(grid, dim=1).detach().numpy().astype(np.float64)


def variance_profile(grid: np.ndarray, own: np.ndarray) -> dict[str, float]:
    """The figures the module docstring lists, for one image's `grid` (A, R, H, W) and its
    control variate `own` (R, H, W): (x - b_r) * grad f(x) for each reference."""
    mean = grid.mean(axis=(0, 1))
    deviation = grid - mean
    per_sample = float((deviation**2).sum(axis=(2, 3)).mean())
    lag = float((deviation[1:] * deviation[:-1]).sum(axis=(2, 3)).mean()) / per_sample
    by_reference = float(((grid.mean(axis=0) - mean) ** 2).sum(axis=(1, 2)).mean()) / per_sample
    by_position = float(((grid.mean(axis=1) - mean) ** 2).sum(axis=(1, 2)).mean()) / per_sample
    control = np.broadcast_to(own - own.mean(axis=0), grid.shape)
    beta = float((deviation * control).sum() / (control**2).sum())
    left = float(((deviation - beta * control) ** 2).sum() / (deviation**2).sum())
    return {
        "noise_over_signal": per_sample / float((mean**2).sum()),
        "lag1_correlation": lag,
        "between_references": by_reference,
        "between_positions": by_position,
        "control_variate_left": left,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run directory")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--positions", type=int, default=64, help="grid points along [0, 1)")
    parser.add_argument("--seed", type=int, default=0, help="which test images")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    import torch

    from serving.engine import DiagnosisEngine
    from serving.schemas import ModelRef

    torch.set_num_threads(args.threads)
    engine = DiagnosisEngine.from_dir(
        args.run_dir / "bundle", ModelRef(name="bench", version="", tag="")
    )
    if engine.image_background is None:
        raise SystemExit("the bundle has no image SHAP background")
    background = torch.as_tensor(engine.image_background).float()
    model = engine.explain_model  # the frozen, rewritten copy /explain runs on
    print(f"{args.run_dir.name}: {len(background)} references x {args.positions} positions")
    print("image | noise/signal | lag-1 corr | between refs | between positions | control variate")
    for i, raw in enumerate(test_images(args.run_dir, args.images, args.seed)):
        x = engine.prepare(raw).image
        with torch.no_grad():
            target = int(model(x[None]).argmax())
        grid = integrand_grid(model, x, background, target, args.positions)
        point = x[None].clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(torch.softmax(model(point), 1)[0, target], point)
        own = ((x - background) * gradient).sum(dim=1).detach().numpy().astype(np.float64)
        row = variance_profile(grid, own)
        print(
            f"{i + 1:>5} | {row['noise_over_signal']:>12.1f} | {row['lag1_correlation']:>10.2f} | "
            f"{row['between_references']:>12.2f} | {row['between_positions']:>17.2f} | "
            f"{row['control_variate_left']:>15.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
