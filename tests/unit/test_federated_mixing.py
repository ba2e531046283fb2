"""Nearest-neighbour mixing before a robust rule (components/federated/mixing.py)."""

from __future__ import annotations

import numpy as np
import pytest

from components.errors import ConfigError
from components.federated.mixing import capped_weights, mix, neighbourhoods
from components.federated.settings import validate_federation


def heterogeneous_honest(rng, n: int = 4, d: int = 50) -> list[dict[str, np.ndarray]]:
    """Honest updates that disagree a lot (label-skewed sites): a shared direction plus large
    site-specific parts, and an integer counter that must not be averaged."""
    shared = rng.normal(size=d)
    return [
        {
            "w": (shared + 0.8 * rng.normal(size=d)).astype(np.float32),
            "steps": np.array(7 + i, dtype=np.int64),
        }
        for i in range(n)
    ]


def test_an_outlier_drops_out_of_every_honest_neighbourhood():
    rng = np.random.default_rng(0)
    honest = heterogeneous_honest(rng)
    attacker = {"w": -10.0 * honest[0]["w"], "steps": np.array(0, dtype=np.int64)}
    updates = [*honest, attacker]
    groups = neighbourhoods(updates, f=1)
    assert [len(g) for g in groups] == [4] * 5
    assert all(g[0] == i for i, g in enumerate(groups))  # itself first
    for g in groups[:4]:
        assert sorted(g) == [0, 1, 2, 3]
    assert 4 in groups[4]


def test_mixed_honest_updates_equal_the_honest_mean_and_robust_rules_recover_it():
    rng = np.random.default_rng(1)
    honest = heterogeneous_honest(rng)
    attacker = {"w": -10.0 * honest[1]["w"], "steps": np.array(0, dtype=np.int64)}
    mixed, _ = mix([*honest, attacker], f=1)
    honest_mean = np.mean([u["w"] for u in honest], axis=0)
    for m in mixed[:4]:
        np.testing.assert_allclose(m["w"], honest_mean, rtol=1e-6)
        assert m["w"].dtype == np.float32
    stacked = np.stack([m["w"] for m in mixed])
    median = np.median(stacked, axis=0)
    np.testing.assert_allclose(median, honest_mean, rtol=1e-6)
    # without mixing the coordinate-wise median of heterogeneous updates is far from the mean
    raw_median = np.median(np.stack([u["w"] for u in [*honest, attacker]]), axis=0)
    assert np.linalg.norm(raw_median - honest_mean) > 10 * np.linalg.norm(median - honest_mean)
    # non-floating arrays are each update's own
    assert [int(m["steps"]) for m in mixed] == [7, 8, 9, 10, 0]


def test_mixing_is_weighted_by_sample_counts_and_a_liar_cannot_claim_more_than_the_largest():
    rng = np.random.default_rng(3)
    honest = heterogeneous_honest(rng)
    counts = [400.0, 40.0, 10.0, 200.0]
    attacker = {"w": -10.0 * honest[0]["w"], "steps": np.array(0, dtype=np.int64)}
    mixed, _ = mix([*honest, attacker], f=1, weights=[*counts, 1e9])
    weighted = np.average([u["w"] for u in honest], axis=0, weights=counts)
    for m in mixed[:4]:
        np.testing.assert_allclose(m["w"], weighted, rtol=1e-5)
    # the attacker's claimed 1e9 images are capped at the largest honest count
    np.testing.assert_array_equal(capped_weights([*counts, 1e9], f=1), [*counts, 400.0])
    np.testing.assert_array_equal(capped_weights([5.0, 1e9, 1e9], f=2), [5.0, 5.0, 5.0])
    assert capped_weights([], f=1).size == 0


def test_f_zero_mixes_everything_into_the_mean_and_one_update_is_itself():
    rng = np.random.default_rng(2)
    updates = heterogeneous_honest(rng, n=3)
    mixed, groups = mix(updates, f=0)
    assert all(sorted(g) == [0, 1, 2] for g in groups)
    mean = np.mean([u["w"] for u in updates], axis=0)
    for m in mixed:
        np.testing.assert_allclose(m["w"], mean, rtol=1e-6)
    alone, groups = mix(updates[:1], f=1)
    assert groups == [[0]]
    np.testing.assert_array_equal(alone[0]["w"], updates[0]["w"])
    assert mix([], f=1) == ([], [])


def test_ties_break_by_index_so_the_result_does_not_depend_on_luck():
    same = [{"w": np.ones(3, dtype=np.float32)} for _ in range(4)]
    assert neighbourhoods(same, f=1) == [[0, 1, 2], [1, 0, 2], [2, 0, 1], [3, 0, 1]]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"strategy": "fedavg", "mixing": "nnm"}, "only makes sense before a robust rule"),
        ({"strategy": "median", "num_malicious": 1, "mixing": "bucket"}, "choose one of"),
    ],
)
def test_bad_mixing_settings_fail_fast(section, message, tiny_cfg):
    with pytest.raises(ConfigError, match=message):
        tiny_cfg("training=federated", federation=section)


def test_robust_rules_accept_nnm(tiny_cfg):
    cfg = tiny_cfg("training=federated", "federation=krum")
    s = validate_federation(cfg)
    assert s.mixing == "nnm"
