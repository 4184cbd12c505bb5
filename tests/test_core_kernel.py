"""Acceptance math and edge cases of the pure kernel."""

from __future__ import annotations

import math

import pytest

from qalign.core import (
    Block,
    Finish,
    KernelConfig,
    Method,
    RejectReason,
    State,
    StepPlan,
    Uniform,
    Zero,
    check_continuation,
    decide,
    generator_seed,
    index_distribution,
    log_acceptance,
    make_proposal,
    plan_initial,
    plan_step,
)
from qalign.core.rng import Purpose, uniform

EOS = 1


def st(tokens, reward=0.0, finish=Finish.STOP, logprobs=None):
    return State(tuple(tokens), reward, finish, None if logprobs is None else tuple(logprobs))


def plan(cut, prefix=(), max_tokens=10, u=0.5):
    return StepPlan(1, cut, tuple(prefix), max_tokens, 0, u)


CFG = KernelConfig(beta=2.0, max_new_tokens=10)


def test_log_acceptance_is_reward_difference_plus_length_ratio():
    cur = st([5, 6, 7, EOS], reward=1.0)
    prop = st([5, 8, EOS], reward=2.0)
    expected = (2.0 - 1.0) / 2.0 + math.log(4) - math.log(3)
    assert log_acceptance(CFG, plan(1, [5]), cur, prop) == pytest.approx(expected)
    d = decide(CFG, plan(1, [5], u=0.999), cur, prop)
    assert d.alpha == 1.0 and d.accepted and d.reason is None


def test_alpha_is_exp_of_log_a_below_one_and_u_decides():
    cur = st([5, 6, EOS], reward=3.0)
    prop = st([5, 6, 7, EOS], reward=1.0)
    log_a = (1.0 - 3.0) / 2.0 + math.log(3) - math.log(4)
    d_lo = decide(CFG, plan(2, [5, 6], u=math.exp(log_a) - 1e-9), cur, prop)
    d_hi = decide(CFG, plan(2, [5, 6], u=math.exp(log_a) + 1e-9), cur, prop)
    assert d_lo.alpha == pytest.approx(math.exp(log_a))
    assert d_lo.accepted and not d_hi.accepted


def test_clamp_bounds_the_ratio_but_log_a_is_recorded_unclamped():
    cfg = KernelConfig(beta=0.01, max_new_tokens=10, clamp=5.0)
    cur = st([5, EOS], reward=10.0)
    prop = st([5, EOS], reward=0.0)
    d = decide(cfg, plan(0, u=0.0), cur, prop)
    assert d.log_a == pytest.approx(-1000.0)
    assert d.alpha == pytest.approx(math.exp(-5.0))
    assert d.accepted  # u = 0 < e^-5: the clamp keeps every move possible


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_proposal_reward_is_rejected_with_reason(bad):
    cur = st([5, EOS], reward=0.0)
    d = decide(CFG, plan(0, u=0.0), cur, st([6, EOS], reward=bad))
    assert not d.accepted and d.alpha == 0.0 and d.reason is RejectReason.NON_FINITE_REWARD
    assert not math.isnan(d.alpha)


def test_non_finite_current_reward_is_replaced_by_any_scored_proposal():
    cur = st([5, EOS], reward=math.nan)
    d = decide(CFG, plan(0, u=0.99), cur, st([6, EOS], reward=-3.0))
    assert d.accepted and d.alpha == 1.0


def test_length_one_state_can_only_be_cut_at_zero():
    cur = st([EOS])  # EOS-only response: a valid state of length 1
    for k in range(50):
        p = plan_step(CFG, cur, seed=1, chain="c", step=k + 1)
        assert p.cut == 0 and p.prefix == () and p.max_tokens == 10


def test_eos_counts_in_length_so_the_cut_can_land_on_it():
    cur = st([5, 6, EOS])
    cuts = {plan_step(CFG, cur, seed=3, chain="c", step=k).cut for k in range(1, 200)}
    assert cuts == {0, 1, 2}


def test_budget_shrinks_with_the_cut_and_over_budget_is_unusable():
    cfg = KernelConfig(beta=1.0, max_new_tokens=4)
    cur = st([5, 6, 7, 8], finish=Finish.LENGTH)
    for k in range(1, 100):
        p = plan_step(cfg, cur, seed=0, chain="x", step=k)
        assert p.max_tokens == 4 - p.cut >= 1
    p = plan(2, [5, 6], max_tokens=2)
    assert check_continuation(cfg, p, (9, 9, 9), Finish.LENGTH, None) is RejectReason.OVER_BUDGET
    assert check_continuation(cfg, p, (9, 9), Finish.LENGTH, None) is None
    assert check_continuation(cfg, p, (9,), Finish.LENGTH, None) is RejectReason.EARLY_LENGTH_STOP
    assert check_continuation(cfg, p, (), Finish.STOP, None) is RejectReason.EMPTY_CONTINUATION
    with pytest.raises(ValueError, match="more than max_new_tokens"):
        plan_step(cfg, st([5, 6, 7, 8, 9]), seed=0, chain="x", step=1)


def test_unusable_proposal_is_rejected_and_alpha_zero():
    cur = st([5, EOS])
    d = decide(CFG, plan(0), cur, None, RejectReason.EMPTY_CONTINUATION)
    assert not d.accepted and d.alpha == 0.0 and d.reason is RejectReason.EMPTY_CONTINUATION


def test_quest_adds_suffix_logprob_difference():
    cfg = KernelConfig(beta=1.0, max_new_tokens=10, method=Method.QUEST)
    cur = st([5, 6, EOS], reward=1.0, logprobs=[-0.1, -0.2, -0.3])
    p = plan(1, [5])
    prop = make_proposal(p, cur, (7, 8, EOS), Finish.STOP, 0.5, (-1.0, -2.0, -0.5))
    assert prop.tokens == (5, 7, 8, EOS)
    assert prop.logprobs == (-0.1, -1.0, -2.0, -0.5)
    expected = (0.5 - 1.0) + math.log(3) - math.log(4) + (-0.5) - (-3.5)
    assert log_acceptance(cfg, p, cur, prop) == pytest.approx(expected)
    assert check_continuation(cfg, p, (7,), Finish.STOP, None) is RejectReason.MISSING_LOGPROBS


def test_replay_is_deterministic_and_streams_are_independent():
    cur = st([*list(range(10, 40)), EOS])
    a = [plan_step(CFG.__class__(beta=1, max_new_tokens=64), cur, 11, "ch", s) for s in (1, 2, 3)]
    b = [plan_step(CFG.__class__(beta=1, max_new_tokens=64), cur, 11, "ch", s) for s in (1, 2, 3)]
    assert a == b
    assert plan_initial(CFG, 11, "ch").gen_seed == generator_seed(11, "ch", 0)
    assert uniform(1, "a", 1, Purpose.INDEX) != uniform(1, "a", 1, Purpose.ACCEPT)
    assert uniform(1, "a", 1, Purpose.INDEX) != uniform(2, "a", 1, Purpose.INDEX)
    assert uniform(1, "a", 1, Purpose.INDEX) != uniform(1, "b", 1, Purpose.INDEX)
    assert 0 <= generator_seed(1, "a", 5) < 2**31 - 1


def test_uniforms_look_uniform():
    us = [uniform(0, "c", s, Purpose.ACCEPT) for s in range(20000)]
    assert all(0.0 <= u < 1.0 for u in us)
    assert abs(sum(us) / len(us) - 0.5) < 0.01
    assert abs(sum(u < 0.1 for u in us) / len(us) - 0.1) < 0.01


def test_index_distributions_log_probs_sum_to_one():
    for dist in (Uniform(), Block(3), Zero()):
        for n in (1, 2, 5, 7, 9):
            total = sum(math.exp(dist.log_prob(i, n)) for i in range(n))
            assert total == pytest.approx(1.0), (dist, n)
            draws = {dist.sample(n, k / 997) for k in range(997)}
            assert all(dist.log_prob(i, n) > -math.inf for i in draws)
    assert Block(3).log_prob(1, 9) == -math.inf
    assert Zero().log_prob(2, 9) == -math.inf
    assert Uniform().log_prob(0, 0) == 0.0  # an empty response can still be cut at 0


def test_index_distribution_parsing():
    assert isinstance(index_distribution("uniform"), Uniform)
    assert isinstance(index_distribution("independent"), Zero)
    assert index_distribution("block:4") == Block(4)
    with pytest.raises(ValueError, match="unknown index distribution"):
        index_distribution("gaussian")
    with pytest.raises(ValueError, match="not an integer"):
        index_distribution("block:x")


def test_config_validation_messages():
    with pytest.raises(ValueError, match="beta"):
        KernelConfig(beta=0.0, max_new_tokens=5)
    with pytest.raises(ValueError, match="beta"):
        KernelConfig(beta=math.nan, max_new_tokens=5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        KernelConfig(beta=1.0, max_new_tokens=0)
    with pytest.raises(ValueError, match="logprobs"):
        State((1, 2), 0.0, Finish.STOP, (0.0,))


def test_irreversible_cut_is_rejected():
    cfg = KernelConfig(beta=1.0, max_new_tokens=10, index=Block(2))
    cur = st([5, 6, 7, EOS])
    # cut 2 is a block start for |y'| = 3 too; cut 4 would not exist in a length-3 proposal
    prop = st([5, 6, EOS])
    assert decide(cfg, plan(2, [5, 6], u=0.0), cur, prop).reason is None
    assert decide(cfg, plan(1, [5], u=0.0), cur, prop).reason is RejectReason.IRREVERSIBLE
