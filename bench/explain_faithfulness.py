"""Explanation faithfulness on a finished run's test images: deletion/insertion AUCs of Grad-CAM,
SHAP and a random map, and the model-randomisation sanity check.

Reads the run directory the way bench/plain_finetune.py does (`manifest.parquet` with its
`split` column, `bundle/`), draws `--images` seeded test images, preprocesses them as serving
does, and runs `components.explain.faithfulness.evaluate_faithfulness` with the bundle's model,
its SHAP background and the SHAP sample count `/explain` uses by default. Prints a table;
`--json PATH` writes the results; `--into-bundle` writes them to `RUN_DIR/bundle/
faithfulness.json` and, when the run was registered (summary.json names its MLflow run), logs
that file to the run's `bundle` artifacts, so the registered model version carries it and its
model card (flows/promote.py, written when the version is promoted and packaged) shows an
"Explanation faithfulness" section. Nothing else of the run is changed.

    python bench/explain_faithfulness.py .oncoflow/runs/20260101T000000-brain_tumor_mri
    python bench/explain_faithfulness.py RUN_DIR --images 100 --json f.json --into-bundle
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FILENAME = "faithfulness.json"


def test_tensors(run_dir: Path, bundle, count: int, seed: int):
    """(N, C, H, W) normalised tensors of `count` seeded test-split images, as served."""
    import pandas as pd
    import torch

    from components.data.images import open_image

    manifest = pd.read_parquet(run_dir / "manifest.parquet")
    test = manifest[manifest["split"] == "test"]
    if test.empty:
        raise SystemExit(f"{run_dir} has no test split in manifest.parquet")
    rows = test.sample(n=min(count, len(test)), random_state=seed)
    tensors = [bundle.preprocessing.to_tensor(open_image(src)) for src in rows["source"]]
    return torch.stack(tensors)


def table(result: dict) -> str:
    from components.explain.faithfulness import against_random_lines

    lines = [
        f"{result['images']} test images, seed {result['seed']}, {result['steps']} steps, "
        f"baseline: {result['baseline']}; SHAP {result['shap']['nsamples']} samples over "
        f"{result['shap']['background_size']} reference images",
        f"{'map':<8} | {'deletion AUC (lower better)':>28} | {'insertion AUC (higher better)':>30}",
    ]
    for name in ("gradcam", "shap", "random"):
        d, i = result["deletion_auc"][name], result["insertion_auc"][name]
        lines.append(
            f"{name:<8} | {d['mean']:>19.3f} ± {d['sd']:.3f} | {i['mean']:>21.3f} ± {i['sd']:.3f}"
        )
    lines += [line for line in against_random_lines(result) if line]
    lines.append("model randomisation, Spearman correlation trained vs re-initialised (mean ± SD)")
    for scope, found in result["randomisation_spearman"].items():
        cells = ", ".join(
            f"{k} {found[k]['mean']:.2f} ± {found[k]['sd']:.2f}"
            for k in ("gradcam", "shap", "shap_abs")
        )
        lines.append(f"  {scope:<5}: {cells}")
    return "\n".join(lines)


def log_to_registry(run_dir: Path, path: Path) -> str | None:
    """Log `path` into the run's MLflow `bundle` artifacts; the run id, or None if unknown."""
    summary_path = run_dir / "summary.json"
    run_id = (
        json.loads(summary_path.read_text()).get("mlflow_run_id")
        if summary_path.is_file()
        else None
    )
    if not run_id:
        return None
    from components.registry.client import BUNDLE_ARTIFACT, RegistryClient
    from components.workspace import Workspace

    workspace = Workspace.from_env(run_dir.resolve().parent.parent)  # <workspace>/runs/<run>
    client = RegistryClient.for_workspace(workspace, None)
    client.client.log_artifact(run_id, str(path), BUNDLE_ARTIFACT)
    return run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--nsamples", type=int, help="SHAP samples (default: /explain's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--into-bundle",
        action="store_true",
        help=f"write RUN_DIR/bundle/{FILENAME} and log it to the run's MLflow bundle artifacts",
    )
    args = parser.parse_args(argv)
    import torch

    from components.bundle import ModelBundle
    from components.explain.faithfulness import evaluate_faithfulness

    torch.set_num_threads(args.threads)
    bundle = ModelBundle.load(args.run_dir / "bundle")
    if bundle.background is None or getattr(bundle.background, "ndim", None) != 4:
        raise SystemExit("the bundle has no image SHAP background")
    images = test_tensors(args.run_dir, bundle, args.images, args.seed)
    started = time.perf_counter()
    result = evaluate_faithfulness(
        bundle.build_model().eval(),
        images,
        bundle.background,
        nsamples=args.nsamples or bundle.shap_nsamples,
        steps=args.steps,
        seed=args.seed,
        progress=lambda done, total: (
            print(f"  {done}/{total}", flush=True) if done % 10 == 0 else None
        ),
    )
    result["run"] = args.run_dir.name
    result["background"] = bundle.background_source or "unrecorded"
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    result["command"] = " ".join(["python bench/explain_faithfulness.py", *(argv or sys.argv[1:])])
    print(table(result))
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text)
        print(f"wrote {args.json}")
    if args.into_bundle:
        target = args.run_dir / "bundle" / FILENAME
        target.write_text(text)
        print(f"wrote {target}")
        run_id = log_to_registry(args.run_dir, target)
        if run_id:
            print(f"logged {FILENAME} to MLflow run {run_id} (artifact path bundle/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
