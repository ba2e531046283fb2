"""Write N per-hospital image folders from one dataset, as hospitals would hold them.

    python bench/make_hospital_folders.py SOURCE OUT --hospitals 5 --alpha 0.5 [--seed 0]
    python bench/make_hospital_folders.py --synthetic 40 OUT --hospitals 3

SOURCE is a folder of `<class>/<image>` (a `train/`/`test/` level is flattened: a hospital
holds one pile of labelled images and splits it itself). Each class is shared among the
hospitals with Dirichlet(α) proportions (label skew; `federation.partition=dirichlet` does the
same for the simulation), every hospital keeping at least `--min-per-class` images of each
class it holds. Files of a class with the same pixels (the content hash the sites' ingest
deduplicates by; brain MRI holds re-encoded copies) go to the same hospital: two hospitals do
not hold the same image, or one site could be tested on what another trained on. Files are
copied to `OUT/hospital-<i>/<class>/` under their own names (a name already taken there, e.g.
`Training/x/a.jpg` and `Testing/x/a.jpg`, gets a `-2`, `-3`, ... suffix); then

    oncoflow fl local --site hospital-1=OUT/hospital-1 --site hospital-2=OUT/hospital-2 ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm"}


def labelled_images(source: Path) -> dict[str, list[Path]]:
    """{class: [files]} from `<class>/<file>` or `<split>/<class>/<file>`."""
    by_class: dict[str, list[Path]] = {}
    for path in sorted(source.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            by_class.setdefault(path.parent.name, []).append(path)
    return by_class


def content_key(path: Path) -> str:
    """The pixel hash the sites' ingest deduplicates by (`ingest.describe`; re-encoded copies
    of one image share it), else the file's bytes for a file that does not decode."""
    sys.path.insert(0, str(ROOT))
    from components.data.ingest import describe

    return describe(str(path)).sha256 or hashlib.sha256(path.read_bytes()).hexdigest()


def identical_groups(files: list[Path]) -> list[list[Path]]:
    """`files` grouped by content (the same pixels together), in first-seen order."""
    groups: dict[str, list[Path]] = {}
    for path in files:
        groups.setdefault(content_key(path), []).append(path)
    return list(groups.values())


def dirichlet_shares(
    by_class: dict[str, list[Path]], hospitals: int, alpha: float, seed: int, min_per_class: int
) -> list[dict[str, list[Path]]]:
    """Each class's distinct images shared with Dirichlet(α) proportions (copies follow)."""
    rng = np.random.default_rng(seed)
    out: list[dict[str, list[Path]]] = [{} for _ in range(hospitals)]
    for label, files in sorted(by_class.items()):
        groups = identical_groups(files)
        order = rng.permutation(len(groups))
        floor = min(min_per_class, len(groups) // hospitals)
        rest = len(groups) - floor * hospitals
        counts = np.floor(rng.dirichlet([alpha] * hospitals) * rest).astype(int)
        counts[: rest - counts.sum()] += 1  # hand out the rounding remainder
        counts += floor
        start = 0
        for h, n in enumerate(counts):
            if n:
                out[h][label] = [p for i in order[start : start + n] for p in groups[i]]
            start += n
    return out


def free_name(folder: Path, name: str, taken: set[str]) -> str:
    """`name`, or `<stem>-<k><suffix>` when `folder` already holds a file of that name."""
    stem, suffix = Path(name).stem, Path(name).suffix
    candidate, k = name, 1
    while candidate in taken:
        k += 1
        candidate = f"{stem}-{k}{suffix}"
    taken.add(candidate)
    return candidate


def write_hospitals(shares: list[dict[str, list[Path]]], out: Path) -> dict[str, dict[str, int]]:
    report = {}
    for h, share in enumerate(shares, start=1):
        name = f"hospital-{h}"
        for label, files in share.items():
            folder = out / name / label
            folder.mkdir(parents=True, exist_ok=True)
            taken = {p.name for p in folder.iterdir()}
            for path in files:
                shutil.copy2(path, folder / free_name(folder, path.name, taken))
        report[name] = {label: len(files) for label, files in sorted(share.items())}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", help="dataset folder (<class>/<image>)")
    parser.add_argument("out")
    parser.add_argument("--synthetic", type=int, default=None, help="n per class, no SOURCE")
    parser.add_argument("--hospitals", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-per-class", type=int, default=4)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.synthetic:
        sys.path.insert(0, str(ROOT))
        from components.data.synthetic import write_synthetic_folder

        source = out / "_source"
        write_synthetic_folder(source, n_per_class=args.synthetic, seed=args.seed)
    elif args.source:
        source = Path(args.source)
    else:
        parser.error("give SOURCE or --synthetic N")
    shares = dirichlet_shares(
        labelled_images(source), args.hospitals, args.alpha, args.seed, args.min_per_class
    )
    report = write_hospitals(shares, out)
    if args.synthetic:
        shutil.rmtree(source)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
