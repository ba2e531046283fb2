"""A dataset's default pipeline against a plain fine-tune of the same backbone, same split.

Runs `oncoflow run dataset=DATASET` (plus any overrides; none for the defaults under test),
then `bench/plain_finetune.py`'s plain loop (Adam, fixed epochs, no augmentation, no schedule)
with the run's backbone and image size on exactly the run's train/test rows, and prints
macro-F1, AUROC, balanced accuracy and wall time of both. The choices behind the defaults are
made on validation only; this bench is the one place the test split speaks.

    python bench/dataset_defaults.py busi
    python bench/dataset_defaults.py cric_pap_smear --json cric.json
    python bench/dataset_defaults.py busi --attach .oncoflow/runs/20260101T000000-busi
    python bench/dataset_defaults.py brain_tumor_mri --concurrent  # plain loop during training

`--attach RUN_DIR` compares against a run already started or finished (of that dataset);
`--concurrent` starts the plain fine-tune as soon as the run's split is final, while the
pipeline trains (faster on a shared machine; both wall times then include the contention).
The workspace is `$ONCOFLOW_WORKSPACE` (as for `oncoflow run`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import plain_finetune as plain  # noqa: E402  (bench/plain_finetune.py)

TABLE = (("macro_f1", "macro-F1"), ("macro_auroc", "AUROC"), ("balanced_accuracy", "bal. acc"))


def new_run_dir(runs: Path, dataset: str, before: set[Path], process, timeout_s: float) -> Path:
    """The run directory the pipeline creates for `dataset` (not one of `before`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fresh = sorted(set(runs.glob(f"*-{dataset}")) - before)
        if fresh:
            return fresh[-1]
        if process.poll() is not None:
            raise SystemExit(f"oncoflow run exited ({process.returncode}) before making a run")
        time.sleep(2)
    raise SystemExit(f"no new run directory under {runs} after {timeout_s:.0f}s")


def wait_for_final_split(run_dir: Path, process) -> None:
    """Until training starts (`training/`): the manifest's splits are final from then on."""
    while not (run_dir / "training").is_dir():
        if process is not None and process.poll() is not None:
            return
        time.sleep(5)


def manifest_test_sources(run_dir: Path) -> list[str]:
    import pandas as pd

    frame = pd.read_parquet(run_dir / "manifest.parquet")
    return sorted(frame.loc[frame["split"] == "test", "source"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="a conf/dataset option, e.g. busi")
    parser.add_argument("overrides", nargs="*", help="extra overrides (none: the defaults)")
    parser.add_argument("--attach", type=Path, default=None, help="use this run, start none")
    parser.add_argument("--concurrent", action="store_true", help="plain loop during training")
    parser.add_argument("--json", default=None, help="also write the results here ('-': stdout)")
    plain.add_plain_arguments(parser)
    args = parser.parse_args(argv)

    import torch

    from components.config import compose
    from flows.runtime import prepare

    overrides = [f"dataset={args.dataset}", *args.overrides]
    cfg = compose(overrides)
    backbone = args.backbone or cfg.model.name
    classes, size = list(cfg.dataset.classes), int(cfg.dataset.image_size)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    process = None
    if args.attach:
        run_dir = args.attach
    else:
        runs = prepare(overrides).root / "runs"
        before = set(runs.glob(f"*-{args.dataset}"))
        command = [sys.executable, "-m", "flows.cli", "run", *overrides]
        print("running:", " ".join(command[2:]), flush=True)
        process = subprocess.Popen(command, cwd=ROOT)
        run_dir = new_run_dir(runs, args.dataset, before, process, timeout_s=1800)
    if args.concurrent or args.attach:
        wait_for_final_split(run_dir, process)
    if process is not None and not args.concurrent and process.wait() != 0:
        raise SystemExit(f"oncoflow run failed ({process.returncode}); see its log above")
    if not (run_dir / "manifest.parquet").is_file():
        raise SystemExit(f"{run_dir} has no manifest.parquet: the run stopped before training")

    import pandas as pd

    print(f"plain fine-tune of {backbone} on {run_dir.name}'s split", flush=True)
    result = plain.plain_split(
        pd.read_parquet(run_dir / "manifest.parquet"),
        classes,
        size,
        backbone=backbone,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        device=device,
    )
    plain_only = {k: v for k, v in result.items() if k != "test_sources"}
    print("plain fine-tune:", json.dumps(plain_only), flush=True)  # kept if the run fails
    if process is not None and process.wait() != 0:
        raise SystemExit(f"oncoflow run failed ({process.returncode}); see its log above")
    while not (run_dir / "summary.json").is_file():  # an attached run still going
        time.sleep(10)
    if manifest_test_sources(run_dir) != result["test_sources"]:
        raise SystemExit("the run's test split changed after the plain fine-tune read it")
    run = plain.load_run(run_dir)
    report = {
        "dataset": args.dataset,
        "overrides": args.overrides,
        "run_dir": str(run_dir),
        "split": result["split"],
        "settings": {k: getattr(args, k) for k in ("epochs", "lr", "batch_size", "seed")}
        | {"image_size": size, "device": str(device), "backbone": backbone},
        "concurrent": bool(args.concurrent or args.attach),
        "pipeline": plain.pipeline_figures(run),
        "plain": result["metrics"] | {"model": backbone, "wall_seconds": result["wall_seconds"]},
        "plain_decode_seconds": result["decode_seconds"],
        "plain_train_seconds": result["train_seconds"],
    }
    print()
    plain.print_table(report)
    print()
    print("| dataset | side | " + " | ".join(name for _, name in TABLE) + " | wall s |")
    print("|---|---|" + "---|" * (len(TABLE) + 1))
    for side in ("pipeline", "plain"):
        cells = " | ".join(f"{report[side][key]:.3f}" for key, _ in TABLE)
        wall = report[side]["wall_seconds"]
        print(f"| {args.dataset} | {side} | {cells} | {wall:.0f} |")
    if args.json == "-":
        print(json.dumps(report, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
