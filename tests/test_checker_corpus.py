"""The answer checkers on the checker corpus (tests/data/checker_corpus, see its README.md):
realistic model outputs in the classes where checkers tend to go wrong, each with the verdict
it should get. Every case is one test; `answer`, where a case gives it, is the voting key."""

from __future__ import annotations

import collections
import json
import string
from pathlib import Path
from typing import Any

import pytest

from qalign.tasks.base import Check
from qalign.tasks.checkers import check_choice, check_gsm8k, check_ifeval, check_math
from qalign.tasks.ifeval_checks import count_sentences

CORPUS = Path(__file__).resolve().parent / "data" / "checker_corpus"
TASKS = {"gsm8k", "math", "choice", "ifeval"}


def _cases() -> list[dict[str, Any]]:
    cases = []
    for path in sorted(CORPUS.glob("*.jsonl")):
        with path.open(encoding="utf-8") as f:
            cases += [json.loads(line) for line in f if line.strip()]
    return cases


CASES = _cases()


def _check(case: dict[str, Any]) -> Check:
    task = case["task"]
    if task == "gsm8k":
        return check_gsm8k(case["response"], case["reference"])
    if task == "math":
        return check_math(case["response"], case["reference"])
    if task == "choice":
        letters = list(string.ascii_uppercase[: case["options"]])
        return check_choice(case["response"], letters, case["reference"] or "")
    return check_ifeval(case["response"], case["meta"])


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_corpus_case(case: dict[str, Any]) -> None:
    c = _check(case)
    assert c.correct is case["expected"], (case["note"], c)
    if "answer" in case:
        assert c.answer == case["answer"], (case["note"], c)
    if "sentences" in case:  # the count the reference's Punkt tokenizer gives
        assert count_sentences(case["response"]) == case["sentences"], case["note"]


def test_corpus_is_well_formed_and_large_enough() -> None:
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids))
    per_class = collections.Counter(c["class"] for c in CASES)
    for name in ("ifeval-sentences", "math-boxes", "gsm8k-trailing-text", "choice-variants"):
        assert per_class[name] >= 40, per_class
    for c in CASES:
        assert c["task"] in TASKS, c["id"]
        assert c["source"] in {"handwritten", "smollm2"}, c["id"]
        assert isinstance(c["expected"], bool) and c["note"], c["id"]
    # Both verdicts occur in every hand-written class, so none passes by answering one way.
    for name in {c["class"] for c in CASES if c["source"] == "handwritten"}:
        assert {c["expected"] for c in CASES if c["class"] == name} == {True, False}, name
    assert sum(c["source"] == "smollm2" for c in CASES) >= 40
