"""Build a small scalar-head reward model for vLLM's /classify endpoint.

Usage: python make_rm.py OUT_DIR BASE_HF_DIR

BASE_HF_DIR is the folder written by gguf_to_hf.py (SmolLM2-135M-Instruct). The result is a
`LlamaForSequenceClassification` with num_labels=1 (label "reward"), the same architecture family
as Skywork-Reward-Llama. Only the `score` head is trained: 60 Adam steps of a Bradley-Terry loss on
six toy preference pairs (polite > rude), so rewards are deterministic (seed 0) and not arbitrary.
Writes to OUT_DIR.tmp and renames at the end.
"""

import os
import shutil
import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

GOOD = [
    "Thank you for asking! Here is a clear, helpful answer.",
    "Sure, happy to help. The answer is 4.",
    "Great question; let me explain step by step.",
]
BAD = ["No. Go away.", "I don't care about your question.", "Figure it out yourself, idiot."]


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    out, src = os.path.abspath(sys.argv[1]), sys.argv[2]
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(src)
    m = AutoModelForSequenceClassification.from_pretrained(
        src, num_labels=1, id2label={0: "reward"}, label2id={"reward": 0}, dtype=torch.float32
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    m.config.pad_token_id = tok.pad_token_id
    head = [p for n, p in m.named_parameters() if n.startswith("score")]
    if not head:
        sys.exit("no `score` head found")
    for p in m.parameters():
        p.requires_grad_(False)
    for p in head:
        p.requires_grad_(True)
    opt = torch.optim.Adam(head, lr=1e-2)
    enc = tok(GOOD + BAD, return_tensors="pt", padding=True)
    n = len(GOOD)
    for _ in range(60):
        r = m(**enc).logits.squeeze(-1)
        loss = -torch.nn.functional.logsigmoid(r[:n, None] - r[None, n:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        r = m(**enc).logits.squeeze(-1)
    good = [round(x, 2) for x in r[:n].tolist()]
    bad = [round(x, 2) for x in r[n:].tolist()]
    print(f"final loss {loss.item():.3g}; rewards good={good} bad={bad}")
    m.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
