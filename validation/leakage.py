"""Label leakage: does one clinical feature, on its own, give the label away?

A feature's score (0–1) is the larger of two measures, each taken over the label's targets:
every class against the rest and, when the dataset names them, its dangerous classes against
the rest.

* **exclusion**: a value of the feature that never (or almost never) occurs with the target,
  on a share of the rows large enough to mean it: ``1 − U / p``, where ``p`` is the target's
  rate among the rows with a value and ``U`` the 95 % upper confidence bound (Clopper-Pearson)
  of its rate among the rows holding that value. PAD-UFES-20's ``biopsed`` is true for every
  cancer: among its 309 ``False`` rows the cancer rate is at most 2.6 % of the overall 38 %, a
  score of 0.97. Its single-feature AUROC is only 0.85 (118 non-cancers were biopsied too),
  which is why AUROC alone misses it. A small cell cannot score high (its bound stays wide),
  and the target's complement is tried too (a value only the target ever has).
* **AUROC**: the 95 % lower confidence bound (Hanley & McNeil) of the cross-validated AUROC
  of the feature alone (numbers by their value; a category or boolean by the out-of-fold
  target rate of its value), oriented either way: a feature that separates the target almost
  perfectly.

Missing values take no part: a feature is judged on the rows that have it. Whether being
missing is itself associated with the label (PAD's older collection lacks 13 columns and
holds no cancer) is measured the same way (`missingness`) and reported as a warning, not a
failure: it says something about how the data were collected, not about the feature.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from validation.clinical_schema import ClinicalFeature, is_missing, parse_value

CONFIDENCE = 0.95  # one-sided level of both measures' confidence bounds
Z_ONE_SIDED = 1.6449  # the standard normal quantile at CONFIDENCE
FOLDS = 5
ON_LEAKAGE = ("stop", "drop")
DANGEROUS = "dangerous"


@dataclass(frozen=True)
class LeakageSettings:
    """How validation looks for leaking features (`dataset.clinical`)."""

    max_score: float = 0.95  # leakage_max_score: above it a feature leaks
    on_leakage: str = "stop"  # stop | drop
    dangerous: tuple[str, ...] = ()  # dataset.dangerous: one more target (those vs the rest)
    label_column: str = "label"
    # rows scored: all but these splits (the test data never decides the schema)
    held_out_splits: tuple[str, ...] = ("test", "calibration")
    split_column: str = "split"


@dataclass(frozen=True)
class FeatureLeakage:
    """One feature's leakage score and what produced it."""

    feature: str
    score: float
    measure: str  # exclusion | auroc
    target: str  # a class name, or "dangerous"
    reason: str  # a sentence naming the value and the rows
    exclusion: float
    auroc: float  # the AUROC measure: the lower confidence bound
    missingness: float  # the exclusion score of "no value" (reported, never failing)
    missingness_reason: str = ""

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def development_rows(table: pd.DataFrame, settings: LeakageSettings) -> pd.DataFrame:
    """The rows leakage is scored on: every row not in a held-out split."""
    if settings.split_column not in table.columns:
        return table
    return table[~table[settings.split_column].astype(str).isin(settings.held_out_splits)]


def leakage_scores(
    table: pd.DataFrame,
    labels: Sequence[str],
    features: Iterable[ClinicalFeature],
    dangerous: Sequence[str] = (),
    seed: int = 0,
) -> list[FeatureLeakage]:
    """Each feature's leakage score on `table` (one column per feature, raw or typed values;
    unreadable values count as missing, the type checks report them)."""
    labels = pd.Series(list(labels), index=table.index, dtype=str)
    targets = _targets(labels, dangerous)
    return [_score(f, _values(table[f.name], f), targets, seed) for f in features]


def _targets(labels: pd.Series, dangerous: Sequence[str]) -> dict[str, np.ndarray]:
    """Target name -> 0/1 membership; a target equal to another or to its complement once."""
    candidates = {DANGEROUS: labels.isin(list(dangerous)).to_numpy()} if dangerous else {}
    candidates |= {str(c): (labels == c).to_numpy() for c in sorted(labels.unique())}
    out: dict[str, np.ndarray] = {}
    seen: set[bytes] = set()
    for name, member in candidates.items():
        keys = {member.tobytes(), (~member).tobytes()}
        if member.all() or not member.any() or keys & seen:
            continue
        seen |= keys
        out[name] = member
    return out


def _values(column: pd.Series, feature: ClinicalFeature) -> pd.Series:
    """Parsed values (object), None where missing or unreadable."""

    def parse(value):
        if is_missing(value):
            return None
        try:
            return parse_value(feature, value)
        except ValueError:
            return None

    return pd.Series([parse(v) for v in column], index=column.index, dtype=object)


def _score(
    feature: ClinicalFeature, values: pd.Series, targets: dict[str, np.ndarray], seed: int
) -> FeatureLeakage:
    present = values.notna().to_numpy()
    best_exclusion: tuple[float, str, str] = (0.0, "", "")
    best_auroc: tuple[float, float, str] = (0.5, 0.5, "")
    missing: tuple[float, str] = (0.0, "")
    for name, member in targets.items():
        exclusion = _exclusion(feature.name, values[present], member[present], name)
        best_exclusion = max(best_exclusion, exclusion, key=lambda e: e[0])
        lower, auroc = _auroc(feature, values[present], member[present], seed)
        if lower > best_auroc[0]:
            best_auroc = (lower, auroc, name)
        gap, _, gap_reason = _exclusion(
            feature.name, pd.Series(present), member, name, missing_cell=True
        )
        if gap > missing[0]:
            missing = (gap, gap_reason)
    exclusion_score, exclusion_target, exclusion_reason = best_exclusion
    auroc_score, auroc, auroc_target = best_auroc
    if exclusion_score >= auroc_score:
        measure, score, target = "exclusion", exclusion_score, exclusion_target
        reason = exclusion_reason
    else:
        measure, score, target = "auroc", auroc_score, auroc_target
        reason = (
            f"{feature.name} alone separates {_target_words(target)} from the rest with a "
            f"cross-validated AUROC of {auroc:.3f} ({CONFIDENCE:.0%} lower bound "
            f"{auroc_score:.3f}, on {int(present.sum())} rows with a value)"
        )
    return FeatureLeakage(
        feature=feature.name,
        score=round(float(score), 4),  # what reports print is what is compared
        measure=measure,
        target=target,
        reason=reason,
        exclusion=float(exclusion_score),
        auroc=float(auroc_score),
        missingness=float(missing[0]),
        missingness_reason=missing[1],
    )


def _exclusion(
    name: str, values: pd.Series, member: np.ndarray, target: str, missing_cell: bool = False
) -> tuple[float, str, str]:
    """(score, target, reason) of the value that best rules the target (or its complement)
    out. With `missing_cell`, `values` is the has-a-value mask and only "no value" counts."""
    from scipy.stats import beta

    best: tuple[float, str, str] = (0.0, target, "")
    if not len(values):
        return best
    cells = pd.Series(member.astype(int), index=values.index).groupby(values.astype(str).to_numpy())
    stats = cells.agg(["sum", "count"])
    if missing_cell:
        stats = stats.loc[[k for k in stats.index if k == "False"]]
        if stats.empty:
            return best
    n_all = len(values)
    for inverted in (False, True):
        hits = (stats["count"] - stats["sum"]) if inverted else stats["sum"]
        rate = (n_all - member.sum()) / n_all if inverted else member.sum() / n_all
        if rate == 0:
            continue
        n, k = stats["count"].to_numpy(), hits.to_numpy()
        upper = np.where(k < n, beta.ppf(CONFIDENCE, k + 1, np.maximum(n - k, 1)), 1.0)
        scores = 1.0 - upper / rate
        i = int(np.argmax(scores))
        if scores[i] > best[0]:
            value = "no value" if missing_cell else f"{name}={stats.index[i]}"
            what = _target_words(target, inverted)
            counted = "never" if k[i] == 0 else f"only {k[i]} times"
            reason = (
                f"the {n[i]} rows with {value} ({n[i] / n_all:.0%} of {n_all}) are {counted} "
                f"{what} ({k[i] / n[i]:.1%} against {rate:.1%} overall; "
                f"score = 1 - {upper[i]:.3f} / {rate:.3f}, the {CONFIDENCE:.0%} upper bound "
                "of its rate there over the overall rate)"
            )
            best = (float(scores[i]), target, reason)
    return best


def _target_words(target: str, inverted: bool = False) -> str:
    words = "a dangerous class" if target == DANGEROUS else f"{target!r}"
    return f"anything but {words}" if inverted else words


def _auroc(
    feature: ClinicalFeature, values: pd.Series, member: np.ndarray, seed: int
) -> tuple[float, float]:
    """(lower confidence bound, value) of the cross-validated single-feature AUROC, oriented
    either way ((0.5, 0.5): not computable)."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    positives = int(member.sum())
    folds = min(FOLDS, positives, len(member) - positives)
    if folds < 2:
        return 0.5, 0.5
    if feature.numeric:
        score = values.astype(float).to_numpy()
    else:
        cells = values.astype(str).to_numpy()
        score = np.zeros(len(member))
        splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
        for fit, held in splitter.split(cells, member):
            rates = pd.Series(member[fit].astype(float)).groupby(cells[fit]).agg(["sum", "count"])
            prior = member[fit].mean()
            encoded = (rates["sum"] + prior) / (rates["count"] + 1)  # one pseudo-row of prior
            score[held] = pd.Series(cells[held]).map(encoded).fillna(prior).to_numpy()
    auroc = float(roc_auc_score(member, score))
    auroc = max(auroc, 1.0 - auroc)
    return _lower_bound(auroc, positives, len(member) - positives), auroc


def _lower_bound(auroc: float, positives: int, negatives: int) -> float:
    """The one-sided 95 % lower confidence bound of an AUROC (Hanley & McNeil's standard
    error, the larger of its two orientations): a small class cannot reach a high score by
    chance."""
    q1, q2 = auroc / (2 - auroc), 2 * auroc**2 / (1 + auroc)

    def variance(first: int, second: int) -> float:
        spread = (first - 1) * (q1 - auroc**2) + (second - 1) * (q2 - auroc**2)
        return (auroc * (1 - auroc) + spread) / (first * second)

    worst = max(variance(positives, negatives), variance(negatives, positives), 0.0)
    return max(0.5, auroc - Z_ONE_SIDED * float(np.sqrt(worst)))


def leakage_frame(scores: list[FeatureLeakage]) -> pd.DataFrame:
    """One row per feature: what the GX leakage expectation reads."""
    return pd.DataFrame(
        {
            "feature": pd.array([s.feature for s in scores], dtype="string"),
            "leakage_score": np.array([s.score for s in scores], dtype="float64"),
            "measure": pd.array([s.measure for s in scores], dtype="string"),
            "target": pd.array([s.target for s in scores], dtype="string"),
        }
    )
