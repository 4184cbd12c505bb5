"""The sampler samples the QAlign / QUEST target exactly (toy model, exact enumeration).

Two independent checks: (1) the kernel built from `qalign.core` leaves the exact target invariant
(detailed balance, to float precision) for every index distribution; (2) chains run through the
real step function land, after k steps, on the exact k-step law within a sample-size bound, and
that law converges to the target.
"""

from __future__ import annotations

import asyncio
import math

import pytest

import qalign.core.kernel as kernel_module
from qalign.clients.base import SamplingParams
from qalign.core import Block, KernelConfig, LastBlock, Method, Uniform, Zero
from qalign.sampling.local import run_chains
from qalign.sampling.step import ChainSpec, ancestral_spec, initial_step
from qalign.toy.exact import (
    empirical,
    step_distribution,
    total_variation,
    transition_matrix,
    tv_bound,
)
from qalign.toy.inprocess import ToyGenerator, ToyReward
from qalign.toy.model import EOS, ToyModel

MODEL = ToyModel()
MAX_NEW = 3
MESSAGES = [{"role": "user", "content": "Answer yes or no."}]
PROMPT = tuple(MODEL.chat_ids(MESSAGES, add_generation_prompt=True))


@pytest.mark.parametrize("method", [Method.QALIGN, Method.QUEST])
@pytest.mark.parametrize("beta", [0.25, 1.0, 4.0])
@pytest.mark.parametrize("index", [Uniform(), Block(2), LastBlock(2), Zero()], ids=lambda d: d.name)
def test_target_is_stationary_under_the_kernel(method, beta, index):
    cfg = KernelConfig(beta=beta, max_new_tokens=MAX_NEW, method=method, index=index)
    matrix = transition_matrix(MODEL, cfg)
    for row in matrix.values():
        assert math.fsum(row.values()) == pytest.approx(1.0, abs=1e-12)
    target = MODEL.target(beta, MAX_NEW, method.value)
    assert total_variation(step_distribution(target, matrix, 1), target) < 1e-12
    for y, row in matrix.items():  # detailed balance, pair by pair
        for y2, p in row.items():
            assert target[y] * p == pytest.approx(target[y2] * matrix[y2].get(y, 0.0), abs=1e-15)


def test_target_covers_responses_ending_at_every_length():
    target = MODEL.target(1.0, MAX_NEW)
    lengths = {len(y) for y, p in target.items() if p > 1e-4 and y[-1] == EOS}
    assert lengths == {1, 2, 3}  # EOS-only, one word + EOS, two words + EOS
    assert any(len(y) == MAX_NEW and y[-1] != EOS for y in target)  # budget-capped responses


def test_a_kernel_that_accepts_empty_suffixes_is_biased():
    """The reference implementation's move (EOS not counted, empty suffix accepted) has no reverse.

    Rebuilt here on exact probabilities: its stationary law differs from the target, which is
    what our length accounting avoids.
    """
    target = MODEL.target(1.0, MAX_NEW)
    ys = list(target)
    body = {y: (y[:-1] if y[-1] == EOS else y) for y in ys}  # |y| without EOS

    def cond(y, i):
        return math.exp(MODEL.sequence_logprob(y, i))

    matrix = {}
    for y in ys:
        row = {}
        n = max(len(body[y]), 1)
        for i in range(n):
            for y2 in ys:
                if y2[:i] != y[:i] or len(y2) <= i:
                    continue
                n2 = max(len(body[y2]), 1)
                log_a = MODEL.reward(y2) - MODEL.reward(y) + math.log(n) - math.log(n2)
                row[y2] = row.get(y2, 0.0) + cond(y2, i) / n * min(1.0, math.exp(log_a))
        row[y] = row.get(y, 0.0) + 1.0 - math.fsum(row.values())
        matrix[y] = row
    stationary = step_distribution(target, matrix, 200)
    assert total_variation(stationary, target) > 0.05


def _specs(n, cfg, prefix="c"):
    return [
        ChainSpec(
            key=f"{prefix}{i}", seed=20261127, prompt_ids=PROMPT, messages=MESSAGES, kernel=cfg
        )
        for i in range(n)
    ]


@pytest.mark.parametrize(
    ("method", "beta"),
    [(Method.QALIGN, 1.0), (Method.QALIGN, 0.5), (Method.QUEST, 1.0), (Method.QUEST, 2.0)],
)
def test_chains_match_the_exact_k_step_law_and_approach_the_target(method, beta):
    n, k = 3000, 30
    cfg = KernelConfig(beta=beta, max_new_tokens=MAX_NEW, method=method)
    runs = asyncio.run(run_chains(_specs(n, cfg), k, ToyGenerator(MODEL), ToyReward(MODEL)))
    for records in runs:
        assert [r.step for r in records] == list(range(k + 1))
        last_accepted = next(r for r in reversed(records) if r.accepted)
        assert records[-1].state == last_accepted.proposal
    final = empirical([r[-1].state.tokens for r in runs])
    matrix = transition_matrix(MODEL, cfg)
    exact_k = step_distribution(MODEL.lm_distribution(MAX_NEW), matrix, k)
    assert total_variation(final, exact_k) < tv_bound(exact_k, n)
    target = MODEL.target(beta, MAX_NEW, method.value)
    assert total_variation(final, target) < tv_bound(target, n) + total_variation(exact_k, target)
    assert total_variation(exact_k, target) < 0.05
    lengths = {len(y) for y in final}
    assert lengths == {1, 2, 3}


def test_ancestral_samples_match_the_lm():
    n = 6000
    cfg = KernelConfig(beta=1.0, max_new_tokens=MAX_NEW)
    spec = _specs(1, cfg)[0]
    gen = ToyGenerator(MODEL)

    async def draw():
        return await asyncio.gather(
            *(initial_step(ancestral_spec(spec, j), gen, None) for j in range(n))
        )

    records = asyncio.run(draw())
    lm = MODEL.lm_distribution(MAX_NEW)
    assert total_variation(empirical([r.state.tokens for r in records]), lm) < tv_bound(lm, n)
    assert all(math.isnan(r.state.reward) for r in records)


# ---- power sampling: pi ∝ p_LM^alpha, no reward --------------------------------------------

INDEXES = [Uniform(), Block(2), LastBlock(2), LastBlock(3), Zero()]


def _power(alpha, index=None):
    return KernelConfig(
        beta=1.0, max_new_tokens=MAX_NEW, method=Method.POWER, index=index or Uniform(), alpha=alpha
    )


@pytest.mark.parametrize("alpha", [0.5, 2.0, 4.0])
@pytest.mark.parametrize("index", INDEXES, ids=lambda d: f"{d.name}{getattr(d, 'size', '')}")
def test_power_target_is_stationary_under_the_kernel(alpha, index):
    cfg = _power(alpha, index)
    matrix = transition_matrix(MODEL, cfg)
    for row in matrix.values():
        assert math.fsum(row.values()) == pytest.approx(1.0, abs=1e-12)
    target = MODEL.target(1.0, MAX_NEW, "power", alpha=alpha)
    lm = MODEL.lm_distribution(MAX_NEW)
    assert target[(EOS,)] == pytest.approx(  # the enumerated law is p^alpha, normalised
        lm[(EOS,)] ** alpha / math.fsum(p**alpha for p in lm.values()), rel=1e-12
    )
    for y, row in matrix.items():  # detailed balance, pair by pair
        for y2, p in row.items():
            assert target[y] * p == pytest.approx(target[y2] * matrix[y2].get(y, 0.0), abs=1e-15)
    # ergodic: the law from the LM converges to p^alpha (so the last-block window must slide)
    assert total_variation(step_distribution(lm, matrix, 400), target) < 1e-3


def test_last_block_moves_that_leave_the_window_are_rejected():
    index = LastBlock(2)
    assert [index.log_prob(i, 3) for i in range(3)] == [-math.inf, -math.log(2), -math.log(2)]
    matrix = transition_matrix(MODEL, _power(2.0, index))
    w = MODEL.word_ids
    # from (w, EOS) the cut may be 0: a 3-token proposal's window {1, 2} lacks it, so no move
    assert matrix[(w[0], EOS)].get((w[1], w[2], EOS), 0.0) == 0.0
    assert matrix[(w[0], EOS)].get((w[1], EOS), 0.0) > 0.0


@pytest.mark.parametrize(
    ("alpha", "index", "k"),
    [(0.5, Uniform(), 30), (2.0, Uniform(), 30), (0.5, LastBlock(2), 60), (2.0, LastBlock(2), 60)],
    ids=["uniform-0.5", "uniform-2", "last_block-0.5", "last_block-2"],
)
def test_power_chains_match_the_exact_k_step_law_and_approach_p_to_the_alpha(alpha, index, k):
    n = 3000
    cfg = _power(alpha, index)
    runs = asyncio.run(run_chains(_specs(n, cfg, "p"), k, ToyGenerator(MODEL), None))
    assert all(math.isnan(r.state.reward) for records in runs for r in records)
    final = empirical([r[-1].state.tokens for r in runs])
    exact_k = step_distribution(MODEL.lm_distribution(MAX_NEW), transition_matrix(MODEL, cfg), k)
    assert total_variation(final, exact_k) < tv_bound(exact_k, n)
    target = MODEL.target(1.0, MAX_NEW, "power", alpha=alpha)
    assert total_variation(exact_k, target) < 0.05
    assert total_variation(final, target) < tv_bound(target, n) + total_variation(exact_k, target)


def _wrong_without_the_proposal_term(cfg, plan, current, proposal):
    """alpha·Δ log p alone: the target's ratio without the reverse/forward proposal densities."""
    i = plan.cut
    log_a = cfg.index.log_prob(i, len(proposal)) - cfg.index.log_prob(i, len(current))
    return log_a + cfg.alpha * (proposal.suffix_logprob(i) - current.suffix_logprob(i))


@pytest.mark.parametrize("wrong", ["alpha_ignored", "proposal_term_dropped"])
def test_a_wrong_power_acceptance_fails_the_same_check(wrong, monkeypatch):
    """The check above has the power to see a wrong ratio: chains run with one miss the law."""
    n, k, alpha = 3000, 30, 2.0
    cfg = _power(alpha)
    exact_k = step_distribution(MODEL.lm_distribution(MAX_NEW), transition_matrix(MODEL, cfg), k)
    run_cfg = cfg
    if wrong == "alpha_ignored":
        run_cfg = _power(1.0)  # the ratio of alpha = 1: the chain stays at p_LM
    else:
        monkeypatch.setattr(kernel_module, "log_acceptance", _wrong_without_the_proposal_term)
    runs = asyncio.run(run_chains(_specs(n, run_cfg, "w"), k, ToyGenerator(MODEL), None))
    final = empirical([r[-1].state.tokens for r in runs])
    assert total_variation(final, exact_k) > 2 * tv_bound(exact_k, n)


def test_a_tempered_proposal_does_not_sample_p_to_the_alpha():
    """Why power chains refuse a temperature: with the tempered log-probs (what a server
    samples from) the ratio targets p_T^alpha, and with raw ones it is not even that."""
    cfg = _power(2.0)
    target = MODEL.target(1.0, MAX_NEW, "power", alpha=2.0)
    lm = MODEL.lm_distribution(MAX_NEW, 0.7)
    tempered = step_distribution(lm, transition_matrix(MODEL, cfg, 0.7), 400)
    assert total_variation(tempered, target) > 0.05
    spec = _specs(1, cfg)[0]
    with pytest.raises(ValueError, match="temperature 1"):
        ChainSpec(spec.key, spec.seed, PROMPT, MESSAGES, cfg, SamplingParams(temperature=0.7))
