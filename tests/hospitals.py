"""Per-hospital image folders and the run overrides the federation integration tests share
(tests/ is on pytest's `pythonpath`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# a small synthetic federation: tiny CNN, two images per class suffice for validation
OVERRIDES = [
    "dataset=synthetic",
    "dataset.adapter=folder",
    "model=small_cnn",
    "model.width=8",
    "validation.min_per_class=2",
    "trainer.batch_size=16",
]


def write_hospitals(
    out: Path, *, hospitals: int = 3, per_class: int = 30, source_root: Path = ROOT
) -> Path:
    """`hospitals` synthetic folders `out/hospital-<i>` (nearly IID: α=5), written by
    bench/make_hospital_folders.py as the bench writes them."""
    subprocess.run(
        [
            sys.executable,
            str(source_root / "bench" / "make_hospital_folders.py"),
            "--synthetic",
            str(per_class),
            str(out),
            "--hospitals",
            str(hospitals),
            "--alpha",
            "5",
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out
