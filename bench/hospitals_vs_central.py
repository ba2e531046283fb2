"""Hospitals for real against central training on the same images (issue #14's figures).

1. Brain MRI is shared into `--hospitals` per-hospital folders with Dirichlet(α) label skew
   (`make_hospital_folders.py`: `Training/`/`Testing/` are flattened, each hospital holds one
   pile of labelled images; copies of one image stay in one hospital), optionally capped at
   `--max-per-class` images per class before sharing (seeded).
2. `oncoflow fl local` runs the real path: each hospital's `site_pipeline` (ingest, split,
   validation; train/val/test stay at the site), approvals, a SuperLink and one SuperNode per
   site (TLS), the coordinator's `federated_pipeline` (R rounds × E local epochs of FedAvg, then
   federated evaluation: each site scores the final model on its own test split).
3. Central training on the same images: a CSV manifest (`path,label,split,site`) lists every
   image the sites kept, with the split its site gave it; `oncoflow run` trains on the union of
   the sites' train splits (validation: union of their val splits) with the same model, image
   size, batch size and budget (R × E epochs; early stopping off, the best-validation epoch is
   kept as the central pipeline always does). The central model is then scored on each site's
   own test split (the very arrays the sites scored the federated model on) and pooled the same
   way (`site_metrics.pool`: counts summed; AUROC a site-size-weighted mean of site AUROCs).
   The central pipeline's own test split is the union of the sites' test splits; its metrics
   are printed alongside as a check (equal to the central model's on the sites' test arrays:
   the same images). Both models are compared on their raw probabilities
   (`calibration.method=none` for the central run: the federated pipeline does not recalibrate).

Printed: per-site and pooled test metrics (macro-F1, AUROC, accuracy, ECE), federated against
central; wall time per round; array bytes sent to / received from each site per round (the
ledger's `bytes`, counted by `components/federated/traffic.py`); total wall times.

    python bench/hospitals_vs_central.py         # defaults: 22 min on 2 shared cores (load 5-10)
    python bench/hospitals_vs_central.py --json bench-hospitals.json --work /tmp/hvc --keep
    python bench/hospitals_vs_central.py --hospitals 2 --rounds 1 --max-per-class 20  # smoke

Knobs (defaults in brackets): --hospitals [5], --alpha [0.5], --seed [0], --max-per-class
[none: all 3,264 images], --min-per-class [10: each hospital holds at least this many distinct
images of every class, so its train split passes validation's 5-per-class check],
--size [64 px], --model [small_cnn], --rounds [5], --local-epochs [1], --batch-size [32],
--site-threads [1: torch threads of each site's processes; five sites share this machine's
cores, and torch's default of one thread per core in every site oversubscribes them: local
training was ~3× slower with it on 2 cores; the central run keeps torch's default];
anything after `--` is passed as Hydra overrides to both runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import make_hospital_folders as hospitals  # noqa: E402

METRICS = ("macro_f1", "macro_auroc", "accuracy", "ece")
SPLITS = ("train", "val", "test")


# ----------------------------------------------------------------------------- hospitals


def write_hospital_folders(
    source: Path, out: Path, n: int, alpha: float, seed: int, cap: int | None, floor: int
) -> dict[str, dict[str, int]]:
    """`n` hospital folders under `out` (see make_hospital_folders), images per class capped
    at `cap` first (a seeded sample)."""
    by_class = hospitals.labelled_images(source)
    if cap:
        rng = np.random.default_rng(seed)
        by_class = {
            label: sorted(files[i] for i in rng.permutation(len(files))[:cap])
            for label, files in sorted(by_class.items())
        }
    shares = hospitals.dirichlet_shares(by_class, n, alpha, seed, floor)
    return hospitals.write_hospitals(shares, out)


# ----------------------------------------------------------------------------- processes


def oncoflow(args: list[str], env: dict[str, str], log: Path, timeout: float) -> dict[str, Any]:
    """Run `python -m flows.cli ARGS`; its output goes to `log`; returns the summary it prints
    last (a JSON object starting at the beginning of a line)."""
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=out,
            text=True,
            timeout=timeout,
        )
        out.write("\n--- stdout ---\n" + proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"oncoflow {args[0]} failed ({proc.returncode}); see {log}")
    text = proc.stdout
    last = text.rfind("\n{\n")  # the summary (earlier lines may be one-line JSON)
    return json.loads(text[last + 1 :] if last >= 0 else text)


def environment(workspace: Path) -> dict[str, str]:
    return {
        **os.environ,
        "ONCOFLOW_WORKSPACE": str(workspace),
        "BENTOML_HOME": str(workspace / "bentoml"),
        "PREFECT_HOME": str(workspace / "prefect"),
        "PYTHONUNBUFFERED": "1",
    }


def site_threads(threads: int) -> dict[str, str]:
    """Torch/OpenMP threads of every process of the federated run (the SuperNodes' ClientApps
    inherit them): on one machine the sites share its cores, and torch's default (one thread
    per core in each site) oversubscribes them."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


# ----------------------------------------------------------------------------- central


def central_manifest(sites_root: Path, names: list[str], out: Path) -> dict[str, dict[str, int]]:
    """CSV of every image the sites kept (their validated manifests), with each image's site
    split; returns {site: {split: n}}."""
    import pandas as pd

    from components.federated.site_prepare import MANIFEST_FILE

    frames, counts = [], {}
    for name in names:
        frame = pd.read_parquet(sites_root / name / MANIFEST_FILE)
        frame = frame[frame["split"].isin(SPLITS)]
        counts[name] = {s: int((frame["split"] == s).sum()) for s in SPLITS}
        frames.append(
            pd.DataFrame(
                {"path": frame["source"], "label": frame["label"], "split": frame["split"]}
            ).assign(site=name)
        )
    pd.concat(frames).to_csv(out, index=False)
    return counts


def score_on_site_tests(
    bundle_dir: Path, sites_root: Path, names: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The central model on each site's own test split (what the site scored the federated
    model on): per-site and pooled as the federated evaluation pools, and the metrics of all
    those images scored together (`evaluate`, true pooled AUROC)."""
    from components.bundle import ModelBundle
    from components.evaluation.metrics import evaluate
    from components.evaluation.predict import predict_proba
    from components.federated.site_metrics import pool, site_summary
    from components.federated.task import load_site_test

    bundle = ModelBundle.load(bundle_dir)
    model = bundle.build_model()
    summaries, labels, scores = {}, [], []
    for name in names:
        x, y = load_site_test(sites_root / name)
        probs = predict_proba(model, x, bundle.preprocessing)
        summaries[name] = site_summary(y, probs, bundle.class_names)
        labels.append(y)
        scores.append(probs)
    together = evaluate(np.concatenate(labels), np.concatenate(scores), bundle.class_names)
    return pool(summaries, bundle.class_names), together | {"n": int(sum(map(len, labels)))}


# ----------------------------------------------------------------------------- report


def headline(metrics: dict[str, Any] | None) -> dict[str, float | None]:
    return {k: (metrics or {}).get(k) for k in METRICS}


def same_figures(central: dict[str, Any], together: dict[str, Any]) -> bool:
    """The central pipeline's own test figures equal the central model's on the sites' test
    arrays: the same images, preprocessed the same way."""
    own = central["test_metrics"]
    return central["images"]["test"] == together["n"] and all(
        own.get(k) is not None and abs(own[k] - together[k]) < 1e-6 for k in METRICS
    )


def model_bytes(weights: Path) -> int:
    """The array bytes of the federated model (what one full copy of it weighs)."""
    with np.load(weights) as arrays:
        return int(sum(arrays[k].nbytes for k in arrays.files))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _f(value: float | None) -> str:
    return "   -  " if value is None else f"{value:6.3f}"


def _kb(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def format_report(r: dict[str, Any]) -> str:
    cfg = r["config"]
    lines = [
        f"Brain MRI in {cfg['hospitals']} hospital folders (Dirichlet α={cfg['alpha']}, seed "
        f"{cfg['seed']}, cap {cfg['max_per_class'] or 'none'}/class); {cfg['model']} at "
        f"{cfg['size']} px; federated {cfg['rounds']} rounds × {cfg['local_epochs']} local "
        f"epoch(s) vs central {cfg['rounds'] * cfg['local_epochs']} epochs",
        "",
        f"{'site':<12} {'train':>5} {'val':>4} {'test':>4}   "
        "federated: F1    AUROC  acc    ECE   |  central: F1    AUROC  acc    ECE",
    ]
    rows = [*r["sites"], "pooled"]
    for name in rows:
        sizes = r["site_sizes"].get(name) or {
            s: sum(v[s] for v in r["site_sizes"].values()) for s in SPLITS
        }
        fed, cen = r["federated"][name], r["central"][name]
        lines.append(
            f"{name:<12} {sizes['train']:>5} {sizes['val']:>4} {sizes['test']:>4}   "
            f"          {'  '.join(_f(fed[k]) for k in METRICS)} |"
            f"           {'  '.join(_f(cen[k]) for k in METRICS)}"
        )
    own, together = r["central_pipeline"], r["central_on_all_site_tests"]
    lines += [
        "",
        "pooled: every site's test images (federated evaluation: counts summed, AUROC the "
        "site-size-weighted mean of site AUROCs); central",
        f"  on those {together['n']} images scored together: "
        + ", ".join(f"{k} {_f(together[k]).strip()}" for k in METRICS),
        f"  the central pipeline's own test split: n={own['n_test']}, "
        + ", ".join(f"{k} {_f(v).strip()}" for k, v in own["metrics"].items())
        + f" (same images: {'yes' if own['same_test_images'] else 'NO'})",
        "",
        "round  seconds   " + "  ".join(f"{s:>22}" for s in r["sites"]),
        "                 " + "  ".join(f"{'sent / received':>22}" for _ in r["sites"]),
    ]
    for row in r["rounds"]:
        cells = []
        for site in r["sites"]:
            b = row["bytes"].get(site, {"sent": 0, "received": 0})
            cells.append(f"{_kb(b['sent'])} / {_kb(b['received'])}".rjust(22))
        lines.append(f"{row['round']:>5}  {row['seconds']:7.1f}   " + "  ".join(cells))
    t = r["wall_seconds"]
    lines += [
        "",
        f"model: {r['model_bytes']:,} bytes of arrays; mean round {r['mean_round_seconds']:.1f}s",
        f"wall: hospital folders {t['folders']:.0f}s, federated (site preparation, approvals, "
        f"SuperLink/SuperNodes, rounds, evaluation, registration) {t['federated']:.0f}s, "
        f"central (ingest, validation, training, registration) {t['central']:.0f}s, "
        f"central scored on the sites' tests {t['central_scoring']:.0f}s",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work or tempfile.mkdtemp(prefix="hospitals-vs-central-")).resolve()
    folders, workspace = work / "hospitals", work / "workspace"
    fed_root = workspace / "local-federation"
    if folders.exists() or workspace.exists():
        raise SystemExit(f"{work} already holds a run; give an empty --work")
    work.mkdir(parents=True, exist_ok=True)
    env = environment(workspace)
    epochs = args.rounds * args.local_epochs
    common = [
        "dataset=brain_tumor_mri",
        f"dataset.image_size={args.size}",
        f"model={args.model}",
        f"trainer.batch_size={args.batch_size}",
        f"seed={args.seed}",
        "package.build_bento=false",
        *args.overrides,
    ]
    walls: dict[str, float] = {}

    t0 = time.perf_counter()
    counts = write_hospital_folders(
        Path(args.data),
        folders,
        args.hospitals,
        args.alpha,
        args.seed,
        args.max_per_class,
        args.min_per_class,
    )
    walls["folders"] = time.perf_counter() - t0
    names = sorted(counts)
    print(f"hospital folders in {folders}: {json.dumps(counts)}", flush=True)

    fed_args = [
        "fl",
        "local",
        *(f"--site={name}={folders / name}" for name in names),
        *common,
        "federation.engine=deployment",
        f"federation.rounds={args.rounds}",
        f"federation.local_epochs={args.local_epochs}",
    ]
    print("federated: python -m flows.cli " + " ".join(fed_args), flush=True)
    t0 = time.perf_counter()
    fed_env = env | site_threads(args.site_threads)
    fed = oncoflow(fed_args, fed_env, work / "federated.log", args.timeout)
    walls["federated"] = time.perf_counter() - t0
    out_dir = Path(fed["run_dir"]) / "federation" / "server" / "out"
    result = json.loads((out_dir / "result.json").read_text())
    evaluation = result["federated_evaluation"]
    ledger = read_jsonl(out_dir / "ledger.jsonl")

    manifest = work / "central_manifest.csv"
    sizes = central_manifest(fed_root / "sites", names, manifest)
    central_args = [
        "run",
        *common,
        "dataset.adapter=csv",
        f"dataset.root={manifest}",
        "dataset.split.keep_given=true",
        f"trainer.max_epochs={epochs}",
        f"trainer.early_stopping_patience={epochs}",
        "calibration.method=none",  # the federated model's probabilities are not recalibrated
    ]
    print("central:   python -m flows.cli " + " ".join(central_args), flush=True)
    t0 = time.perf_counter()
    central = oncoflow(central_args, env, work / "central.log", args.timeout)
    walls["central"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scored, together = score_on_site_tests(
        Path(central["run_dir"]) / "bundle", fed_root / "sites", names
    )
    walls["central_scoring"] = time.perf_counter() - t0

    report = {
        "config": {
            "data": str(args.data),
            "hospitals": args.hospitals,
            "alpha": args.alpha,
            "seed": args.seed,
            "max_per_class": args.max_per_class,
            "min_per_class": args.min_per_class,
            "size": args.size,
            "model": args.model,
            "rounds": args.rounds,
            "local_epochs": args.local_epochs,
            "batch_size": args.batch_size,
            "site_threads": args.site_threads,
            "overrides": args.overrides,
        },
        "commands": {
            "federated": "python -m flows.cli " + " ".join(fed_args),
            "central": "python -m flows.cli " + " ".join(central_args),
        },
        "hospital_class_counts": counts,
        "sites": names,
        "site_sizes": sizes,
        "federated": {
            **{n: headline(evaluation["sites"].get(n)) for n in names},
            "pooled": headline(evaluation["pooled"]),
        },
        "federated_missing_sites": evaluation.get("missing", {}),
        "central": {
            **{n: headline(scored["sites"].get(n)) for n in names},
            "pooled": headline(scored["pooled"]),
        },
        "central_on_all_site_tests": headline(together) | {"n": together["n"]},
        "central_pipeline": {
            "n_test": central["images"]["test"],
            "images": central["images"],
            "epochs_run": central["epochs_run"],
            "metrics": headline(central["test_metrics"]),
            "same_test_images": same_figures(central, together),
        },
        "rounds": [
            {
                "round": row["round"],
                "seconds": row["round_seconds"],
                "bytes": row.get("bytes", {}),
                "accepted_sites": row.get("accepted_sites"),
            }
            for row in ledger
        ],
        "mean_round_seconds": float(np.mean([row["round_seconds"] for row in ledger])),
        "model_bytes": model_bytes(out_dir / "final_model.npz"),
        "federated_summary": {k: fed.get(k) for k in ("rounds", "wall_seconds", "champion")},
        "wall_seconds": walls,
        "work_dir": str(work),
    }
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data_root = Path(os.environ.get("ONCOFLOW_DATA") or ROOT.parent / "shared" / "data")
    parser.add_argument("--data", default=str(data_root / "brain_tumor_mri"))
    parser.add_argument("--hospitals", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-per-class", type=int, default=None)
    parser.add_argument("--min-per-class", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--site-threads", type=int, default=1, help="torch threads per site process (federated)"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per oncoflow run")
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both runs (after --)")
    args = parser.parse_args(argv)
    report = run(args)
    print()
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
