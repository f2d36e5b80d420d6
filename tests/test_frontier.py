"""Frontier arithmetic: AUROC, temperature fitting and the per-lever row, on constructed items."""

import numpy as np
import pytest

from fedhlm_app.reporting import evaluation as ev
from fedhlm_app.reporting.frontier import fit_temperature, frontier_row
from fedhlm_app.slm.uncertainty import with_temperature


def test_auroc_is_one_for_a_perfect_detector_half_for_ties_and_matches_pair_counting():
    positive = np.array([True, False, True, False, False])
    assert ev.auroc(np.array([0.9, 0.1, 0.8, 0.2, 0.3]), positive) == 1.0
    assert ev.auroc(np.zeros(5), positive) == 0.5
    rng = np.random.default_rng(0)
    score, pos = rng.integers(0, 4, 60).astype(float), rng.random(60) < 0.3
    pairs = [(a > b) + 0.5 * (a == b) for a in score[pos] for b in score[~pos]]
    assert ev.auroc(score, pos) == pytest.approx(np.mean(pairs))


@pytest.mark.parametrize("true_temperature", [0.5, 2.0])
def test_fit_temperature_recovers_the_temperature_that_generated_the_labels(true_temperature):
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.full(4, 0.7), size=4000)
    calibrated = with_temperature(probs, true_temperature)
    labels = np.array([rng.choice(4, p=p) for p in calibrated])
    assert fit_temperature(probs, labels) == pytest.approx(true_temperature, rel=0.15)


def test_frontier_row_escalates_the_most_uncertain_items_and_never_beats_the_oracle():
    # Four items; the SLM is wrong on the two least confident ones, the LLM always right.
    p = np.array([[0.99, 0.01], [0.9, 0.1], [0.6, 0.4], [0.55, 0.45]] * 25)
    slm = np.array([True, True, False, False] * 25)
    items = {"p": p, "slm": slm, "llm": np.ones(100, bool), "p_cal": p, "y_cal": np.where(slm, 0, 1)}
    row = frontier_row(items, "margin")
    assert row["slm_accuracy"] == 0.5 and row["auroc"] == 1.0
    assert row["acc@10%"] == pytest.approx(0.6) == row["oracle@10%"]  # the 10 escalated items were all mistakes
    assert row["measures"]["entropy"]["auroc"] == 1.0
