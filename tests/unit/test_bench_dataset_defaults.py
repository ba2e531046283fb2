"""bench/dataset_defaults.py and bench/plain_finetune.py: the plain loop on a run's split, and
finding the run the pipeline creates (no timing assertions)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        import dataset_defaults
        import plain_finetune

        yield dataset_defaults, plain_finetune
    finally:
        sys.path.remove(str(BENCH))


class _Process:
    def __init__(self, code: int | None) -> None:
        self.returncode = code

    def poll(self) -> int | None:
        return self.returncode


def test_the_plain_loop_trains_the_named_backbone_on_the_split_rows_only(bench, tmp_path):
    _, plain = bench
    rng = np.random.default_rng(0)
    rows = []
    for i, (split, label) in enumerate([(s, c) for s in ("train", "test", "val") for c in "ab"]):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
        rows.append({"source": str(path), "label": label, "split": split})
    manifest = pd.DataFrame(rows)
    out = plain.plain_split(
        manifest,
        ["a", "b"],
        32,
        backbone="efficientnet_lite0",
        epochs=1,
        lr=1e-3,
        batch_size=2,
        seed=0,
        device="cpu",
    )
    assert out["split"] == {"train": 2, "test": 2}  # validation rows are not used
    assert out["test_sources"] == sorted(manifest.loc[manifest.split == "test", "source"])
    assert set(out["metrics"]) >= {"macro_f1", "macro_auroc", "balanced_accuracy"}
    with pytest.raises(SystemExit, match="resnet18"):
        plain.pretrained_lite("resnet18", 2)


def test_the_bench_finds_the_run_the_pipeline_makes_or_says_it_made_none(bench, tmp_path):
    defaults, _ = bench
    runs = tmp_path / "runs"
    old = runs / "20260101T000000-busi"
    old.mkdir(parents=True)
    (runs / "20260102T000000-busi").mkdir()
    before = {old}
    found = defaults.new_run_dir(runs, "busi", before, _Process(None), timeout_s=5)
    assert found.name == "20260102T000000-busi"
    with pytest.raises(SystemExit, match="exited"):
        defaults.new_run_dir(runs, "cric_pap_smear", set(), _Process(1), timeout_s=5)
