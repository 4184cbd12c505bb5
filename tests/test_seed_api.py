"""The seed package's whole public API: a user's script, strict arguments, warm starts, callbacks,
and exactness with composite rewards (RewardMix, PIReward) on the toy model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from qalign.core import KernelConfig
from qalign.toy.exact import (
    empirical,
    step_distribution,
    total_variation,
    transition_matrix,
    tv_bound,
)
from qalign.toy.model import ToyModel
from qalign.toy.server import ToyServerOptions, serve_in_thread

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "seed_api.py"
MODEL = ToyModel()
RM2 = ToyModel(values={"yes": -1.0, "no": 1.0, "maybe": 0.0, "so": 0.5})
MESSAGES = [{"role": "user", "content": "Answer yes or no."}]


@pytest.fixture(scope="module")
def toy():
    with (
        serve_in_thread(ToyServerOptions(served_model_names=("toy-lm",), port=0)) as g,
        serve_in_thread(ToyServerOptions(served_model_names=("toy-rm",), port=0)) as r,
        serve_in_thread(ToyServerOptions(served_model_names=("toy-rm2",), port=0, model=RM2)) as r2,
    ):
        yield g, r, r2


def run_script(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=500,  # under pytest's 600 s
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("SEED_API:"))
    return json.loads(line[len("SEED_API:") :])


def check_common(out: dict) -> None:
    assert all(n > 0 for n in out["encode"])
    assert out["decode_tokenize"][0].strip() == "hello world"
    assert len(out["continuation"]["lengths"]) == 2 and all(out["continuation"]["lengths"])
    assert all(lp < 0 for lp in out["continuation"]["logprobs"])  # track_logprobs=True
    assert out["ancestral"] == {"shape": [2, 2], "logprobs": 4}
    assert out["logprobs_first"] == [0.0, 0.0]
    r = out["rewards"]
    assert r["constant"] == [1.5, 1.5]
    assert r["backward"] == [-x for x in r["remote"]]
    assert all(v <= 0 for v in r["lm"])
    assert all(f <= v + 1e-9 for f, v in zip(r["lm_full"], r["lm"], strict=True))
    for pi, rm, lm in zip(r["pi"], r["remote"], r["lm"], strict=True):
        assert pi == pytest.approx(rm + 0.1 * lm)
    assert [round(a - b, 9) for a, b in zip(r["sum"], r["static"], strict=True)] == [
        float(any(ch.isdigit() for ch in t)) for t in out["replies"]
    ]
    for mix, remote, other in zip(r["mix"], r["remote"], r["other"], strict=True):
        assert mix == pytest.approx(0.25 * remote + 0.75 * other)
    run = out["run"]
    assert run["steps"] == [[0, 1, 2, 3]] * 2
    assert run["warm_reward0"] == 0.5 and run["warm_completion0"] is True
    assert run["callbacks"] == [0, 1, 2, 3] and run["callback_widths"] == [2] * 4
    assert run["outputs"] == [4, 4]
    assert out["pipelined"] == [[3, True], [3, True]]
    assert out["finite"]


def test_seed_api_script_runs_against_toy_servers(toy):
    g, r, r2 = toy
    out = run_script(
        "--gen", g.url, "--gen-model", "toy-lm", "--rm", r.url, "--rm-model", "toy-rm",
        "--rm2", r2.url, "--rm2-model", "toy-rm2", "--stop-token", "so",
    )  # fmt: skip
    check_common(out)
    rewards = out["rewards"]
    for text, remote, other, lm in zip(
        out["replies"], rewards["remote"], rewards["other"], rewards["lm"], strict=True
    ):
        y = tuple(MODEL.encode(text))  # toy words only: exact values
        assert remote == pytest.approx(MODEL.reward(y)) and other == pytest.approx(RM2.reward(y))
        assert lm == pytest.approx(MODEL.reply_logprob(y))
    assert g.metrics()["prompt_logprob_tokens"] > 0


# ---- every seed-API call refuses an argument it does not know ------------------------------------


def _seed_calls(toy):
    from qalign import QAlign, RemoteReward, RemoteVLLM
    from qalign.reward import (
        BackwardReward,
        ConstantReward,
        PIReward,
        RemoteLMReward,
        RewardMix,
        RewardStatic,
        RewardSum,
    )

    g, r, _ = toy
    model = RemoteVLLM(g.url, "toy-lm", max_new_tokens=3, max_prompt_length=50)
    reward = RemoteReward(r.url, "toy-rm", server_format="vllm")
    chain = QAlign(model, reward, beta=1.0)
    lm = RemoteLMReward(g.url, "toy-lm", max_new_tokens=3)
    return {
        "RemoteVLLM": lambda: RemoteVLLM(g.url, "toy-lm", max_new_tokens=3, bogus=1),
        "RemoteReward": lambda: RemoteReward(r.url, "toy-rm", bogus=1),
        "QAlign": lambda: QAlign(model, reward, beta=1.0, bogus=1),
        "QAlign.run": lambda: chain.run([MESSAGES], steps=1, bogus=1),
        "QAlign.run_pipelined": lambda: chain.run_pipelined([MESSAGES], 1, bogus=1),
        "QAlign.ancestral": lambda: chain.ancestral([MESSAGES], n=1, bogus=1),
        "RemoteVLLM.continuation": lambda: model.continuation([[1]], bogus=1),
        "RemoteVLLM.ancestral": lambda: model.ancestral([MESSAGES], n=1, bogus=1),
        "RemoteVLLM.logprobs": lambda: model.logprobs([MESSAGES], bogus=1),
        "RemoteVLLM.encode": lambda: model.encode([MESSAGES], bogus=1),
        "RemoteVLLM.tokenize": lambda: model.tokenize(["yes"], bogus=1),
        "RemoteVLLM.decode_tokenize": lambda: model.decode_tokenize([[10]], bogus=1),
        "RemoteReward.evaluate": lambda: reward.evaluate([MESSAGES], bogus=1),
        "ConstantReward": lambda: ConstantReward(1.0, bogus=1),
        "BackwardReward": lambda: BackwardReward(reward, bogus=1),
        "RewardMix": lambda: RewardMix([reward], [1.0], bogus=1),
        "RewardSum": lambda: RewardSum([len], bogus=1),
        "RewardStatic": lambda: RewardStatic(len, bogus=1),
        "RemoteLMReward": lambda: RemoteLMReward(g.url, "toy-lm", bogus=1),
        "PIReward": lambda: PIReward(lm, reward, beta=1.0, bogus=1),
    }


def test_every_seed_api_call_refuses_an_unknown_keyword(toy):
    calls = _seed_calls(toy)
    for name, call in calls.items():
        with pytest.raises(TypeError, match="bogus"):
            call()
        print("refused:", name)
    assert len(calls) == 20


def test_top_level_names_and_seed_types():
    import qalign
    from qalign import QAlign, RemoteReward, RemoteVLLM
    from qalign.base import QAlign as Q2

    assert QAlign is Q2 and RemoteVLLM.__name__ == "RemoteVLLM" and RemoteReward.__name__
    assert {"reward", "completion", "text", "index", "t", "scores"} <= set(
        QAlign.State.__dataclass_fields__
    )
    assert {"state_path", "texts"} <= set(QAlign.Output.__dataclass_fields__)
    with pytest.raises(AttributeError, match="nothing"):
        _ = qalign.nothing


def test_enable_thinking_reaches_the_chat_template(toy):
    from qalign import RemoteVLLM

    g, _, _ = toy
    model = RemoteVLLM(g.url, "toy-lm", max_new_tokens=3, enable_thinking=True)
    model.encode([MESSAGES])
    assert g.metrics()["template_kwargs"].get('{"enable_thinking": true}', 0) >= 1
    with pytest.raises(ValueError, match="enable_thinking"):
        RemoteVLLM(g.url, "toy-lm", enable_thinking=True, backend="sglang")


# ---- warm starts, callbacks, pipelining ----------------------------------------------------


def test_warm_start_callbacks_and_pipelining(toy):
    from qalign import QAlign, RemoteReward, RemoteVLLM

    g, r, _ = toy
    model = RemoteVLLM(g.url, "toy-lm", max_new_tokens=3, max_prompt_length=50)
    reward = RemoteReward(r.url, "toy-rm", server_format="vllm")
    chain = QAlign(model, reward, beta=1.0, seed=11)
    convs = [MESSAGES, [{"role": "user", "content": "Say maybe."}], MESSAGES]
    yes, eos = 10, 1
    warm = [
        {"completion": [yes, eos], "reward": 7.0},  # trusted as given
        {"completion": "no maybe"},  # text: tokenized by the server, then scored
        [yes, yes, eos],  # bare token ids: scored
    ]
    states = []
    out = chain.run(convs, steps=4, warm_start=warm, callbacks=[states.append])
    first = [path[0] for path in out.state_path]
    assert first[0]["reward"] == 7.0 and first[0]["completion"] == [yes, eos]
    assert first[1]["reward"] == pytest.approx(MODEL.reward((11, 12)))
    assert first[1]["text"] == "no maybe" and first[1]["finish"] == "length"
    assert first[2]["reward"] == pytest.approx(2.0) and first[2]["text"] == "yes yes"
    # callbacks: every chain's state at t = 0..4, in order, equal to the recorded trajectories
    assert [s.t for s in states] == [0, 1, 2, 3, 4]
    for s in states:
        for k, recs in enumerate(out.records):
            assert s.completion[k] == list(recs[s.t].state.tokens)
            assert s.reward[k] == recs[s.t].state.reward
    with pytest.raises(ValueError, match="warm_start has 1 entries"):
        chain.run(convs, steps=1, warm_start=warm[:1])
    with pytest.raises(TypeError, match="unknown keys"):
        chain.run([MESSAGES], steps=1, warm_start=[{"completion": [yes], "rewrad": 1.0}])
    quest = QAlign(model, reward, beta=1.0, method="quest")
    with pytest.raises(ValueError, match="logprobs"):
        quest.run([MESSAGES], steps=1, warm_start=[{"completion": [yes, eos], "reward": 1.0}])
    # the same seed gives the same chains however run_pipelined batches them
    plain = chain.run(convs * 2, steps=3)
    for workers, size in [(0, 16), (1, 1), (2, 2), (3, 4)]:
        piped = chain.run_pipelined(convs * 2, 3, workers=workers, batch_size=size)
        assert [c for c, _ in piped] == convs * 2
        assert [p for _, p in piped] == plain.state_path


# ---- exactness with composite rewards ----------------------------------------------------


@pytest.mark.parametrize("kind", ["mix", "pi"])
def test_composite_rewards_match_the_exact_k_step_law(toy, kind):
    from qalign import QAlign, RemoteReward, RemoteVLLM
    from qalign.reward import PIReward, RemoteLMReward, RewardMix

    g, r, r2 = toy
    max_new, beta, n, k = 3, 1.0, 500, 4
    model = RemoteVLLM(g.url, "toy-lm", max_new_tokens=max_new, max_prompt_length=50)
    rm = RemoteReward(r.url, "toy-rm", server_format="vllm")
    if kind == "mix":
        w1, w2 = 0.5, 1.5
        reward = RewardMix([rm, RemoteReward(r2.url, "toy-rm2", server_format="vllm")], [w1, w2])

        def exact_reward(y):
            return w1 * MODEL.reward(y) + w2 * RM2.reward(y)

        def wrong_reward(y):  # the weights swapped
            return w2 * MODEL.reward(y) + w1 * RM2.reward(y)
    else:
        b = 0.5
        reward = PIReward(RemoteLMReward(g.url, "toy-lm", max_new_tokens=2), rm, beta=b)

        def exact_reward(y):
            return MODEL.reward(y) + b * MODEL.reply_logprob(y)

        def wrong_reward(y):  # the reference term's sign flipped
            return MODEL.reward(y) - b * MODEL.reply_logprob(y)

    out = QAlign(model, reward, beta=beta, seed=2024).run([MESSAGES] * n, steps=k)
    for recs in out.records[:50]:  # the stored rewards are the composite's exact values
        for rec in recs:
            if rec.proposal is not None:
                assert rec.proposal.reward == pytest.approx(exact_reward(rec.proposal.tokens))
    final = empirical([recs[-1].state.tokens for recs in out.records])
    cfg = KernelConfig(beta=beta, max_new_tokens=max_new)
    matrix = transition_matrix(MODEL, cfg, reward=exact_reward)
    exact_k = step_distribution(MODEL.lm_distribution(max_new), matrix, k)
    assert total_variation(final, exact_k) < tv_bound(exact_k, n)
    target = MODEL.target(beta, max_new, reward=exact_reward)
    assert total_variation(exact_k, target) < total_variation(
        MODEL.lm_distribution(max_new), target
    )
    assert math.isclose(math.fsum(target.values()), 1.0)
