"""Evaluation metrics, the decision threshold and fold summaries, against hand-computed cases."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldscope.edge.errors import FieldscopeError
from fieldscope.train.errors import EvaluationError
from fieldscope.train.metrics import (
    ECE_BINS,
    ThresholdChoice,
    choose_threshold,
    classification_report_text,
    compute_metrics,
    evaluate_threshold,
    format_fold_summary,
    summarize_folds,
)

ABC = ["a", "b", "c"]


def one_hot(pred: list[int], n_classes: int) -> np.ndarray:
    return np.eye(n_classes)[pred]


def binary_probs(confidences: list[float], correct: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Two-class rows predicting class 0 with the given confidence, right or wrong."""
    conf = np.asarray(confidences)
    probs = np.stack([conf, 1.0 - conf], axis=1)
    y = np.where(np.asarray(correct), 0, 1)
    return y, probs


def assert_plain_json(value: object) -> None:
    """Only JSON's own types, no numpy scalars hiding inside."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str)
            assert_plain_json(item)
    elif isinstance(value, list):
        for item in value:
            assert_plain_json(item)
    else:
        assert value is None or type(value) in (str, int, float, bool), type(value)


# --------------------------------------------------------------------------- compute_metrics


def test_hand_computed_three_classes() -> None:
    y = [0, 1, 2, 2, 1, 0]
    probs = [
        [0.8, 0.1, 0.1],  # a -> a
        [0.2, 0.7, 0.1],  # b -> b
        [0.1, 0.1, 0.8],  # c -> c
        [0.3, 0.6, 0.1],  # c -> b
        [0.5, 0.4, 0.1],  # b -> a
        [0.4, 0.3, 0.3],  # a -> a
    ]
    m = compute_metrics(y, probs, ABC)

    assert m["n_samples"] == 6
    assert m["labels"] == ABC
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[2, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert m["per_class"]["a"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    )
    assert m["per_class"]["b"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    )
    assert m["per_class"]["c"] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    )
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["macro_precision"] == pytest.approx((2 / 3 + 0.5 + 1.0) / 3)
    assert m["weighted_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)  # equal supports
    assert m["mean_confidence"] == pytest.approx((0.8 + 0.7 + 0.8 + 0.6 + 0.5 + 0.4) / 6)
    assert m["top_k"] == 3
    assert m["top_k_accuracy"] == 1.0


def test_weighted_f1_weights_by_support() -> None:
    # a: 3 samples all right; b: 1 sample predicted as a.
    m = compute_metrics([0, 0, 0, 1], one_hot([0, 0, 0, 0], 2), ["a", "b"])
    f1_a = 2 * 0.75 * 1.0 / 1.75
    assert m["weighted_f1"] == pytest.approx(0.75 * f1_a)
    assert m["macro_f1"] == pytest.approx(f1_a / 2)


def test_class_never_predicted_is_reported_and_counts_in_macro_f1() -> None:
    y = [0, 1, 2, 2]
    m = compute_metrics(y, one_hot([0, 1, 0, 1], 3), ABC)
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert [row[2] for row in m["confusion_matrix"]] == [0, 0, 0]
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [1, 1, 0]]
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0.0) / 3)


def test_class_absent_and_never_predicted_keeps_its_row_but_not_its_weight() -> None:
    labels = [*ABC, "d"]
    m = compute_metrics([0, 1, 2, 2], one_hot([0, 1, 0, 1], 4), labels)
    assert m["per_class"]["d"]["support"] == 0
    assert len(m["confusion_matrix"]) == 4
    assert all(len(row) == 4 for row in m["confusion_matrix"])
    assert m["confusion_matrix"][3] == [0, 0, 0, 0]
    # Same macro-F1 as with three labels: an empty class does not dilute the average.
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0.0) / 3)


def test_perfect_predictions() -> None:
    y = [0, 1, 2, 1, 0, 2]
    m = compute_metrics(y, one_hot(y, 3), ABC)
    assert m["accuracy"] == 1.0
    assert m["macro_f1"] == 1.0
    assert m["weighted_f1"] == 1.0
    assert m["top_k_accuracy"] == 1.0
    assert m["ece"] == 0.0
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    # Confidence exactly 1.0 belongs to the last bin.
    assert m["calibration"]["bins"][-1]["count"] == 6


def test_ties_go_to_the_earlier_label() -> None:
    probs = [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]]
    m = compute_metrics([1, 1, 2], probs, ABC)
    # predictions: a, b, a
    assert m["confusion_matrix"] == [[0, 0, 0], [1, 1, 0], [1, 0, 0]]
    assert m["accuracy"] == pytest.approx(1 / 3)


def test_top_k_with_ties_uses_the_same_order_as_argmax() -> None:
    flat = np.full((2, 4), 0.25)
    m = compute_metrics([2, 3], flat, ["a", "b", "c", "d"])
    assert m["top_k"] == 3
    assert m["top_k_accuracy"] == 0.5  # a, b, c ranked first: c is in, d is out


def test_top3_accuracy_hand_computed() -> None:
    probs = [
        [0.10, 0.50, 0.20, 0.15, 0.05],  # true 0 ranks 4th: miss
        [0.10, 0.50, 0.20, 0.15, 0.05],  # true 2 ranks 2nd: hit
        [0.05, 0.10, 0.15, 0.30, 0.40],  # true 4 ranks 1st: hit
        [0.40, 0.30, 0.20, 0.06, 0.04],  # true 3 ranks 4th: miss
    ]
    m = compute_metrics([0, 2, 4, 3], probs, ["a", "b", "c", "d", "e"])
    assert m["top_k"] == 3
    assert m["top_k_accuracy"] == 0.5
    assert m["accuracy"] == 0.25


def test_top_k_is_capped_by_the_number_of_classes() -> None:
    m = compute_metrics([0, 1, 1], [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]], ["a", "b"])
    assert m["top_k"] == 2
    assert m["top_k_accuracy"] == 1.0


def test_ece_is_zero_on_a_perfectly_calibrated_set() -> None:
    # 7 of 10 right at confidence 0.7, 9 of 10 right at 0.9.
    y1, p1 = binary_probs([0.7] * 10, [True] * 7 + [False] * 3)
    y2, p2 = binary_probs([0.9] * 10, [True] * 9 + [False])
    m = compute_metrics(np.r_[y1, y2], np.r_[p1, p2], ["a", "b"])
    assert m["ece"] == pytest.approx(0.0, abs=1e-12)
    bins = m["calibration"]["bins"]
    assert m["calibration"]["n_bins"] == ECE_BINS == len(bins)
    assert bins[10]["count"] == 10  # (10/15, 11/15] holds 0.7
    assert bins[10]["accuracy"] == pytest.approx(0.7)
    assert bins[13]["count"] == 10  # (13/15, 14/15] holds 0.9
    assert bins[0]["count"] == 0
    assert bins[0]["accuracy"] is None


def test_ece_measures_overconfidence() -> None:
    # 10 samples at 0.9 with half right (gap 0.4) plus 30 calibrated ones at 0.7.
    y1, p1 = binary_probs([0.9] * 10, [True] * 5 + [False] * 5)
    y2, p2 = binary_probs([0.7] * 30, [True] * 21 + [False] * 9)
    m = compute_metrics(np.r_[y1, y2], np.r_[p1, p2], ["a", "b"])
    assert m["ece"] == pytest.approx(10 / 40 * 0.4)
    only_overconfident = compute_metrics(y1, p1, ["a", "b"])
    assert only_overconfident["ece"] == pytest.approx(0.4)


def test_metrics_are_plain_json_and_identical_for_float32_input() -> None:
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(4), size=50).astype(np.float32)
    y = rng.integers(0, 4, size=50)
    m = compute_metrics(y, probs, ["w", "x", "y", "z"])
    assert_plain_json(m)
    assert json.loads(json.dumps(m, allow_nan=False)) == m
    assert compute_metrics(y, probs.astype(np.float64), ["w", "x", "y", "z"]) == m


def test_classification_report_names_every_class() -> None:
    text = classification_report_text([0, 1, 2, 2], one_hot([0, 1, 0, 1], 3), ABC)
    lines = text.splitlines()
    for name in ABC:
        assert any(line.split() and line.split()[0] == name for line in lines)
    assert "top-3 accuracy: 1.000" in text  # three classes: the true one is always in the top 3
    assert f"({ECE_BINS} bins)" in text


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("y_true", "probs", "labels", "fragment"),
    [
        ([0, 1], [[0.5, 0.5], [0.5, 0.5]], ABC, "2 columns but there are 3 labels"),
        ([0, 3], np.full((2, 3), 1 / 3), ABC, "y_true[1] = 3 is not a class index 0..2"),
        ([0, -1], np.full((2, 3), 1 / 3), ABC, "not a class index"),
        ([], np.zeros((0, 3)), ABC, "no predictions to evaluate"),
        ([0], np.full((2, 3), 1 / 3), ABC, "y_true has 1 samples but probs has 2 rows"),
        ([0, 1], [[2.0, -1.0, 0.0], [0.0, 1.0, 3.0]], ABC, "apply softmax"),
        ([0, 1], [[0.9, 0.9, 0.9], [0.1, 0.1, 0.1]], ABC, "must sum to 1"),
        ([0, 1], [[np.nan, 0.5, 0.5], [0.1, 0.1, 0.8]], ABC, "NaN"),
        (["a", "b"], np.full((2, 3), 1 / 3), ABC, "integer class indices"),
        ([0.5, 1.0], np.full((2, 3), 1 / 3), ABC, "integer class indices"),
        (np.eye(3)[[0, 1]], np.full((2, 3), 1 / 3), ABC, "not one-hot"),
        ([0, 1], [0.5, 0.5], ABC, "must be 2-D"),
        ([0, 1], np.full((2, 3), 1 / 3), ["a", "a", "b"], "unique"),
        ([0, 1], np.full((2, 3), 1 / 3), "abc", "list of class names"),
        ([0, 0], np.ones((2, 1)), ["a"], "at least 2 classes"),
    ],
)
def test_bad_inputs_give_one_clear_error(
    y_true: object, probs: object, labels: object, fragment: str
) -> None:
    with pytest.raises(EvaluationError) as info:
        compute_metrics(y_true, probs, labels)  # type: ignore[arg-type]
    assert fragment in str(info.value)
    assert isinstance(info.value, FieldscopeError)
    assert isinstance(info.value, ValueError)


# --------------------------------------------------------------------------- threshold

# Confidence-ordered validation set: precision of the top-n is 1,1,1,1,.8,.83,.71,.63.
CONF = [0.99, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5]
RIGHT = [True, True, True, True, False, True, False, False]


def shuffled(confidences: list[float], correct: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    y, probs = binary_probs(confidences, correct)
    order = np.random.default_rng(7).permutation(len(y))
    return y[order], probs[order]


def test_threshold_is_the_lowest_meeting_the_target_even_past_a_dip() -> None:
    y, probs = shuffled(CONF, RIGHT)
    choice = choose_threshold(y, probs, target_precision=0.8)
    # 0.8 gives 4/5 = 0.8 and 0.7 gives 5/6: the lowest meeting 0.8 is 0.7, not 0.8.
    assert choice.threshold == 0.7
    assert choice.reached
    assert choice.precision == pytest.approx(5 / 6)
    assert choice.coverage == 0.75
    assert choice.n_accepted == 6
    assert choice.n_samples == 8


def test_stricter_target_gives_a_higher_threshold_and_less_coverage() -> None:
    y, probs = shuffled(CONF, RIGHT)
    strict = choose_threshold(y, probs, target_precision=0.9)
    assert strict.threshold == 0.85
    assert strict.precision == 1.0
    assert strict.coverage == 0.5
    assert choose_threshold(y, probs, target_precision=1.0).threshold == 0.85


def test_unreachable_target_falls_back_to_best_precision(caplog: pytest.LogCaptureFixture) -> None:
    # The most confident prediction is wrong: the best precision is 6/7 at 0.6.
    y, probs = shuffled(CONF, [False, True, True, True, True, True, True, False])
    with caplog.at_level(logging.WARNING, logger="fieldscope.train.metrics"):
        choice = choose_threshold(y, probs, target_precision=0.9)
    assert not choice.reached
    assert choice.threshold == 0.6
    assert choice.precision == pytest.approx(6 / 7)
    assert choice.coverage == 7 / 8
    assert "not reached" in caplog.text


def test_all_wrong_never_crashes() -> None:
    y, probs = shuffled(CONF, [False] * 8)
    choice = choose_threshold(y, probs)
    assert not choice.reached
    assert choice.precision == 0.0
    assert choice.coverage == 1.0


def test_min_coverage_turns_a_reachable_target_into_a_fallback() -> None:
    y, probs = shuffled(CONF, RIGHT)
    choice = choose_threshold(y, probs, target_precision=0.8, min_coverage=0.8)
    assert not choice.reached
    assert choice.coverage >= 0.8
    assert choice.threshold == 0.6  # 5/7 beats 5/8 among thresholds covering >= 80 %
    assert choice.precision == pytest.approx(5 / 7)


def test_tied_confidences_are_one_candidate() -> None:
    y, probs = binary_probs([0.9, 0.9, 0.8], [True, False, True])
    choice = choose_threshold(y, probs, target_precision=0.6)
    assert choice.curve_threshold == (0.9, 0.8)
    assert choice.curve_coverage == pytest.approx((2 / 3, 1.0))
    assert choice.threshold == 0.8  # 0.9 alone gives 1/2, 0.8 gives 2/3


def test_threshold_choice_round_trips_through_json() -> None:
    y, probs = shuffled(CONF, RIGHT)
    choice = choose_threshold(y, probs, target_precision=0.8)
    record = json.loads(json.dumps(choice.to_dict(), allow_nan=False))
    assert ThresholdChoice.from_dict(record) == choice
    del record["curve"]
    with pytest.raises(EvaluationError, match="invalid threshold record"):
        ThresholdChoice.from_dict(record)


@pytest.mark.parametrize(
    ("target", "coverage", "fragment"),
    [
        (0.0, 0.0, "target_precision must be in (0, 1]"),
        (1.5, 0.0, "target_precision must be in (0, 1]"),
        ("high", 0.0, "target_precision must be a number"),
        (0.9, 1.1, "min_coverage must be in [0, 1]"),
        (0.9, math.nan, "min_coverage must be in [0, 1]"),
    ],
)
def test_bad_threshold_options(target: object, coverage: float, fragment: str) -> None:
    y, probs = shuffled(CONF, RIGHT)
    with pytest.raises(EvaluationError) as info:
        choose_threshold(y, probs, target_precision=target, min_coverage=coverage)  # type: ignore[arg-type]
    assert fragment in str(info.value)


@settings(max_examples=120, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 60),
    n_classes=st.integers(2, 5),
    decimals=st.sampled_from([1, 2, 6]),
    target=st.floats(0.05, 1.0),
)
def test_threshold_properties(
    seed: int, n: int, n_classes: int, decimals: int, target: float
) -> None:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(n_classes) * 0.5, size=n).round(decimals)  # rounding -> ties
    probs[:, 0] += 1.0 - probs.sum(axis=1)  # keep rows summing to 1
    probs = np.clip(probs, 0.0, 1.0)
    probs /= probs.sum(axis=1, keepdims=True)
    y = rng.integers(0, n_classes, size=n)
    choice = choose_threshold(y, probs, target_precision=target)

    t = np.asarray(choice.curve_threshold)
    cov = np.asarray(choice.curve_coverage)
    prec = np.asarray(choice.curve_precision)
    assert np.all(np.diff(t) < 0), "thresholds strictly decrease"
    assert np.all(np.diff(cov) > 0), "coverage grows as the threshold falls"
    assert cov[-1] == 1.0
    assert np.all((prec >= 0) & (prec <= 1))
    assert choice.threshold in choice.curve_threshold
    # What the choice claims is what the threshold does on the same data.
    check = evaluate_threshold(y, probs, choice.threshold)
    assert check["coverage"] == pytest.approx(choice.coverage)
    assert check["precision"] == pytest.approx(choice.precision)
    meeting = t[prec >= target - 1e-9]
    if choice.reached:
        assert choice.precision >= target - 1e-9
        assert choice.threshold == meeting.min(), "no lower threshold meets the target"
    else:
        assert meeting.size == 0
        assert choice.precision == pytest.approx(prec.max())


def test_evaluate_threshold_on_another_split() -> None:
    y, probs = binary_probs([0.95, 0.9, 0.6, 0.4], [True, False, True, True])
    result = evaluate_threshold(y, probs, 0.85)
    assert result == {"threshold": 0.85, "n_accepted": 2, "coverage": 0.5, "precision": 0.5}
    assert evaluate_threshold(y, probs, 1.0)["precision"] is None


# --------------------------------------------------------------------------- folds


def _fold(n_right: int, labels: list[str] = ABC) -> dict[str, object]:
    y = [0, 1, 2, 0]
    pred = y[:n_right] + [(c + 1) % 3 for c in y[n_right:]]
    return compute_metrics(y, one_hot(pred, 3), labels)


def test_fold_summary_mean_and_sample_sd() -> None:
    folds = [_fold(2), _fold(3), _fold(4)]  # accuracy 0.5, 0.75, 1.0
    summary = summarize_folds(folds)
    accuracy = summary["metrics"]["accuracy"]
    assert summary["n_folds"] == 3
    assert summary["n_samples"] == [4, 4, 4]
    assert accuracy["values"] == [0.5, 0.75, 1.0]
    assert accuracy["mean"] == pytest.approx(0.75)
    assert accuracy["sd"] == pytest.approx(0.25)  # ddof=1
    assert accuracy["min"] == 0.5
    assert accuracy["max"] == 1.0
    assert set(summary["metrics"]) >= {"accuracy", "macro_f1", "top_k_accuracy", "ece"}
    assert json.loads(json.dumps(summary)) == summary
    assert "accuracy: 0.750 ± 0.250" in format_fold_summary(summary)


def test_fold_summary_refuses_what_cannot_be_compared() -> None:
    with pytest.raises(EvaluationError, match="at least 2 folds"):
        summarize_folds([_fold(3)])
    with pytest.raises(EvaluationError, match="different labels"):
        summarize_folds([_fold(3), _fold(3, ["x", "y", "z"])])
    with pytest.raises(EvaluationError, match="no numeric 'accuracy'"):
        summarize_folds([{"labels": ABC}, {"labels": ABC}])
