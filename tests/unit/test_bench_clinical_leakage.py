"""bench/clinical_leakage.py on the synthetic clinical dataset: the record's `marker`, which
tells benign from malignant by construction, scores far above the features drawn at random."""

from __future__ import annotations

from bench_modules import bench_module


def test_the_synthetic_marker_stands_out(tmp_path, capsys):
    with bench_module("clinical_leakage") as module:
        scores = module.main(["--workspace", str(tmp_path), "dataset=synthetic_clinical"])
    assert set(scores) == {"age", "smoker", "site", "marker"}
    assert scores["marker"]["score"] > 0.75
    assert max(scores[f]["score"] for f in ("age", "smoker", "site")) < 0.65
    assert "marker" in capsys.readouterr().out
