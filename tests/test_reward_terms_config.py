"""The `reward.terms` section of a sweep config: what it accepts, what it refuses, and that
sweeps made before it keep their identity."""

from __future__ import annotations

from typing import Any

import pytest

from qalign.clients.spec import RewardSpec
from qalign.config import ConfigError, parse_config

# computed by the code before composite rewards existed (commit 9590389): unchanged
OLD_FINGERPRINT = "956330a3ab77c97f2280eee26fcaae014d360b401fdf9a4b360eb10cf67cf7c8"


def config(reward: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "fp",
        "generator": {"urls": ["http://a:1"], "model": "m"},
        "reward": reward,
        "dataset": {"prompts": ["q"]},
        "beta": [0.5, 1.0],
        "steps": 3,
    }


RM = {"name": "rm", "urls": ["http://b:2"], "model": "r", "format": "vllm"}
REF = {"name": "ref", "kind": "lm_logprob", "weight": 0.1, "urls": "http://a:1", "model": "m"}


def test_a_plain_reward_keeps_its_old_fingerprint():
    cfg = parse_config(config({"urls": ["http://b:2"], "model": "r", "format": "vllm"}))
    assert cfg.fingerprint() == OLD_FINGERPRINT


def test_terms_round_trip_through_the_stored_run_config():
    cfg = parse_config(config({"terms": [RM, REF, {"name": "c", "kind": "constant", "value": 1}]}))
    (run, _) = cfg.runs()
    assert run.reward is not None and run.reward_model == "1*rm + 0.1*ref + 1*c"
    stored = run.to_config()["reward"]
    assert RewardSpec.from_config(stored) == run.reward
    kinds = [(t.name, t.kind, t.weight) for t in run.reward.terms]
    assert kinds == [("rm", "model", 1.0), ("ref", "lm_logprob", 0.1), ("c", "constant", 1.0)]
    assert {s.urls for s in run.reward.sections()} == {("http://b:2",), ("http://a:1",)}


def test_urls_and_timeouts_of_terms_are_not_part_of_the_identity():
    a = parse_config(config({"terms": [RM, REF]}))
    moved = {**RM, "urls": ["http://elsewhere:9"], "timeout": 5}
    b = parse_config(config({"terms": [moved, REF]}))
    c = parse_config(config({"terms": [{**RM, "weight": 2.0}, REF]}))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        ({"terms": [RM], "urls": ["http://b:2"]}, "`terms` replaces"),
        ({"terms": [RM, RM]}, "unique"),
        ({"terms": [{"name": "c", "kind": "constant", "value": 1.0}]}, "at least one model"),
        ({"terms": [{"name": "c", "kind": "constant"}, RM]}, "constant term takes `value`"),
        ({"terms": [{"name": "x", "kind": "lm_logprob", "model": "m"}]}, "needs `urls` and"),
        ({"terms": [{**RM, "scope": "conversation"}]}, "`scope` is for lm_logprob"),
        ({"terms": [{**RM, "value": 3.0}]}, "`value` is for constant"),
        ({"terms": [{**RM, "kind": "python"}]}, "reward.terms.0.kind"),
        ({"terms": [{**RM, "weight": float("nan")}]}, "reward.terms.0.weight"),
        ({"terms": []}, "reward.terms"),
        ({"model": "r"}, "give `urls` and `model`"),
        ({"terms": [{**RM, "name": "a b"}]}, "reward.terms.0.name"),
    ],
)
def test_bad_terms_are_refused_by_key(reward, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(config(reward))
