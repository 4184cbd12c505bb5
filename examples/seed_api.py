"""A tour of the seed package's (quest-alignment) public API, as a user's script would call it.

Every class and argument of the seed API is used once; the script prints one JSON line,
`SEED_API:{...}`, summarising what each call returned (tests/test_seed_api.py checks it against
the toy servers and real vLLM).

    python examples/seed_api.py --gen http://127.0.0.1:8000 --gen-model M \
        --rm http://127.0.0.1:8001 --rm-model R [--rm2 URL --rm2-model R2] [--stop-token TOK]
"""

from __future__ import annotations

import argparse
import json
import math

from qalign import QAlign, RemoteReward, RemoteVLLM
from qalign.reward import (
    BackwardReward,
    ConstantReward,
    PIReward,
    RemoteLMReward,
    Reward,
    RewardMix,
    RewardStatic,
    RewardSum,
)


def length_bonus(conversations):
    return [0.01 * len(c[-1]["content"]) for c in conversations]


def has_digit(conversations):
    return [float(any(ch.isdigit() for ch in c[-1]["content"])) for c in conversations]


class Shouting(Reward):
    """A seed-style custom reward: only `evaluate` is overridden."""

    def __init__(self):
        super().__init__("shouting")

    def evaluate(self, conversations, use_tqdm=False):
        return [float(sum(ch.isupper() for ch in c[-1]["content"])) for c in conversations]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gen", required=True)
    ap.add_argument("--gen-model", required=True)
    ap.add_argument("--rm", required=True)
    ap.add_argument("--rm-model", required=True)
    ap.add_argument("--rm2")
    ap.add_argument("--rm2-model")
    ap.add_argument("--stop-token", action="append", default=[])
    ap.add_argument("--max-new-tokens", type=int, default=12)
    args = ap.parse_args()

    model = RemoteVLLM(
        server_url=args.gen,
        model_path=args.gen_model,
        max_new_tokens=args.max_new_tokens,
        max_prompt_length=200,
        stop_tokens=args.stop_token or None,
        temperature=1.0,
        timeout=120,
        max_retries=3,
        max_concurrent_requests=8,
        track_logprobs=True,
        tokenizer_path="unused/tokenizer",
        enable_thinking=False,
    )
    reward = RemoteReward(
        server_url=args.rm,
        model_path=args.rm_model,
        max_retries=3,
        polling_interval=0.1,
        timeout=120,
        server_format="vllm",
        max_concurrent_requests=8,
        max_prompt_length=1000,
    )
    other = (
        RemoteReward(args.rm2, args.rm2_model, server_format="vllm")
        if args.rm2
        else ConstantReward(0.5)
    )
    conversations = [
        [{"role": "user", "content": "Is the sky blue? Answer yes or no."}],
        [{"role": "user", "content": "What is 2+2? Answer briefly."}],
    ]
    out: dict = {}

    # -- the generator's helpers --------------------------------------------------------------
    prompt_ids = model.encode(conversations)
    out["encode"] = [len(p) for p in prompt_ids]
    out["tokenize"] = model.tokenize(["hello world"])
    out["decode_tokenize"] = model.decode_tokenize(out["tokenize"])
    completions, logprob_sums = model.continuation(prompt_ids)
    out["continuation"] = {"lengths": [len(c) for c in completions], "logprobs": logprob_sums}
    prefix = [c[:1] for c in completions]
    completions2, _ = model.continuation(prompt_ids, prefix=prefix)
    out["continuation_prefix"] = [
        len(p) + len(c) for p, c in zip(prefix, completions2, strict=True)
    ]
    texts, sums = model.ancestral(conversations, n=2)
    out["ancestral"] = {"shape": [len(t) for t in texts], "logprobs": len(sums)}
    replies = [
        [*c, {"role": "assistant", "content": t[0]}]
        for c, t in zip(conversations, texts, strict=True)
    ]
    per_token = model.logprobs(replies)
    out["logprobs"] = [len(x) for x in per_token]
    out["logprobs_first"] = [x[0] for x in per_token]

    # -- rewards --------------------------------------------------------------------------------
    lm_reward = RemoteLMReward(args.gen, args.gen_model, full_logprobs=False, max_new_tokens=4)
    lm_full = RemoteLMReward(args.gen, args.gen_model, full_logprobs=True, max_new_tokens=4)
    rewards = {
        "remote": reward,
        "other": other,
        "constant": ConstantReward(1.5),
        "backward": BackwardReward(reward),
        "mix": RewardMix([reward, other], mixing_weights=[0.25, 0.75]),
        "sum": RewardSum([length_bonus, has_digit]),
        "static": RewardStatic(length_bonus),
        "custom": Shouting(),
        "lm": lm_reward,
        "lm_full": lm_full,
        "pi": PIReward(lm_reward, reward, beta=0.1),
    }
    values = {name: r.evaluate(replies) for name, r in rewards.items()}
    out["rewards"] = values
    out["replies"] = [c[-1]["content"] for c in replies]
    out["names"] = {name: r.get_name() for name, r in rewards.items()}

    # -- the sampler ----------------------------------------------------------------------------
    seen: list[tuple[int, list[float]]] = []

    def on_state(state):
        assert isinstance(state, QAlign.State)
        seen.append((state.t, list(state.reward)))

    chain = QAlign(model=model, reward=reward, beta=1.0, logratio_clamp=20)
    warm = [{"completion": completions[0], "reward": 0.5}, {"completion": "yes"}]
    results = chain.run(
        conversations=conversations,
        steps=3,
        warm_start=warm,
        use_tqdm=False,
        callbacks=[on_state],
        tqdm_index=0,
        tqdm_total=1,
    )
    assert isinstance(results, QAlign.Output)
    out["run"] = {
        "steps": [[r["t"] for r in path] for path in results.state_path],
        "warm_reward0": results.state_path[0][0]["reward"],
        "warm_completion0": results.state_path[0][0]["completion"] == list(completions[0]),
        "callbacks": [t for t, _ in seen],
        "callback_widths": [len(r) for _, r in seen],
        "outputs": [len(t["outputs"]) for t in results.texts],
    }
    mixed = QAlign(model, RewardMix([reward, other], [0.25, 0.75]), beta=0.5)
    pipelined = mixed.run_pipelined(conversations, steps=2, workers=2, use_tqdm=False, batch_size=1)
    out["pipelined"] = [
        [len(path), conv == c] for (conv, path), c in zip(pipelined, conversations, strict=True)
    ]
    out["finite"] = all(
        math.isfinite(v) for name, vs in values.items() for v in vs if name != "lm_full"
    )
    print("SEED_API:" + json.dumps(out))


if __name__ == "__main__":
    main()
