"""End to end against REAL vLLM (CPU build) serving SmolLM2 as generator and reward model.

The generator is served under the seed's model names, so the seed Quick Start runs verbatim.
"""

from __future__ import annotations

import json
import math
import urllib.request
from pathlib import Path

import pytest

from qalign.clients import SamplingParams, VLLMGenerator, VLLMReward
from qalign.core import Finish
from tests.realservers import GEN_MODEL, RM_MODEL, require_or_skip, run_async, vllm_servers
from tests.test_quickstart import check_quickstart_shape, run_quickstart
from tests.test_seed_api import check_common, run_script

pytestmark = pytest.mark.real_vllm
EOS = 2  # <|im_end|> in SmolLM2
QUESTION = [{"role": "user", "content": "What is 2+2? Answer briefly."}]


@pytest.fixture(scope="module")
def servers():
    require_or_skip("vllm")
    with vllm_servers(gen_port=8000, rm_port=8001) as urls:
        yield urls


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def test_quickstart_verbatim_returns_real_text_ids_and_raw_rewards(servers):
    result = run_quickstart()
    check_quickstart_shape(result)
    path = result["state_path"][0]
    assert any(rec["text"].strip() for rec in path)
    assert all(all(0 <= t < 49152 for t in rec["completion"]) for rec in path)
    # rewards are raw logits: sigmoid(reward) is what vLLM reports with its activation on
    first = path[0]
    messages = [
        {"role": "user", "content": result["texts"][0]["input"][0]["content"]},
        {"role": "assistant", "content": first["text"]},
    ]
    ids = _post(
        f"{servers.rm}/tokenize",
        {"model": RM_MODEL, "messages": messages, "add_generation_prompt": False},
    )["tokens"]
    prob = _post(f"{servers.rm}/classify", {"model": RM_MODEL, "input": [ids]})["data"][0]["probs"][
        0
    ]
    assert 1 / (1 + math.exp(-first["reward"])) == pytest.approx(prob, rel=1e-4, abs=1e-6)
    assert not all(0.0 <= rec["reward"] <= 1.0 for rec in path)


def test_ancestral_sampling_gives_scored_independent_samples(servers):
    from qalign.base import QAlign
    from qalign.model import RemoteVLLM
    from qalign.reward import RemoteReward

    model = RemoteVLLM(servers.gen, GEN_MODEL, max_new_tokens=24, max_prompt_length=200)
    reward = RemoteReward(servers.rm, RM_MODEL, server_format="vllm")
    chain = QAlign(model, reward, beta=1.0, seed=5)
    (samples,) = chain.ancestral([QUESTION], n=4)
    assert len(samples) == 4
    assert all(s["text"] and math.isfinite(s["reward"]) for s in samples)
    assert len({tuple(s["completion"]) for s in samples}) > 1
    assert all(len(s["completion"]) <= 24 for s in samples)
    texts, logprob_sums = model.ancestral([QUESTION], n=2)  # the seed's return shape
    assert len(texts) == 1 and len(texts[0]) == 2
    assert len(logprob_sums) == 2 and all(lp < 0 for lp in logprob_sums)


def test_continuation_from_an_exact_token_prefix(servers):
    async def go():
        gen = VLLMGenerator(servers.gen, "smollm2")
        await gen.start()
        assert gen.max_model_len == 2048
        prompt = await gen.chat_prompt(QUESTION)
        greedy = SamplingParams(temperature=0.0)
        full = await gen.generate(prompt, max_tokens=16, seed=1, params=greedy)
        cut = len(full.token_ids) // 2
        rest = await gen.generate(
            prompt + list(full.token_ids[:cut]), max_tokens=16 - cut, seed=1, params=greedy
        )
        sampled = await gen.generate(prompt, max_tokens=16, seed=7, params=SamplingParams())
        again = await gen.generate(prompt, max_tokens=16, seed=7, params=SamplingParams())
        text = await gen.detokenize(full.token_ids)
        await gen.close()
        return full, cut, rest, sampled, again, text

    full, cut, rest, sampled, again, text = run_async(go())
    assert full.token_ids[cut:] == rest.token_ids  # same ids, no re-tokenisation at the cut
    assert sampled == again or sampled.token_ids == again.token_ids  # seeded sampling replays
    assert text.strip()
    if full.finish is Finish.STOP:
        assert full.token_ids[-1] == EOS


def test_legacy_token_id_path_gives_the_same_ids(servers):
    async def go():
        new = VLLMGenerator(servers.gen, "smollm2", token_ids_mode="token_ids")
        old = VLLMGenerator(servers.gen, "smollm2", token_ids_mode="logprobs")
        await new.start()
        await old.start()
        prompt = await new.chat_prompt(QUESTION)
        a = await new.generate(prompt, max_tokens=12, seed=3, params=SamplingParams())
        b = await old.generate(prompt, max_tokens=12, seed=3, params=SamplingParams())
        return a, b

    a, b = run_async(go())
    assert a.token_ids == b.token_ids and a.finish == b.finish


def test_reward_client_returns_raw_logits_in_batches(servers):
    async def go():
        rm = VLLMReward(servers.rm, RM_MODEL)
        await rm.start()
        convs = [
            [*QUESTION, {"role": "assistant", "content": "Sure, happy to help. The answer is 4."}],
            [*QUESTION, {"role": "assistant", "content": "Figure it out yourself."}],
        ]
        return convs, await rm.score(convs)

    convs, scores = run_async(go())
    for conv, score in zip(convs, scores, strict=True):
        raw = _post(
            f"{servers.rm}/classify",
            {"model": RM_MODEL, "messages": conv, "use_activation": False},
        )["data"][0]["probs"][0]
        assert score == pytest.approx(raw, rel=1e-5)
    assert any(abs(s) > 1.0 for s in scores)  # a probability would lie in [0, 1]


def test_small_gsm8k_sweep_through_eval_and_report(servers, tmp_path):
    """The whole analysis path on a real model: run, eval, predict, report (accuracy is whatever
    SmolLM2-135M gets)."""
    import yaml

    from tests.sweeps_support import cli

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
    db = f"sqlite:///{tmp_path}/gsm8k.sqlite"
    common = {
        "generator": {"urls": [servers.gen], "model": "smollm2", "timeout": 600},
        "reward": {"urls": [servers.rm], "model": RM_MODEL, "format": "vllm", "timeout": 600},
        "dataset": {"task": "gsm8k", "path": str(data), "limit": 2},
        "max_new_tokens": 48,
        "max_prompt_length": 512,
        "seed": 1,
    }
    sweeps = {
        "real-bon": {**common, "method": "ancestral", "chains_per_prompt": 3},
        "real-qalign": {**common, "method": "qalign", "beta": 1.0, "steps": 2},
    }
    for name, cfg in sweeps.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, **cfg}))
        out = cli("run", str(path), "--database", db, "--quiet", timeout=540)  # < pytest's 600
        assert out.returncode == 0, out.stderr[-3000:]
    out = cli("eval", "real-bon", "real-qalign", "--database", db)
    assert out.returncode == 0, out.stderr[-3000:]
    report_dir = tmp_path / "report"
    out = cli("report", "real-bon", "real-qalign", "-o", str(report_dir), "--database", db)
    assert out.returncode == 0, out.stderr[-3000:]
    md = (report_dir / "report.md").read_text()
    pngs = sorted(report_dir.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 and p.name in md for p in pngs)
    assert "real-bon" in md or "smollm2" in md


def test_power_and_smc_on_gsm8k_through_eval_predict_and_report(servers, tmp_path):
    """Power sampling and SMC on 2 GSM8K prompts with SmolLM2: run, eval, predict (power's chain
    vote, SMC's weighted and plain particle votes) and one comparison figure in the report."""
    import yaml

    from tests.sweeps_support import cli

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
    db = f"sqlite:///{tmp_path}/compare.sqlite"
    common = {
        "generator": {"urls": [servers.gen], "model": "smollm2", "timeout": 600},
        "dataset": {"task": "gsm8k", "path": str(data), "limit": 2},
        "max_new_tokens": 32,
        "max_prompt_length": 512,
        "seed": 3,
        "chains_per_prompt": 2,
    }
    reward = {"urls": [servers.rm], "model": RM_MODEL, "format": "vllm", "timeout": 600}
    sweeps = {
        "real-power": {**common, "method": "power", "alpha": 2.0, "steps": 2},
        "real-smc": {**common, "method": "smc", "beta": 1.0, "reward": reward,
                     "smc": {"block_tokens": 16}},
    }  # fmt: skip
    for name, cfg in sweeps.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, **cfg}))
        out = cli("run", str(path), "--database", db, "--quiet", timeout=540)  # < pytest's 600
        assert out.returncode == 0, out.stderr[-3000:]
    out = cli("eval", *sweeps, "--database", db, "--quiet")
    assert out.returncode == 0, out.stderr[-3000:]
    for sweep, method in (("real-power", "power"), ("real-smc", "smc"), ("real-smc", "smc-mv")):
        out = cli("predict", sweep, "--method", method, "--json", "--database", db)
        assert out.returncode == 0, out.stderr[-3000:]
        (curve,) = json.loads(out.stdout)
        assert curve["run_method"] == sweep.removeprefix("real-")
        assert all(p["prompts"] == 2 and p["gen_tokens"] > 0 for p in curve["points"])
        if method != "power":
            (point,) = curve["points"]  # SMC: one point, its 2 particles, 2 blocks each
            assert point["budget"] == 2 and point["reward_tokens"] > 0
            assert point["server_seconds"] > 0
    report_dir = tmp_path / "report"
    out = cli("report", *sweeps, "-o", str(report_dir), "--generator-params", "135e6",
              "--reward-params", "135e6", "--database", db)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    md = (report_dir / "report.md").read_text()
    table = md[md.index("### Comparison: every method (gsm8k)") : md.index("![comparison")]
    rows = ("| Power | real-power/", "| SMC (weighted vote) | real-smc/",
            "| SMC (majority vote) | real-smc/")  # fmt: skip
    for name in (*rows, "FLOPs/prompt", "server s/prompt"):
        assert name in table, name
    assert (report_dir / "compare-gsm8k.png").stat().st_size > 1000


def test_seed_api_script_runs_against_real_vllm(servers):
    """Every class and argument of the seed API (examples/seed_api.py) against real vLLM."""
    out = run_script(
        "--gen", servers.gen, "--gen-model", GEN_MODEL, "--rm", servers.rm, "--rm-model", RM_MODEL,
        "--max-new-tokens", "16",
    )  # fmt: skip
    check_common(out)
    assert out["names"]["lm"].startswith("logprobs:")
    assert all(n > 10 for n in out["logprobs"])  # every token of the templated conversation
