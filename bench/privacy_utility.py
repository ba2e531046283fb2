"""Test metrics at ε≈8 and ε≈3 next to non-private training, central and federated, in one go.

Each cell is one real pipeline run (`oncoflow run ...`: ingest, validation, training, evaluation,
registration) in its own workspace, so MLflow, the bundle and the model card carry the same
privacy facts as the table. Defaults reproduce the closing-note figures on brain MRI (pooled,
de-duplicated split; 64 px small CNN with GroupNorm; central 10 epochs; 5 sites, Dirichlet 0.5,
FedAvg, 5 rounds × 2 local epochs):

    python bench/privacy_utility.py --json privacy-utility.json
    python bench/privacy_utility.py --data synthetic --quick          # a minute or two
    python bench/privacy_utility.py --extra trainer.batch_size=256 trainer.lr=0.01 \\
        trainer.max_epochs=20 --modes central                          # DP-friendly settings
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from components.telemetry import TELEMETRY_OFF

ROOT = Path(__file__).resolve().parent.parent
PRIVACY = ("none", "dp_eps8", "dp_eps3")
BRAIN = [
    "dataset=brain_tumor_mri",
    "dataset.split.keep_given=false",
    "dataset.image_size=64",
    "trainer.max_epochs=10",
    "trainer.early_stopping_patience=10",
]
SYNTHETIC = ["dataset=synthetic", "dataset.synthetic.n_per_class=40", "trainer.max_epochs=2"]
COMMON = [
    "model=small_cnn",
    "model.norm=group",
    "trainer.imbalance=none",
    "trainer.batch_size=64",
    "package.build_bento=false",
]
FEDERATED = [
    "training=federated",
    "federation=fedavg",
    "federation.engine=inline",
    "federation.num_sites=5",
    "federation.partition=dirichlet",
    "federation.alpha=0.5",
    "federation.rounds=5",
    "federation.local_epochs=2",
]


def run_cell(overrides: list[str], workspace: Path) -> dict:
    """One `oncoflow run`; returns its JSON summary."""
    env = {
        **os.environ,
        "ONCOFLOW_WORKSPACE": str(workspace),
        **TELEMETRY_OFF,
        "PREFECT_TASKS_DISABLE_CACHING": "true",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(overrides)}\n{proc.stderr[-3000:]}")
    start = proc.stdout.rfind("\n{\n") + 1
    return json.loads(proc.stdout[start:])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=["brain_tumor_mri", "synthetic"], default="brain_tumor_mri")
    p.add_argument("--modes", default="central,federated", help="central, federated or both")
    p.add_argument("--privacy", default=",".join(PRIVACY), help="presets from conf/privacy/")
    p.add_argument("--quick", action="store_true", help="federated: 2 rounds x 1 epoch")
    p.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    base = (BRAIN if args.data == "brain_tumor_mri" else SYNTHETIC) + COMMON
    federated = FEDERATED + (["federation.rounds=2", "federation.local_epochs=1"] * args.quick)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="oncoflow-privacy-utility-"))
    rows = []
    for mode in [m for m in args.modes.split(",") if m]:
        for preset in [q for q in args.privacy.split(",") if q]:
            overrides = [*base, *(federated if mode == "federated" else []), *args.extra]
            overrides.append(f"privacy={preset}")
            summary = run_cell(overrides, workdir / f"{mode}-{preset}")
            privacy = summary.get("privacy") or {}
            rows.append(
                {
                    "mode": mode,
                    "privacy": preset,
                    "epsilon": privacy.get("epsilon"),
                    "delta": privacy.get("delta"),
                    "noise_multiplier": privacy.get("noise_multiplier"),
                    "test": summary["test_metrics"],
                    "wall_seconds": summary["wall_seconds"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'run':<24}{'epsilon':>9}{'sigma':>8}{'F1':>7}{'AUROC':>7}{'acc':>7}")
    for r in rows:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        sigma = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.2f}"
        t = r["test"]
        print(
            f"{r['mode'] + ' ' + r['privacy']:<24}{eps:>9}{sigma:>8}"
            f"{t['macro_f1']:7.3f}{t.get('macro_auroc') or float('nan'):7.3f}{t['accuracy']:7.3f}"
        )
    report = {"data": args.data, "extra": args.extra, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
