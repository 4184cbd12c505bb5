"""Runs the reference QAlign (quest-alignment) once against toy servers (benchmarks/reference.py).

This file is copied into the run's folder in the cache and executed by the reference's own
interpreter with `python -I` (so neither this repository nor our `qalign` is importable: there
`qalign` is the paper authors' package). It takes one argument, a JSON spec written by
`measure_reference`, and writes its result JSON to `spec["result_path"]`.

1. It builds, for each model name, a Hugging Face tokenizer directory for the toy vocabulary
   (named like the model, in the working directory, so `AutoTokenizer.from_pretrained(name)`
   finds it locally, as it would find a downloaded hub model).
2. It checks, through the toy server's `/tokenize`, that the templated prompt and reward texts
   the reference will send encode to the same ids our own client gets for the same messages.
3. It builds `RemoteVLLM`, `RemoteReward` and `QAlign` as in the reference's README Quick Start
   and times `chain.run(conversations=[conv] * chains, steps=steps)`: from the first request
   `run` sends to its return.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

# No hub look-ups: every tokenizer is a local directory (and model hubs are unreachable here).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _module(name: str) -> Any:
    """A module of the reference's environment, untyped.

    `qalign` here is the paper authors' package, and tokenizers / transformers / requests exist
    only in that environment; linters and type checkers run in ours, where `qalign` means this
    repository. Importing by name keeps them from checking these against the wrong code.
    """
    return importlib.import_module(name)


def chat_template(roles: dict[str, str], end: str) -> str:
    """Jinja for the toy template: `<role> content <|end|>` per message, then `<|assistant|>`.

    Without the BOS text: the servers add BOS to a text prompt themselves (add_special_tokens
    defaults to true on /v1/completions and /classify), exactly as `ToyModel.chat_ids` starts.
    """
    known = "[" + ", ".join(repr(r) for r in roles) + "]"
    parts = ["{% for m in messages %}"]
    parts.append(
        "{% if m['role'] not in " + known + " %}"
        "{{ raise_exception('the toy chat template has no role ' + m['role']) }}{% endif %}"
    )
    for i, (role, marker) in enumerate(roles.items()):
        parts.append(("{% if" if i == 0 else "{% elif") + f" m['role'] == {role!r} %}}{marker}")
    parts.append("{% endif %}")
    parts.append(" {{ m['content'] }} " + end + " {% endfor %}")
    parts.append("{% if add_generation_prompt %}" + roles["assistant"] + "{% endif %}")
    return "".join(parts)


def build_tokenizer(spec: dict[str, Any], dest: Path) -> None:
    """A WordLevel tokenizer over the toy words, the specials and the prompt's words."""
    tk = _module("tokenizers")
    fast_tokenizer = _module("transformers").PreTrainedTokenizerFast

    specials: dict[str, int] = {text: int(i) for i, text in spec["specials"].items()}
    vocab = dict(specials)
    vocab[spec["unk"]] = max(vocab.values()) + 1
    # Word ids equal the toy server's; the gap below them is filled so the vocabulary has no holes.
    word_base = int(spec["word_base"])
    for i in range(len(vocab), word_base):
        vocab[f"<|reserved_{i}|>"] = i
    for i, word in enumerate(spec["words"]):
        vocab[word] = word_base + i
    # Prompt words the toy vocabulary lacks (the server byte-encodes them) get ids of their own
    # here: the client only needs to decode them back to the same text it encoded.
    for word in spec["extra_words"]:
        vocab.setdefault(word, len(vocab))
    tok = tk.Tokenizer(tk.models.WordLevel(vocab=vocab, unk_token=spec["unk"]))
    # Whitespace only, like ToyModel.encode's str.split (punctuation stays inside words).
    tok.pre_tokenizer = tk.pre_tokenizers.WhitespaceSplit()
    # Joins tokens with single spaces, like ToyModel.decode ("##" never occurs in toy words).
    tok.decoder = tk.decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(
        [
            tk.AddedToken(t, special=True, normalized=False)
            for t in vocab
            if t in specials or t == spec["unk"] or t.startswith("<|reserved_")
        ]
    )
    hf = fast_tokenizer(
        tokenizer_object=tok,
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        unk_token=spec["unk"],
        clean_up_tokenization_spaces=False,
        model_max_length=int(spec["max_model_len"]),
    )
    hf.chat_template = chat_template(spec["roles"], spec["end"])
    hf.save_pretrained(str(dest))


def server_ids(url: str, body: dict[str, Any]) -> list[int]:
    resp = _module("requests").post(f"{url}/tokenize", json=body, timeout=60)
    resp.raise_for_status()
    return [int(t) for t in resp.json()["tokens"]]


def check_templates(spec: dict[str, Any], gen_tok: Any, rm_tok: Any) -> None:
    """The texts the reference sends must encode (server side) like our client's messages."""
    conv = [{"role": "user", "content": spec["prompt"]}]
    reply = [*conv, {"role": "assistant", "content": " ".join(spec["words"][:2])}]
    cases = [
        (spec["gen_url"], gen_tok, conv, True),
        (spec["rm_url"], rm_tok, reply, False),
    ]
    for url, tok, messages, add_gen in cases:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_gen)
        # What RemoteVLLM.continuation sends: decode(encode(text)), special tokens kept.
        ids = tok.encode(text, add_special_tokens=False)
        round_trip = tok.decode(ids, skip_special_tokens=False)
        if round_trip.split() != text.split() or tok.unk_token_id in ids:
            raise SystemExit(f"tokenizer round trip changed {text!r} into {round_trip!r}")
        got = server_ids(url, {"prompt": round_trip, "add_special_tokens": True})
        want = server_ids(url, {"messages": messages, "add_generation_prompt": add_gen})
        if got != want:
            raise SystemExit(
                f"templated text {round_trip!r} encodes to {got} on {url}, "
                f"but the same messages tokenize to {want}"
            )


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    work = Path(spec["work_dir"])
    os.chdir(work)
    for name in {spec["gen_model"], spec["rm_model"]}:
        build_tokenizer(spec, work / name)

    auto_tokenizer = _module("transformers").AutoTokenizer
    check_templates(
        spec,
        auto_tokenizer.from_pretrained(spec["gen_model"]),
        auto_tokenizer.from_pretrained(spec["rm_model"]),
    )

    import numpy as np

    qalign_base, qalign_model, qalign_reward = (
        _module(f"qalign.{name}") for name in ("base", "model", "reward")
    )

    if spec.get("seed") is not None:
        np.random.seed(int(spec["seed"]))  # index draws and accept/reject both use it

    # As the README Quick Start, with the toy servers' names and the benchmark's sizes.
    model = qalign_model.RemoteVLLM(
        server_url=spec["gen_url"],
        model_path=spec["gen_model"],
        max_prompt_length=int(spec["max_prompt_length"]),
        max_new_tokens=int(spec["max_new_tokens"]),
        max_concurrent_requests=int(spec["concurrency"]),
    )
    reward = qalign_reward.RemoteReward(
        server_url=spec["rm_url"],
        model_path=spec["rm_model"],
        server_format="vllm",
        max_concurrent_requests=int(spec["concurrency"]),
    )
    chain = qalign_base.QAlign(model=model, reward=reward, beta=float(spec["beta"]))
    conversations = [[{"role": "user", "content": spec["prompt"]}]] * int(spec["chains"])

    # The clock starts at the first request `run` sends: wrap the one method every generation
    # batch goes through, on this instance only (the reference's code is left as it is).
    first_request: list[float] = []
    post = model._post_with_retries

    def timed_post(*args: Any, **kwargs: Any) -> Any:
        if not first_request:
            first_request.append(time.perf_counter())
        return post(*args, **kwargs)

    model._post_with_retries = timed_post

    called = time.perf_counter()
    out = chain.run(conversations=conversations, steps=int(spec["steps"]))
    ended = time.perf_counter()

    chains, steps = int(spec["chains"]), int(spec["steps"])
    seconds = ended - first_request[0]
    accepts = [rec["accept"] for path in out.state_path for rec in path[1:]]
    final_texts = [path[-1] for path in (o["outputs"] for o in out.texts)]
    # Each chain's final state is its last accepted record (the initial sample counts as
    # accepted): aligned chains should end with a higher mean reward than the LM's own samples.
    final_rewards = [
        [float(rec["reward"]) for rec in path if rec["accept"]][-1] for path in out.state_path
    ]
    result = {
        "steps_per_s": chains * (steps + 1) / seconds,
        "seconds": seconds,
        "run_seconds": ended - called,
        "before_first_request_seconds": first_request[0] - called,
        "chains": chains,
        "steps": steps,
        "acceptance_rate": float(np.mean(accepts)) if accepts else None,
        "proposals": len(accepts),
        "final_texts": final_texts,
        "mean_initial_reward": float(np.mean(chain.state_path[0]["reward"])),
        "mean_final_reward": float(np.mean(final_rewards)),
        "timing_stats": chain.timing_stats.operations,
        "versions": {
            name: metadata.version(name)
            for name in ("quest-alignment", "transformers", "tokenizers", "torch", "numpy")
        },
    }
    Path(spec["result_path"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
