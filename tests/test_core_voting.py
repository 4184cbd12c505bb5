"""Voting helpers over (answer, reward) lists."""

import math

import pytest

from qalign.core import best_of_n, majority_vote, weighted_vote


def test_majority_vote_counts_and_breaks_ties_by_first_seen():
    assert majority_vote(["a", "b", "b", "a", "c", "b"]) == "b"
    assert majority_vote(["x", "y"]) == "x"
    assert majority_vote([None, None, "z"]) == "z"
    assert majority_vote([]) is None
    assert majority_vote([None]) is None


def test_weighted_vote_uses_softmax_weights():
    answers = ["a", "b", "b"]
    rewards = [2.0, 0.0, 0.0]
    # weights e^2 = 7.39 for a vs 2 for b
    assert weighted_vote(answers, rewards, temperature=1.0) == "a"
    # at high temperature weights flatten and the count wins
    assert weighted_vote(answers, rewards, temperature=100.0) == "b"
    assert weighted_vote(["a", "b"], [math.nan, 1.0]) == "b"
    assert weighted_vote(["a", "b"], [math.inf, 1.0]) == "a"
    assert weighted_vote([], []) is None
    with pytest.raises(ValueError, match="temperature"):
        weighted_vote(["a"], [1.0], temperature=0)
    with pytest.raises(ValueError, match="rewards"):
        weighted_vote(["a"], [])


def test_best_of_n_takes_highest_reward():
    assert best_of_n(["a", "b", "c"], [0.1, 0.9, 0.5]) == "b"
    assert best_of_n(["a", "b"], [1.0, 1.0]) == "a"
    assert best_of_n(["a", None, "c"], [0.1, 5.0, math.nan]) == "a"
    assert best_of_n([], []) is None
