"""qalign.analysis.predict: hand-computed cases for every method, and curves against brute force."""

from __future__ import annotations

import itertools
import math
import random
import re
from collections import Counter

import numpy as np
import pytest

from qalign.analysis.predict import (
    Point,
    Sample,
    Trajectory,
    acceptance_by_step,
    bon_correct,
    bon_index,
    bootstrap_ci,
    chain_groups,
    default_budgets,
    flops,
    independent_curve,
    kept_steps,
    mbr_correct,
    mbr_index,
    mean_state_reward,
    mv_correct,
    parse_budgets,
    qalign_correct,
    qalign_curve,
    qalign_votes,
    rouge1_f1,
    rouge_tokens,
    split_budget,
    subsets_of,
    wmv_correct,
)

NAN = math.nan


def S(answer, correct=None, reward=NAN, gen=0, rm=0, text=""):
    """A sample; by default right when the answer is "y"."""
    return Sample(answer, answer == "y" if correct is None else correct, reward, gen, rm, text)


def chain(answers, accepted=None, gen=None, rm=None, rewards=None):
    """A trajectory from the proposals' answers: the state moves only on accepted steps."""
    n = len(answers)
    accepted = accepted or [True] * n
    gen = gen or [1] * n
    rm = rm or [10] * n
    rewards = rewards or [NAN] * n
    states = []
    for k in range(n):
        if k == 0 or accepted[k]:
            states.append(S(answers[k], reward=rewards[k], gen=gen[k], rm=rm[k], text=answers[k]))
        else:
            states.append(states[-1])
    return Trajectory(
        tuple(states),
        tuple(itertools.accumulate(gen)),
        tuple(itertools.accumulate(rm)),
        tuple(bool(a) or k == 0 for k, a in enumerate(accepted)),
    )


# ---- single predictions (hand-computed) ------------------------------------------------------


def test_majority_vote_counts_answers_ignores_abstentions_and_breaks_ties_by_first_seen():
    assert mv_correct([S("y"), S("n"), S("y"), S(None), S(None), S(None)])  # y 2, n 1
    assert not mv_correct([S("y"), S("n"), S("y"), S("n"), S("n")])  # n 3, y 2
    assert mv_correct([S("y"), S("n")])  # tie: y was first
    assert not mv_correct([S("n"), S("y")])
    assert not mv_correct([S(None), S(None)])  # nobody answered
    assert not mv_correct([])


def test_weighted_vote_uses_softmax_of_reward_over_temperature():
    # y: e^(2/τ); n: 2·e^(0/τ). τ = 1: 7.39 > 2 -> y. τ = 10: e^0.2 = 1.22 < 2 -> n.
    samples = [S("y", reward=2.0), S("n", reward=0.0), S("n", reward=0.0)]
    assert wmv_correct(samples, temperature=1.0)
    assert not wmv_correct(samples, temperature=10.0)
    # τ = 2/ln 2 = 2.885 makes them equal (e^(ln 2) = 2): the first seen (y) wins the tie.
    assert wmv_correct(samples, temperature=2 / math.log(2))
    # Unscored samples do not vote.
    assert not wmv_correct([S("y", reward=NAN), S("n", reward=-5.0)])
    assert not wmv_correct([S("y"), S("y")])  # nothing scored: no answer


def test_best_of_n_picks_the_highest_reward_response_whatever_its_answer():
    samples = [S("n", reward=0.1), S("y", reward=0.9), S("n", reward=NAN), S("n", reward=0.9)]
    assert bon_index(samples) == 1  # ties: first; NaN never wins
    assert bon_correct(samples)
    # A response without an extracted answer can still be right (IFEval): BoN commits to it.
    assert bon_correct([S(None, correct=True, reward=3.0), S("y", reward=1.0)])
    assert not bon_correct([S(None, correct=False, reward=3.0), S("y", reward=1.0)])
    assert bon_index([S("y")]) is None and not bon_correct([S("y")])


def test_rouge1_f1_by_hand():
    assert rouge_tokens("The cat, the HAT!") == ("the", "cat", "the", "hat")
    # overlap: the (min(2, 1) = 1) + hat (1) = 2; P = 2/2, R = 2/4 -> F1 = 2/3
    assert rouge1_f1("The cat, the hat!", "the Hat") == pytest.approx(2 / 3)
    assert rouge1_f1("a b c", "a b c") == 1.0
    assert rouge1_f1("a b", "c d") == 0.0
    assert rouge1_f1("", "a") == 0.0 and rouge1_f1("", "") == 0.0
    assert rouge1_f1("a a b", "a b b") == pytest.approx(2 * 2 / 6)


def test_mbr_picks_the_text_closest_on_average_to_the_others():
    # F1(t0,t1) = 2/3, F1(t0,t2) = 1, F1(t1,t2) = 2/3, t3 shares nothing.
    # mean to the others: t0 (2/3 + 1 + 0)/3 = 5/9, t1 4/9, t2 5/9, t3 0 -> t0 (first of ties).
    texts = ["a b c", "a b d", "a b c", "x y"]
    assert mbr_index(texts) == 0
    assert mbr_index(["x y", "a b d", "a b c", "a b c"]) == 2
    assert mbr_index(["only"]) == 0 and mbr_index([]) is None
    samples = [
        S(None, correct=False, text="x y"),
        S(None, correct=True, text="a b c"),
        S(None, correct=False, text="a b d"),
        S(None, correct=True, text="a b c"),
    ]
    assert mbr_correct(samples)


def test_mbr_matches_the_definition_on_random_multisets():
    rng = random.Random(5)
    words = ["a", "b", "c", "d", "e"]
    for _ in range(200):
        texts = [
            " ".join(rng.choices(words, k=rng.randint(0, 4))) for _ in range(rng.randint(2, 6))
        ]
        scores = [
            sum(rouge1_f1(t, u) for j, u in enumerate(texts) if j != i) / (len(texts) - 1)
            for i, t in enumerate(texts)
        ]
        best = max(scores)
        assert scores[mbr_index(texts)] == pytest.approx(best)
        assert mbr_index(texts) == min(i for i, s in enumerate(scores) if s > best - 1e-9)


# ---- QAlign (hand-computed) ------------------------------------------------------------------


def test_split_budget_is_round_robin_over_levels():
    assert split_budget([3, 3], 0) == [0, 0]
    assert split_budget([3, 3], 1) == [1, 0]
    assert split_budget([3, 3], 2) == [1, 1]
    assert split_budget([3, 3], 3) == [2, 1]
    assert split_budget([3, 3], 5) == [3, 2]
    assert split_budget([3, 3], 99) == [3, 3]
    assert split_budget([1, 4], 3) == [1, 2]  # chain 0 is exhausted after its first state
    assert split_budget([1, 4], 4) == [1, 3]
    assert split_budget([2, 1, 3], 5) == [2, 1, 2]


def test_kept_steps_burn_in_and_thinning():
    assert list(kept_steps(5)) == [0, 1, 2, 3, 4]
    assert list(kept_steps(5, burn_in=2, thin=2)) == [2, 4]
    assert list(kept_steps(6, burn_in=1, thin=3)) == [1, 4]
    assert list(kept_steps(2, burn_in=3)) == [1]  # all burnt in: the last used state votes
    assert list(kept_steps(0, burn_in=3)) == []
    with pytest.raises(ValueError):
        kept_steps(3, thin=0)


def test_qalign_votes_states_with_burn_in_and_pooling():
    # chain A proposes x, x, y, y (all accepted); chain B: y, y, (z rejected), z accepted.
    a = chain(["x", "x", "y", "y"], gen=[3, 2, 2, 2])
    b = chain(["y", "y", "z", "z"], accepted=[True, True, False, True], gen=[2, 2, 2, 2])
    assert [s.answer for s in b.states] == ["y", "y", "y", "z"]
    # budget 2 -> one state each: x, y -> tie -> x (first) -> wrong
    assert not qalign_correct([a, b], 2)
    # budget 4 -> two each: x x | y y -> tie -> x
    assert not qalign_correct([a, b], 4)
    # budget 6 -> three each: x x y | y y y -> y 4:2
    assert qalign_correct([a, b], 6)
    # burn-in 1, budget 4: A keeps step 1 (x), B keeps step 1 (y) -> tie -> x
    assert not qalign_correct([a, b], 4, burn_in=1)
    # burn-in 2, budget 4: nothing left, each chain votes with its last used state: x, y -> x
    votes, _, _ = qalign_votes([a, b], 4, burn_in=2)
    assert [v.answer for v in votes] == ["x", "y"]
    # burn-in 2, budget 8: A y y, B y z -> y
    assert qalign_correct([a, b], 8, burn_in=2)
    # thinning 2 over budget 8: A steps 0, 2 (x, y); B steps 0, 2 (y, y) -> y
    votes, gen, rm = qalign_votes([a, b], 8, thin=2)
    assert [v.answer for v in votes] == ["x", "y", "y", "y"]
    assert (gen, rm) == (9 + 8, 40 + 40)
    # budget 3 -> A two states, B one: tokens 3 + 2 (A) + 2 (B), RM 10 per step
    _, gen, rm = qalign_votes([a, b], 3)
    assert (gen, rm) == (7, 30)
    assert qalign_correct([a, b], 8, select="mbr") == (
        mbr_correct([*a.states, *b.states])  # the same states, chosen by MBR over their texts
    )


def test_chain_groups_and_qalign_curve_by_hand():
    a = chain(["x", "y", "y"])
    b = chain(["y", "y", "y"])
    assert chain_groups([a, b], None) == [[a, b]]
    assert chain_groups([a, b], 1) == [[a], [b]]
    assert chain_groups([a, b, a], 2) == [[a, b]]
    # prompt 1: chains a, b; prompt 2: chain a only.
    chains = {1: [a, b], 2: [a]}
    pts = qalign_curve(chains, [1, 2, 3, 6], resamples=0)
    # budget 1: p1 votes x (wrong); p2 x (wrong) -> 0
    # budget 2: p1 x, y -> tie x -> 0; p2 x, y -> x -> 0
    # budget 3: p1 a: x y, b: y -> y (1); p2 x y y -> y (1) -> 1
    # budget 6: p1 all: x y y y y y -> 1; p2 (only 3 states) -> 1
    assert [p.accuracy for p in pts] == [0.0, 0.0, 1.0, 1.0]
    assert [p.gen_tokens for p in pts] == [1.0, 2.0, 3.0, 4.5]  # p2 stops at 3 states
    assert [p.reward_tokens for p in pts] == [10.0, 20.0, 30.0, 45.0]
    # One chain per prediction (pool=1), averaged: p1 = mean(a, b), p2 = a.
    pts = qalign_curve(chains, [1, 3], pool=1, resamples=0)
    # budget 1: a x (0), b y (1) -> p1 0.5; p2 0 -> 0.25; budget 3: a y, b y -> 1; p2 1 -> 1
    assert [p.accuracy for p in pts] == [0.25, 1.0]
    assert [p.budget for p in qalign_curve(chains, resamples=0)] == [1, 2, 4, 6]


def test_traces_by_hand():
    a = chain(["x", "y", "z"], accepted=[True, False, True], rewards=[1.0, 5.0, 3.0])
    b = chain(["x", "y", "z"], accepted=[True, True, True], rewards=[0.0, 2.0, NAN])
    # states: a 1, 1, 3; b 0, 2, (unscored)
    assert mean_state_reward([a, b]) == [(0, 0.5, 2), (1, 1.5, 2), (2, 3.0, 1)]
    assert acceptance_by_step([a, b]) == [(1, 0.5, 2), (2, 1.0, 2)]


# ---- curves (hand-computed) ------------------------------------------------------------------

P1 = [S("y", gen=1), S("b", gen=2), S("b", gen=3)]
P2 = [S("y", gen=10), S("y", gen=10), S("d", gen=10)]


def test_mv_curve_averages_every_subset_when_there_are_few():
    pts = independent_curve({1: P1, 2: P2}, "mv", [1, 2, 3], resamples=0)
    # n=1: P1 1/3, P2 2/3 -> 1/2. n=2: P1 {y,b}: y, {y,b}: y, {b,b}: b -> 2/3; P2 all y -> 1.
    # n=3: P1 b (0), P2 y (1) -> 1/2.
    assert [p.accuracy for p in pts] == pytest.approx([0.5, 5 / 6, 0.5])
    # tokens: n=2 P1 subsets cost 3, 4, 5 -> 4; P2 20 -> 12 per prompt; MV uses no RM.
    assert [p.gen_tokens for p in pts] == pytest.approx([6.0, 12.0, 18.0])
    assert all(p.reward_tokens == 0 for p in pts)
    assert [p.prompts for p in pts] == [2, 2, 2]
    assert pts[1].flops is None
    with_params = independent_curve(
        {1: P1, 2: P2}, "mv", [2], resamples=0, params={"generator": 1e9}
    )
    assert with_params[0].flops == pytest.approx(2 * 1e9 * 12)


def test_first_n_instead_of_subsets():
    pts = independent_curve({1: P1, 2: P2}, "mv", [1, 2, 3], subsets=0, resamples=0)
    # n=1: y, y -> 1. n=2: P1 y b -> tie y; P2 y y -> 1. n=3: 1/2.
    assert [p.accuracy for p in pts] == [1.0, 1.0, 0.5]


def test_bon_and_wmv_curves_count_reward_tokens():
    pool = [S("b", reward=0.0, gen=1, rm=5), S("y", reward=1.0, gen=1, rm=5)]
    bon = independent_curve({0: pool}, "bon", [1, 2], resamples=0)
    assert [p.accuracy for p in bon] == [0.5, 1.0]
    assert [p.reward_tokens for p in bon] == [5.0, 10.0]
    wmv = independent_curve({0: pool}, "wmv", [2], resamples=0, temperature=1.0)
    assert wmv[0].accuracy == 1.0
    assert wmv[0].flops is None  # reward tokens but no reward-model size
    params = {"generator": 8e9, "reward": 2e9}
    wmv = independent_curve({0: pool}, "wmv", [2], resamples=0, params=params)
    assert wmv[0].flops == pytest.approx(2 * 8e9 * 2 + 2 * 2e9 * 10)


def test_budget_helpers_and_flops():
    assert default_budgets(22) == [1, 2, 4, 8, 16, 22]
    assert default_budgets(16) == [1, 2, 4, 8, 16]
    assert default_budgets(1) == [1] and default_budgets(0) == []
    assert parse_budgets("4, 1,2,2") == [1, 2, 4]
    for bad in ("", "0,1", "a", "-1"):
        with pytest.raises(ValueError):
            parse_budgets(bad)
    assert flops(100, 200, {"generator": 8e9, "reward": 8e9}) == pytest.approx(4.8e12)
    assert flops(100, 200, {"generator": 8e9}) is None
    assert flops(100, 0, {"generator": 8e9}) == pytest.approx(1.6e12)
    assert flops(100, 0, None) is None
    assert subsets_of(5, 2, 0, "k") == [(0, 1)]
    assert subsets_of(4, 2, 100, "k") == list(itertools.combinations(range(4), 2))
    drawn = subsets_of(10, 5, 7, "k")
    assert len(drawn) == 7 and drawn == subsets_of(10, 5, 7, "k")  # seeded
    assert all(list(d) == sorted(set(d)) and len(d) == 5 for d in drawn)


def test_bootstrap_interval_matches_the_exact_resampling_distribution():
    # values 0, 0, 1: the resampled mean is k/3, k ~ Binomial(3, 1/3):
    # P = 8/27, 12/27, 6/27, 1/27; the 5% and 95% quantiles are 0 and 2/3, the 97.5% one is 1.
    mean, lo, hi = bootstrap_ci([0, 0, 1], resamples=20000, seed=1, confidence=0.90)
    assert mean == pytest.approx(1 / 3)
    assert (lo, hi) == (0.0, pytest.approx(2 / 3))
    _, lo, hi = bootstrap_ci([0, 0, 1], resamples=20000, seed=1, confidence=0.95)
    assert (lo, hi) == (0.0, 1.0)
    assert bootstrap_ci([1, 1, 1], resamples=100) == (1.0, 1.0, 1.0)
    mean, lo, hi = bootstrap_ci([0.5, 1], resamples=0)
    assert mean == 0.75 and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(x) for x in bootstrap_ci([]))
    assert bootstrap_ci([0, 1, 1, 0, 1], seed=3) == bootstrap_ci([0, 1, 1, 0, 1], seed=3)


def test_curve_interval_is_the_bootstrap_of_per_prompt_values():
    pools = {k: [S("y" if (k + i) % 3 else "n") for i in range(4)] for k in range(10)}
    (pt,) = independent_curve(pools, "mv", [1], resamples=500, seed=7)
    values = [sum(s.correct for s in pool) / 4 for pool in pools.values()]
    assert (pt.accuracy, pt.ci_low, pt.ci_high) == pytest.approx(
        bootstrap_ci(values, resamples=500, seed=7)
    )
    assert pt.ci_low <= pt.accuracy <= pt.ci_high


# ---- curves against brute force -------------------------------------------------------------


def _brute_choice(method, subset, tau):
    """An independent, naive implementation of each rule: the index of the chosen sample (MV and
    WMV: any sample with the chosen answer), or None."""
    if method == "mv":
        counts = Counter(s.answer for s in subset if s.answer is not None)
        if not counts:
            return None
        top = max(counts.values())
        winner = next(s.answer for s in subset if s.answer is not None and counts[s.answer] == top)
        return next(i for i, s in enumerate(subset) if s.answer == winner)
    if method == "wmv":
        weights: dict[str, float] = {}
        for s in subset:
            if s.answer is not None and not math.isnan(s.reward):
                weights[s.answer] = weights.get(s.answer, 0.0) + math.exp(s.reward / tau)
        if not weights:
            return None
        top = max(weights.values())
        order = [s.answer for s in subset if s.answer in weights]
        winner = next(a for a in order if weights[a] >= top * (1 - 1e-12))
        return next(i for i, s in enumerate(subset) if s.answer == winner)
    if method == "bon":
        scored = [(s.reward, -i) for i, s in enumerate(subset) if not math.isnan(s.reward)]
        return -max(scored)[1] if scored else None
    if method == "mbr":

        def toks(t):
            return re.findall(r"[a-z0-9]+", t.lower())

        def f1(a, b):
            ca, cb = Counter(toks(a)), Counter(toks(b))
            o = sum((ca & cb).values())
            return 0.0 if o == 0 else 2 * o / (sum(ca.values()) + sum(cb.values()))

        if len(subset) == 1:
            return 0
        scores = [
            sum(f1(s.text, t.text) for j, t in enumerate(subset) if j != i) / (len(subset) - 1)
            for i, s in enumerate(subset)
        ]
        best = max(scores)
        return next(i for i, x in enumerate(scores) if x > best - 1e-9)
    raise AssertionError(method)


def _random_pools(rng, prompts, size):
    pools = {}
    for k in range(prompts):
        pool = []
        for _ in range(size):
            answer = rng.choice(["y", "n", "m", None])
            text = " ".join(rng.choices(["a", "b", "c", "d"], k=rng.randint(1, 4)))
            reward = NAN if rng.random() < 0.15 else rng.uniform(-2, 2)
            correct = answer == "y" if answer is not None else rng.random() < 0.5
            pool.append(
                Sample(answer, correct, reward, rng.randint(1, 9), rng.randint(5, 20), text)
            )
        pools[k] = pool
    return pools


def _brute_curve(pools, method, n, tau):
    values, gens = [], []
    for pool in pools.values():
        subs = list(itertools.combinations(pool, min(n, len(pool))))
        right = 0
        for sub in subs:
            i = _brute_choice(method, sub, tau)
            right += i is not None and sub[i].correct
        values.append(right / len(subs))
        gens.append(sum(sum(s.gen_tokens for s in sub) for sub in subs) / len(subs))
    return float(np.mean(values)), float(np.mean(gens))


@pytest.mark.parametrize("method", ["mv", "wmv", "bon", "mbr"])
def test_curves_equal_brute_force_over_every_subset(method):
    rng = random.Random(["mv", "wmv", "bon", "mbr"].index(method))
    pools = _random_pools(rng, prompts=12, size=6)
    pts = independent_curve(pools, method, [1, 2, 3, 4, 5, 6], subsets=20, resamples=0)
    for p in pts:  # C(6, n) <= 20 for every n: enumerated exactly
        acc, gen = _brute_curve(pools, method, p.budget, 1.0)
        assert p.accuracy == pytest.approx(acc, abs=1e-12), (method, p.budget)
        assert p.gen_tokens == pytest.approx(gen)


@pytest.mark.parametrize("method", ["mv", "bon"])
def test_random_subsets_approach_brute_force(method):
    rng = random.Random(11)
    pools = _random_pools(rng, prompts=60, size=10)  # C(10, 5) = 252 subsets per prompt
    (pt,) = independent_curve(pools, method, [5], subsets=64, resamples=0, seed=2)
    acc, _ = _brute_curve(pools, method, 5, 1.0)
    assert pt.accuracy == pytest.approx(acc, abs=0.03)
    (again,) = independent_curve(pools, method, [5], subsets=64, resamples=0, seed=2)
    assert again == pt  # seeded


def _brute_qalign(chains, n, burn_in, thin):
    """Round-robin by literally dealing steps level by level, then counting votes."""
    lengths = [c.length for c in chains]
    used = [0] * len(chains)
    left = n
    for _level in range(max(lengths)):
        for j in range(len(chains)):
            if left and used[j] < lengths[j]:
                used[j] += 1
                left -= 1
    votes = []
    for c, u in zip(chains, used, strict=True):
        if u == 0:
            continue
        kept = [k for k in range(u) if k >= burn_in and (k - burn_in) % thin == 0] or [u - 1]
        votes += [c.states[k] for k in kept]
    counts = Counter(v.answer for v in votes if v.answer is not None)
    if not counts:
        return False
    top = max(counts.values())
    winner = next(v.answer for v in votes if v.answer is not None and counts[v.answer] == top)
    return winner == "y"


def test_qalign_curve_equals_brute_force():
    rng = random.Random(3)
    chains = {}
    for k in range(25):
        cs = []
        for _ in range(rng.randint(1, 3)):
            n = rng.randint(1, 7)
            cs.append(
                chain(
                    [rng.choice(["y", "n", "m", None]) for _ in range(n)],
                    accepted=[rng.random() < 0.5 for _ in range(n)],
                )
            )
        chains[k] = cs
    for burn_in, thin in [(0, 1), (1, 1), (2, 2), (5, 3)]:
        budgets = list(range(1, 22))
        pts = qalign_curve(chains, budgets, burn_in=burn_in, thin=thin, resamples=0)
        for p in pts:
            expected = np.mean(
                [_brute_qalign(cs, p.budget, burn_in, thin) for cs in chains.values()]
            )
            assert p.accuracy == pytest.approx(expected), (burn_in, thin, p.budget)


def test_points_are_plain_data():
    (pt,) = independent_curve({0: [S("y")]}, "mv", [1], resamples=10)
    assert isinstance(pt, Point) and pt.accuracy == 1.0 and pt.budget == 1
