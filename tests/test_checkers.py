"""Answer checkers on real dataset answers (shared/data beside the checkout) and hard cases."""

from __future__ import annotations

import ast
import csv
import json
import os
import random
import re
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from qalign.tasks.base import Check
from qalign.tasks.checkers import (
    MathWorkerPool,
    boxes,
    canonical_number,
    check_choice,
    check_gsm8k,
    check_ifeval,
    check_math,
    extract_choice,
    last_boxed,
    math_answer_parts,
    math_pool,
)
from qalign.tasks.ifeval_checks import (
    INSTRUCTIONS,
    capital_word_tokens,
    count_sentences,
    count_words,
    loose_variants,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def data_file(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared/data is not beside this checkout ({path} missing)")
    return path


def read_jsonl(*parts: str) -> list[dict[str, Any]]:
    with data_file(*parts).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# =============================================================================================
# GSM8K


def _gsm8k_items(n: int = 60) -> list[tuple[str, str, str]]:
    """(full reference solution, solution body without the '####' line, final answer)."""
    rows = read_jsonl("gsm8k", "test.jsonl")
    # Every 20th item, plus every item whose final answer is negative or has a comma.
    picked = [r for i, r in enumerate(rows) if i % 20 == 0][:n]
    picked += [r for r in rows if re.search(r"####\s*(-|\d+,)", r["answer"])]
    out = []
    for r in picked:
        body, final = r["answer"].split("####")
        out.append((r["answer"], body, final.strip()))
    return out


def test_gsm8k_reference_solutions_check_against_their_own_answer():
    items = _gsm8k_items()
    assert len(items) >= 30
    assert any(final.startswith("-") for _, _, final in items)
    assert any("," in final for _, _, final in items)
    for full, _, final in items:
        value = int(final.replace(",", ""))
        c = check_gsm8k(full, final)
        assert c.correct, (full, final, c)
        assert c.answer == str(value)
        assert c.details["rule"] == "####"
        assert c.correct_loose is None
        for wrong in (value + 1, value - 1, value * 10 + 7):
            assert not check_gsm8k(full, str(wrong)).correct, (full, wrong)


# Rewrites of a solution body into the final-answer styles models produce.
_GSM8K_STYLES = [
    lambda body, v: f"{body}The answer is ${v:,}.",
    lambda body, v: f"{body}So the final answer is $\\boxed{{{v}}}$.",
    lambda body, v: f"{body}Final answer: {v}.00",
    lambda body, v: f"{body}Therefore, the answer is {v:,} dollars. Thanks for asking 2 questions!",
    lambda body, v: f"The answer is: {v}\n\nExplanation:\n{body}",
    lambda body, v: f"{body}\\[\\boxed{{{v:,}}}\\]".replace(",", "{,}"),
    lambda body, v: f"{body}#### {v}",
    lambda body, v: f"{body}In total that is {v} units.",
    lambda body, v: f"{body}**Answer:** {v}%",
]


def test_gsm8k_rewritten_solutions():
    items = _gsm8k_items()
    n = 0
    for i, (_, body, final) in enumerate(items):
        body = re.sub(r"<<[^>]*>>", "", body)
        value = int(final.replace(",", ""))
        style = _GSM8K_STYLES[i % len(_GSM8K_STYLES)]
        response = style(body, value)
        c = check_gsm8k(response, final)
        assert c.correct, (response, final, c)
        assert c.answer == str(value), (response, c)
        assert not check_gsm8k(response, str(value + 3)).correct
        n += 1
    assert n >= 30


def test_gsm8k_solution_bodies_last_number():
    # Without '####', the last number of a reference solution is its answer for most items.
    items = _gsm8k_items()
    hits = sum(check_gsm8k(body, final).correct for _, body, final in items)
    assert hits >= 0.9 * len(items)


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("She makes $18 every day.", "18"),
        ("She makes 18 dollars.", "18"),
        ("The answer is 18.", "18"),
        ("The answer is 18.00", "18"),
        ("That's 18%", "18"),
        ("#### 18", "18"),
        ("The temperature drops to -3.5 degrees.", "-3.5"),
        ("The change is −7.", "-7"),
        ("She loses -$5 overall", "-5"),
        ("The answer is $1,234.", "1234"),
        ("Total = 1,234,567.", "1234567"),
        ("The answer is 3.50", "3.5"),
        ("Each gets 3/4 of a pizza", "0.75"),
        ("Each gets 1/3 of a pizza", "1/3"),
        ("\\boxed{\\frac{3}{4}}", "0.75"),
        ("\\boxed{\\dfrac{10}{4}}", "2.5"),
        ("\\boxed{5,\\!000}", "5000"),
        ("\\boxed{\\$18.00}", "18"),
        ("\\boxed{18 \\text{ dollars}}", "18"),
        ("\\boxed{2 \\times 9 = 18}", "18"),
        # An explicit statement wins over a later number.
        ("The answer is 18. I hope these 2 steps help.", "18"),
        ("The final answer is: 9 * 2 = 18 dollars. Then 3 + 4 = 7", "18"),
        ("#### 18\nNote: I double-checked with 3 methods.", "18"),
        ("First 3 + 4 = 7, then \\boxed{12} and finally 2 more steps", "12"),
        # A hyphen between numbers or a bullet is not a minus sign.
        ("A 5-year-old gets 3-4 cookies", "4"),
        ("- 5 apples", "5"),
        ("He pays 1 200 000 in total.", "1200000"),  # space thousands separators
        ("The answer is 12\u202f500.", "12500"),
        ("Step 2 100 people come.", "100"),  # a label number is no thousands group
        ("It is 18.\n\nQuestion: What is 2 + 3?\nAnswer: 5", "18"),  # a new question is cut
        ("It takes 3 hours, which is 180 minutes.", "3"),  # a restatement is no answer
        ("Vitamin B12", None),
        ("x2", None),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_gsm8k_hard_cases(response, answer):
    c = check_gsm8k(response, answer or "0")
    assert c.answer == answer
    assert c.correct == (answer is not None and answer != "0")


def test_gsm8k_equivalent_answers_share_a_voting_key():
    responses = [
        "18",
        "18.0",
        "$18",
        "$18.00",
        "18 dollars",
        "The answer is 18.",
        "\\boxed{18}",
        "#### 18",
        "She has 36/2 left",
    ]
    assert {check_gsm8k(r, "18").answer for r in responses} == {"18"}
    assert all(check_gsm8k(r, "18.0").correct for r in responses)
    assert check_gsm8k("1,000", "1000").answer == check_gsm8k("1000.0", "1000").answer == "1000"
    assert check_gsm8k("-0", "0").answer == "0"


def test_gsm8k_tolerance_is_tiny():
    assert check_gsm8k("33.3333333", "33.3333333").correct
    assert check_gsm8k("The answer is 0.1", "0.1000000001").correct
    assert not check_gsm8k("The answer is 0.1", "0.11").correct
    assert not check_gsm8k("1450001", "1,450,000").correct
    assert not check_gsm8k("18", "not a number").correct


def test_canonical_number():
    assert canonical_number(Fraction(18)) == "18"
    assert canonical_number(Fraction("-3.50")) == "-3.5"
    assert canonical_number(Fraction(1, 8)) == "0.125"
    assert canonical_number(Fraction(2, 6)) == "1/3"
    assert canonical_number(Fraction(1200)) == "1200"


def test_last_boxed_matches_braces():
    assert last_boxed("\\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert last_boxed("\\boxed{1} then \\boxed{\\sqrt{\\frac{1}{2}}}.") == "\\sqrt{\\frac{1}{2}}"
    assert last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert last_boxed("\\boxed 5$") == "5"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("nothing") is None


def test_boxes_in_order_with_spans():
    text = "a \\boxed{1} b \\boxed{\\frac{1}{2}} \\boxed{unclosed"
    found = boxes(text)
    assert [b.content for b in found] == ["1", "\\frac{1}{2}"]
    assert [text[b.start : b.end] for b in found] == ["\\boxed{1}", "\\boxed{\\frac{1}{2}}"]


def test_math_answer_parts():
    assert math_answer_parts("$x = \\boxed{2}$ and $x = \\boxed{-3}$.") == ["2", "-3"]
    assert math_answer_parts("\\boxed{1},\\boxed{2}, or \\boxed{1}") == ["1", "2"]
    assert math_answer_parts("\\boxed{4}. The area is $16$, so \\boxed{16}") == ["16"]
    assert math_answer_parts("$\\boxed{4}$, so the final answer is $16$.") == ["16"]
    assert math_answer_parts("$\\boxed{4}$. Therefore, the area is $16$.") == ["16"]
    assert math_answer_parts("$\\boxed{4}$. Final answer: I hope it is correct.") == ["4"]
    assert math_answer_parts("no box, the answer is 3") is None


# =============================================================================================
# MATH (math-verify in worker processes)


def _math_rows() -> list[dict[str, Any]]:
    return read_jsonl("math500", "test.jsonl")


def test_math_reference_solutions_verify_against_their_answer():
    rows = _math_rows()[::5]  # 100 items across every subject and level
    assert len(rows) >= 30
    with ThreadPoolExecutor(4) as ex:
        checks = list(ex.map(lambda r: check_math(r["solution"], r["answer"]), rows))
    for r, c in zip(rows, checks, strict=True):
        assert c.correct, (r["unique_id"], r["answer"], c)
        assert c.answer is not None
        assert c.details["extracted"] == last_boxed(r["solution"])


def test_math_solutions_fail_against_another_items_answer():
    rows = _math_rows()
    for i in range(0, 100, 7):
        a, b = rows[i], rows[i + 1]
        c = check_math(a["solution"], b["answer"])
        assert not c.correct, (a["answer"], b["answer"])
        assert c.answer == check_math(a["solution"], a["answer"]).answer


@pytest.mark.parametrize(
    ("response", "reference", "correct"),
    [
        ("So $\\boxed{\\frac{1}{2}}$.", "\\frac12", True),
        ("nested: \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", True),
        ("\\boxed{\\dfrac{14}{3}}", "\\frac{14}{3}", True),
        (
            "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}",
            "\\left( 3, \\frac{\\pi}{2} \\right)",
            True,
        ),
        ("\\boxed{(3, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        ("\\boxed{(\\pi/2, 3)}", "\\left( 3, \\frac{\\pi}{2} \\right)", False),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
        ("\\boxed{[-2, 7]}", "[-2,7]", True),
        ("\\boxed{(-2, 7)}", "[-2,7]", False),
        ("\\boxed{x = 5}", "5", True),
        ("The answer is 0.5", "\\frac{1}{2}", True),
        ("first \\boxed{3}, finally \\boxed{5}", "5", True),  # the last \boxed counts
        ("first \\boxed{5}, finally \\boxed{3}", "5", False),
        ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
        ("\\boxed{-3}", "3", False),
        ("I don't know.", "3", False),
        ("", "3", False),
    ],
)
def test_math_hard_cases(response, reference, correct):
    c = check_math(response, reference)
    assert c.correct is correct, c
    assert "timeout" not in c.details


def test_math_voting_keys():
    def key(response: str) -> str | None:
        return check_math(response, "0").answer

    half = {key(r) for r in ["\\boxed{\\frac{1}{2}}", "\\boxed{\\dfrac12}", "0.5", "\\boxed{0.50}"]}
    assert half == {"1/2"}
    assert key("\\boxed{50\\%}") not in half  # false split, never a false merge
    assert key("\\boxed{x = \\frac12}") not in half
    assert key("\\boxed{\\frac{1}{3}}") != key("\\boxed{0.333}")
    assert key("\\boxed{18}") == key("\\boxed{18.0}") == key("The answer is 18") == "18"
    assert key("\\boxed{2\\sqrt{2}}") == "2*sqrt(2)"
    # Boxed values of a set: one key whatever the order.
    assert key("$x = \\boxed{2}$ and $x = \\boxed{-3}$") == key("\\boxed{-3}, \\boxed{2}")
    assert key("nothing to see") is None


def test_math_works_from_worker_threads():
    cases = [("\\boxed{\\frac{2}{4}}", "\\frac12", True), ("\\boxed{3}", "4", False)] * 6

    def run(i: int) -> bool:
        assert threading.current_thread() is not threading.main_thread()
        response, reference, _ = cases[i]
        return check_math(response + " " * i, reference).correct  # distinct: no cache hits

    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(run, range(len(cases))))
    assert results == [c[2] for c in cases]


def test_math_pathological_input_times_out_in_a_thread_without_hanging():
    response = "\\boxed{9^{9^{9^{9}}}}"  # sympy would take forever to compare this with 5
    started = time.monotonic()
    with ThreadPoolExecutor(2) as ex:
        checks = list(ex.map(lambda _: check_math(response, "5", timeout=1.0), range(2)))
    elapsed = time.monotonic() - started
    for c in checks:
        assert c == Check(
            answer=None, correct=False, details={"timeout": True, "extracted": "9^{9^{9^{9}}}"}
        )
    assert elapsed < 20
    # The pool recovers: the next checks run in fresh workers.
    assert check_math("\\boxed{5}", "5").correct
    assert math_pool().size <= math_pool().max_workers


def test_math_pool_kills_the_timed_out_worker_only():
    pool = MathWorkerPool(max_workers=2)
    try:
        assert pool.run(pow, (2, 10), timeout=30) == 1024
        with ThreadPoolExecutor(2) as ex:
            slow = ex.submit(pool.run, time.sleep, (60,), 0.5)
            time.sleep(0.1)
            fast = ex.submit(pool.run, pow, (3, 3), 30)
            assert fast.result(30) == 27
            pids = pool.pids()
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                slow.result(30)
            assert time.monotonic() - started < 10
        assert pool.size == 1  # the sleeper was killed, the other worker stays
        for pid in set(pids) - set(pool.pids()):
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        with pytest.raises(RuntimeError, match="ValueError"):
            pool.run(int, ("not a number",), timeout=30)
        assert pool.run(pow, (2, 3), timeout=30) == 8
    finally:
        pool.shutdown()
    assert pool.size == 0


def test_math_pool_times_out_real_math_verify_work():
    from qalign.tasks import checkers

    pool = MathWorkerPool(max_workers=1, init_modules=("math_verify", "qalign.tasks.checkers"))
    try:
        assert pool.pids() == []  # workers start on demand
        assert pool.run(checkers._math_job, ("\\boxed{4}", "4"), timeout=30)[1] is True
        (pid,) = pool.pids()
        with pytest.raises(TimeoutError):
            pool.run(checkers._math_job, ("\\boxed{10^{10^{10^{10}}}+1}", "5"), timeout=1.0)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert pool.run(checkers._math_job, ("\\boxed{4}", "5"), timeout=30)[1] is False
    finally:
        pool.shutdown()


def test_math_from_an_unguarded_script(tmp_path):
    # Workers are fresh interpreters that do not re-import the caller's __main__, so a script
    # without `if __name__ == "__main__":` works (multiprocessing's spawn would recurse).
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            """
            from qalign.tasks.checkers import check_math
            print("RESULT", check_math("\\\\boxed{\\\\frac{2}{4}}", "\\\\frac12").correct)
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.count("RESULT") == 1
    assert "RESULT True" in out.stdout


# =============================================================================================
# Multiple choice


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def _truthfulqa_items(n: int = 24) -> list[tuple[list[str], int]]:
    rows = json.loads(data_file("truthfulqa", "mc_task_v0.json").read_text(encoding="utf-8"))
    out = []
    for i, row in enumerate(rows[:n]):
        choices = list(row["mc1_targets"])
        correct = choices[0]
        random.Random(i).shuffle(choices)
        out.append((choices, choices.index(correct)))
    return out


def _mmlu_items(per_file: int = 8) -> list[tuple[list[str], int]]:
    out = []
    for name in ["mmlu_high_school_geography.csv", "mmlu_astronomy.csv", "mmlu_virology.csv"]:
        path = data_file("mmlu_redux", name)
        text = path.read_text(encoding="utf-8")
        delimiter = ";" if text.startswith("question;") else ","
        rows = list(csv.DictReader(text.splitlines(), delimiter=delimiter))
        for row in rows[:per_file]:
            out.append((list(ast.literal_eval(row["choices"])), int(row["answer"])))
    return out


# Response styles; {L} is the chosen letter, {T} its option text.
_MC_STYLES = [
    "The answer is ({L}).",
    "I think the answer is {L} because {T}",
    "Answer: {L}",
    "**{L}) {T}**",
    "{L}) {T}",
    "A good way to decide is to rule out the others. I believe {T}, so I choose {L}.",
    "After considering every option, I'd go with option {L}: {T}",
    "\\boxed{{{L}}}",
    "Let me think step by step.\nI know that {T}\n\nFinal answer: {L}",
    "{L}",
    "A: The correct choice is ({L}) {T}",
    "I'm confident: **{L}**",
    "The best answer is {L}. A common mistake is to pick another option.",
]


@pytest.mark.parametrize("source", ["truthfulqa", "mmlu"])
def test_choice_real_items_in_varied_styles(source):
    items = _truthfulqa_items() if source == "truthfulqa" else _mmlu_items()
    assert len(items) >= 24
    for i, (choices, correct_index) in enumerate(items):
        letters = _letters(len(choices))
        reference = letters[correct_index]
        style = _MC_STYLES[i % len(_MC_STYLES)]
        wrong_index = (correct_index + 1 + i % (len(choices) - 1)) % len(choices)
        for index, correct in [(correct_index, True), (wrong_index, False)]:
            text = choices[index].strip().rstrip(".") + "."
            response = style.replace("{L}", letters[index]).replace("{T}", text)
            c = check_choice(response, letters, reference)
            assert c.answer == letters[index], (response, letters, c)
            assert c.correct is correct
            assert c.correct_loose is None


def test_choice_truthfulqa_has_option_letters_a_and_i():
    # TruthfulQA MC1 has up to 13 options, so "A" and "I" are real option letters there.
    items = _truthfulqa_items(200)
    assert any(len(choices) >= 9 for choices, _ in items)
    letters = _letters(13)
    assert check_choice("I think the answer is I.", letters, "I").correct
    assert check_choice("I have no comment, so I pick I", letters, "I").answer == "I"
    assert check_choice("I would say A.", letters, "A").correct
    assert check_choice("I'd go with (I).", letters, "I").correct


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("I think the answer is B", "B"),
        ("A: the answer is C", "C"),
        ("A: C", "C"),
        ("A good answer is D.", "D"),
        ("A good answer would mention Paris, so B", "B"),
        ("The answer is (B).", "B"),
        ("The correct answer is: **(C) Paris**", "C"),
        ("Answer: B", "B"),
        ("ANSWER: d", "D"),
        ("The answer is a.", "A"),
        ("the answer is a tricky one: C", "C"),
        ("**D**", "D"),
        ("B) Paris", "B"),
        ("I believe A is correct.", "A"),
        ("A is correct.", "A"),
        ("I'm fairly sure it's C", "C"),
        ("It's B, I guess", "B"),
        ("A", "A"),
        ("\\boxed{C}", "C"),
        ("\\boxed{\\text{(D)}}", "D"),
        ("Option B is wrong, so the answer is A.", "A"),
        ("The answer is A, not option B", "A"),
        ("(A) is wrong and (C) is right.", "C"),
        ("My answer: **B. The sun**", "B"),
        ("Choice (D) fits best.", "D"),
        ("I don't know.", None),
        ("A dog is a mammal.", None),
        ("E", None),
        ("The answer is E.", None),
        ("", None),
    ],
)
def test_choice_hard_cases(response, answer):
    letters = ["A", "B", "C", "D"]
    found = extract_choice(response, letters)
    assert (found[0] if found else None) == answer
    c = check_choice(response, letters, answer or "A")
    assert c.answer == answer
    assert c.correct == (answer is not None)


def test_choice_reference_is_normalised():
    assert check_choice("The answer is (b)", "ABCD", " b ").correct


# =============================================================================================
# IFEval


def _ifeval_items() -> dict[int, dict[str, Any]]:
    return {r["key"]: r for r in read_jsonl("ifeval", "input_data.jsonl")}


_WAR = (
    "The Tang dynasty knew war and peace. War on the frontier alternated with peace at court. "
    "The An Lushan war shattered the peace. After the war, peace returned slowly. "
    "Poets wrote of war and longed for peace. Every war ended in an uneasy peace. "
    "Tang generals fought war after war to secure peace. Peace treaties followed each war. "
    "Merchants prized peace, and peace let the Silk Road flourish."
)
_LONG = " ".join(
    [
        "Sleeping in a hammock gently rocks the body, which helps many people fall asleep faster.",
        "The slight sway also supports deeper sleep stages and fewer awakenings during the night.",
        "Because a hammock cradles the spine, pressure on the hips and shoulders is reduced.",
        "Hammocks are light and cheap, and they can be hung almost anywhere from trees to porches.",
    ]
    * 14
)  # 14 x 4 sentences, about 900 words
_NO_COMMA_LONG = _LONG.replace(",", "")
_KANNADA = (
    "ಹ್ಯಾಂಬರ್ಗರ್‌ಗಳು ಸ್ಯಾಂಡ್‌ವಿಚ್‌ಗಳೇ? ಹೌದು, ಎರಡು ಬ್ರೆಡ್ ತುಂಡುಗಳ ನಡುವೆ ಮಾಂಸ ಇರುವುದರಿಂದ "
    "ಅವುಗಳನ್ನು ಸ್ಯಾಂಡ್‌ವಿಚ್ ಎಂದು ಕರೆಯಬಹುದು."
)
_ESSAY = (
    " ".join(
        f"Point {i}: aluminium cans keep food safe for years because light and air stay out."
        for i in range(1, 33)
    )
    + " The metal is a material that creates little waste. Any meal can be canned."
)


# (item key, response, instructions violated under strict, instructions violated under loose).
# An instruction is named by its id (all occurrences) or its position in the item's list.
IFEVAL_CASES: list[tuple[int, str, set[str | int], set[str | int] | None]] = [
    (
        1001,
        "Day the first: we sail unto Tokyo and gaze upon the towers of light.\n"
        "Day the second: to Kyoto we go where temples old do dwell.\n"
        "Day the third: in Osaka we shall feast till the moon doth rise.",
        set(),
        None,
    ),
    (
        1001,
        "Day the first: we sail unto Tokyo, and gaze upon the towers of light.",
        {"punctuation:no_comma"},
        None,
    ),
    (  # loose: the comma is only in the first line
        1001,
        "Sure, here is thy itinerary:\nDay the first: we sail unto Tokyo.\nDay the second: Kyoto.",
        {"punctuation:no_comma"},
        set(),
    ),
    (
        1005,
        "[Name]\n[Address], [City], [State] [Zip]\n[Phone] | [Email]\n\n"
        "Objective: a motivated graduate seeking a first role at [Company].\n"
        "Education: [High School], graduated [Year], GPA [GPA].\n"
        "Skills: [Skill 1], [Skill 2].\nReferences: [Reference].",
        set(),
        None,
    ),
    (
        1005,
        "[Name]\n[Address]\nObjective: a motivated graduate seeking a first job at [Company].",
        {"detectable_content:number_placeholders"},
        None,
    ),
    (
        1012,
        "Write an email to my boss telling him that I am quitting. The email must contain a title "
        "wrapped in double angular brackets, i.e. <<title>>.\n\n<<Resignation Notice>>\n\n"
        "Dear Mr. Smith,\nI am writing to let you know that I am resigning from my position. "
        "My last day will be two weeks from today.\nBest regards,\nAlex",
        set(),
        None,
    ),
    (
        1012,
        "Sure! <<Resignation Notice>>\nDear Mr. Smith, I am resigning from my position.",
        {"combination:repeat_prompt"},
        None,
    ),
    (
        1019,
        "what are the two young boys with toy guns and horns doing in the park this afternoon?",
        set(),
        None,
    ),
    (
        1019,
        "What are the two young boys with toy guns and horns doing in the park this afternoon?",
        {"change_case:english_lowercase"},
        None,
    ),
    (
        1021,
        "PARAGRAPH 1\nTHIS SENTENCE CLAIMS THAT A BAD LAW SHOULD NOT BE FOLLOWED, BUT IT NEVER "
        "SAYS WHO DECIDES WHAT MAKES A LAW BAD.\n\nPARAGRAPH 2\nTHE SENTENCE ALSO IGNORES THE "
        "LEGAL WAYS TO CHANGE A LAW, SUCH AS VOTING, PETITIONS AND PEACEFUL PROTEST.",
        set(),
        None,
    ),
    (
        1021,
        "PARAGRAPH 1\nThis sentence claims that a bad law should not be followed, but it never "
        "says who decides what makes a law bad.",
        {"change_case:english_capital", "detectable_format:multiple_sections"},
        None,
    ),
    (
        1082,
        "Jake opened his eyes to a floating health bar above his head.\n***\n"
        "By noon he had learned that jumping twice let him reach the rooftops.",
        set(),
        None,
    ),
    (
        1082,
        "Jake opened his eyes to a health bar. *** He jumped. *** He saved the game.",
        {"length_constraints:number_paragraphs"},
        None,
    ),
    (
        1092,
        "Japan in Five Days\n\nI landed in Tokyo on a rainy morning and went straight to a ramen "
        "shop near the station. Kyoto was all temples and quiet gardens, and Osaka was pure "
        "street food. I would go back tomorrow.",
        set(),
        None,
    ),
    (1092, _LONG, {"length_constraints:number_words"}, None),
    (1072, _LONG, set(), None),
    (1072, "Hammocks are great for sleep.", {"length_constraints:number_words"}, None),
    (
        1098,
        'People often call God "the Almighty".\n******\nAnother common name is "the Creator".',
        set(),
        None,
    ),
    (1098, "People often call God the Almighty.", {"combination:two_responses"}, None),
    (
        1107,
        "Why did the rocket break up with the moon? It needed space.\n******\n"
        "What is a rocket's favorite meal? A launch.",
        set(),
        None,
    ),
    (
        1107,
        "Why did the rocket leave? It needed space, lots of it.\n******\n"
        "Why did the rocket leave? It needed space, lots of it.\n******\n"
        "Why did the rocket leave? It needed space, lots of it.",
        {"punctuation:no_comma", "combination:two_responses"},
        None,
    ),
    (
        1108,
        _KANNADA,
        set(),
        None,
    ),
    (
        1108,
        "Yes, hamburgers are sandwiches because the patty sits between two pieces of bread.",
        {"language:response_language"},
        None,
    ),
    (
        3682,
        "Google, Facebook, Microsoft, Apple und Amazon geben jedes Jahr viele Millionen Dollar für "
        "Lobbyarbeit in Washington aus. Facebook und Amazon haben ihre Ausgaben in den letzten "
        "Jahren besonders stark erhöht.",
        set(),
        None,
    ),
    (
        3682,
        "Google, Facebook, Microsoft, Apple and Amazon spend millions on lobbying every year.",
        {"language:response_language"},
        None,
    ),
    (
        1122,
        "this weekend is all about good company, soft robes and late nights with the people you "
        "love. #playboy #weekend #style #nightlife",
        set(),
        None,
    ),
    (
        1122,
        "this weekend is all about good company and late nights with the people you love. "
        "#playboy #weekend",
        {"keywords:letter_frequency"},
        None,
    ),
    (
        1127,
        "SECTION 1\nThe bell rings on without me.\nSECTION 2\nMy desk gathers dust.\n"
        "SECTION 3\nThe notes I never took.\nSECTION 4\nThe fees I already paid.\n"
        "Can I get my money back for the classes I missed?",
        set(),
        None,
    ),
    (
        1127,
        "SECTION 1\nThe bell rings on without me.\nSECTION 2\nMy desk gathers dust.\n"
        "SECTION 3\nThe fees I already paid.\nThanks for reading.",
        {"detectable_format:multiple_sections", "startend:end_checker"},
        None,
    ),
    (
        1128,
        "The sentiment is negative. Is there anything else I can help with?",
        set(),
        None,
    ),
    (1128, "The sentiment is negative.", {"startend:end_checker"}, None),
    (  # loose: drop the last line
        1128,
        "The sentiment is negative.\nIs there anything else I can help with?\n(Generated answer)",
        {"startend:end_checker"},
        set(),
    ),
    (
        1129,
        'Write a short startup pitch for a new kind of ice cream called "Sunnis ice cream". The '
        'ice cream should be gentle on the stomach. Contain 6 or more exclamation marks "!" in '
        "your response.\n\nIntroducing Sunnis ice cream! Gentle on the stomach! Made with oat "
        "milk! No bloating! Pure joy! Try it today!",
        set(),
        None,
    ),
    (
        1129,
        'Write a short startup pitch for a new kind of ice cream called "Sunnis ice cream". The '
        'ice cream should be gentle on the stomach. Contain 6 or more exclamation marks "!" in '
        "your response.\n\nIntroducing Sunnis ice cream. It is gentle on the stomach.",
        {"keywords:letter_frequency"},
        None,
    ),
    (
        1132,
        "WE ARE THE GIFTED AND WE SHINE SO BRIGHT\nWE PLAY ALL DAY AND WE PLAY ALL NIGHT\n"
        "THE NOT GIFTED SING ALONG WITH US\nTOGETHER WE RIDE THE MIDNIGHT BUS",
        set(),
        None,
    ),
    (
        1132,
        "THE GIFTED AND THE NOT GIFTED\nWE ROCK ALL DAY AND WE ROCK ALL NIGHT\nSING ALONG WITH US",
        {"keywords:forbidden_words"},
        None,
    ),
    (
        1137,
        '{"explication": "Manger des aliments sains aide le corps à guérir car il reçoit des '
        'vitamines et des minéraux."}',
        set(),
        None,
    ),
    (
        1137,
        "Manger sainement est important : la nourriture saine aide le corps à guérir.",
        {"detectable_format:json_format", "keywords:forbidden_words"},
        None,
    ),
    (
        1139,
        'Write a funny haiku about moms, containing keywords "mom" and "mother" in your '
        "response.\n\nMom cooks dinner\nmy mother burns the toast again\nwe order pizza",
        set(),
        None,
    ),
    (
        1139,
        "Here is a haiku:\nmom cooks dinner\nmy mother burns the toast again\nwe order pizza",
        {"combination:repeat_prompt"},
        None,
    ),
    (
        1139,
        'Write a funny haiku about dads, containing keywords "dad" in your response.\n\nDad '
        "cooks dinner",
        {"combination:repeat_prompt", "keywords:existence"},
        None,
    ),
    (
        1153,
        "the hajj is a story of faith. every pilgrim who walks around the kaaba adds a new story "
        "to a tradition that is centuries old.",
        set(),
        None,
    ),
    (
        1153,
        "the hajj is a story of faith and devotion for millions of muslims every year.",
        {"keywords:frequency"},
        None,
    ),
    (1203, _WAR, set(), None),
    (
        1203,
        "The Tang dynasty knew war and peace. Poets wrote about war, and peace came later.",
        {"keywords:frequency"},
        None,
    ),
    (
        1203,
        _WAR.replace("peace", "calm"),
        {1},
        None,
    ),
    (1216, '"' + _LONG + '"', set(), None),
    (1216, _LONG, {"startend:quotation"}, None),
    (
        122,
        '"The internet began as ARPANET in 1969. Today it connects billions of people."',
        set(),
        None,
    ),
    (
        122,
        "The internet began as ARPANET in 1969. Today it connects billions of people.",
        {"startend:quotation"},
        None,
    ),
    (  # loose: drop the first line
        122,
        'Here is my blog post:\n"The internet began as ARPANET in 1969. Today it connects us."',
        {"startend:quotation"},
        set(),
    ),
    (
        1237,
        "Hey teens! *Buena Onda is the coolest spot in town.* The empanadas are **huge** and "
        "*the Argentinian steak is unreal*.",
        set(),
        None,
    ),
    (
        1237,
        "Hey teens! Buena Onda is the coolest spot in town. *The empanadas are huge.*",
        {"detectable_format:number_highlighted_sections", "keywords:existence"},
        None,
    ),
    (
        1246,
        "Meet [Product], sleek and bright,\nit makes your [task] feel light.\n\n"
        "P.P.S Replace the brackets with your product details.",
        set(),
        None,
    ),
    (
        1246,
        "Meet [Product], sleek and bright,\nit makes your [task] feel light.\n\n"
        "Note: replace the brackets with your product details.",
        {"detectable_content:postscript"},
        None,
    ),
    (
        1262,
        "<<Heavier Axles, Harder Roads>>\nHeavier axle loads press harder on the pavement. Road "
        "damage grows roughly with the fourth power of axle weight. So a small increase in weight "
        "causes much more wear.",
        set(),
        None,
    ),
    (
        1262,
        "Heavier axles press harder. Roads crack. Repairs cost money. Taxes rise. Drivers "
        "complain. Nobody wins.",
        {"detectable_format:title", "length_constraints:number_sentences"},
        None,
    ),
    (1265, _ESSAY, set(), None),
    (
        1265,
        "Aluminium cans keep a meal fresh. The material is light. There is little waste.",
        {"length_constraints:number_sentences"},
        None,
    ),
    (
        1286,
        "Here are the differences:\n* The 13 colonies rebelled.\n* Canada stayed loyal.\n"
        "* Trade rules differed.\n* Settlement patterns differed.\n"
        "* Religion varied more in the 13 colonies.\n* Self-government was stronger there.",
        set(),
        None,
    ),
    (
        1286,
        "* The 13 colonies rebelled.\n* Canada stayed loyal.\n* Trade rules differed.\n"
        "* Settlement patterns differed.\n* Religion varied more in the 13 colonies.",
        {"detectable_format:number_bullet_lists"},
        None,
    ),
    (
        1305,
        "\n".join(
            f"* {n}"
            for n in [
                "Liam",
                "Noah",
                "Oliver",
                "Elijah",
                "James",
                "William",
                "Benjamin",
                "Lucas",
                "Henry",
                "Theodore",
            ]
        )
        + "\n\nP.P.S Congratulations on the baby!",
        set(),
        None,
    ),
    (
        1305,
        "\n".join(
            f"* {n}"
            for n in ["Liam", "Noah", "Oliver", "Elijah", "James", "William", "Benjamin", "Lucas"]
        ),
        {"detectable_content:postscript", "detectable_format:number_bullet_lists"},
        None,
    ),
    (
        1314,
        "An avocado is not a fish; salmon is. Salmon is RICH in omega-3 fats, while avocado "
        "brings creamy texture and FIBER. Together they make a GREAT salad.",
        set(),
        None,
    ),
    (
        1314,
        "An avocado is not a fish; salmon is. Salmon is rich in omega-3 fats.",
        {1},
        None,
    ),
    (
        1314,
        "AN AVOCADO IS NOT A FISH; SALMON IS. SALMON IS RICH IN FATS.",
        {0},
        None,
    ),
    (
        1040,
        '"Matthias Algiers\nSoftware engineer with EXPERT knowledge of Python and a PROVEN record '
        'of leading teams.\nSkills: distributed systems, mentoring, public speaking."',
        set(),
        None,
    ),
    (
        1040,
        "MATTHIAS ALGIERS: EXPERT PYTHON ENGINEER WITH A PROVEN RECORD OF LEADING LARGE TEAMS.",
        {0, "startend:quotation"},
        None,
    ),
    (
        1609,
        '"Weekend plans are the easiest opener: ask what she is up to on Saturday.\n\n'
        "Suggest something specific, like the new taco place downtown.\n\n"
        "Keep it light and give her an easy way to say no.\n\n"
        'If she says yes, confirm the time and place the next day."',
        set(),
        None,
    ),
    (
        1609,
        '"Hey, ask her about the weekend.\n\nSuggest the taco place.\n\nKeep it light."',
        {"length_constraints:nth_paragraph_first_word"},
        None,
    ),
    (
        181,
        "ALIENS LAND IN OHIO, DEMAND BETTER WIFI\n\nPresident Smith greeted the visitors with a "
        "firm handshake.\n\nThe aliens asked for the password.\n\nNobody knew it.\n\n"
        "The aliens left in disgust.\n\nExperts say they will be back after the router reboots.",
        set(),
        None,
    ),
    (
        181,
        "ALIENS LAND IN OHIO\n\nThe President greeted the visitors.\n\nThe aliens asked for the "
        "password.\n\nNobody knew it.\n\nThe aliens left.\n\nExperts expect them back.",
        {"length_constraints:nth_paragraph_first_word"},
        None,
    ),
    (227, "Usually not, golden retrievers are larger. My answer is no.", set(), None),
    (
        227,
        "No, golden retrievers are usually bigger than poodles.",
        {"detectable_format:constrained_response"},
        None,
    ),
    (
        1000,
        "*Early Life* Raymond III was born in 1140. " + _NO_COMMA_LONG + " *Regency* He served "
        "as regent. *Legacy* He died in 1187.",
        set(),
        None,
    ),
    (
        1000,
        "*Early Life* Raymond III was born in 1140. " + _LONG + " *Regency* He served "
        "as regent. *Legacy* He died in 1187.",
        {"punctuation:no_comma"},
        None,
    ),
    (
        1075,
        '```json\n{"product": "CloudSoft Diaper", "tagline": "Comfort that lasts all night"}\n```',
        set(),
        None,
    ),
    (
        1075,
        'Introducing CloudSoft: {"tagline": "Comfort that lasts all night"}',
        {"detectable_format:json_format"},
        None,
    ),
    (
        1236,
        "Sink into comfort.\n***\nDesigned to pass any designer's eye.\n***\nOrder yours today.",
        set(),
        None,
    ),
    (
        1236,
        "Sink into comfort.\n\nDesigned to pass any designer's eye.\n\nOrder yours today.",
        {"length_constraints:number_paragraphs"},
        None,
    ),
]


def _expected(ids: list[str], violated: set[str | int]) -> list[bool]:
    return [not (i in violated or iid in violated) for i, iid in enumerate(ids)]


@pytest.mark.parametrize(
    ("key", "response", "strict_violations", "loose_violations"),
    IFEVAL_CASES,
    ids=[f"{c[0]}-{i}" for i, c in enumerate(IFEVAL_CASES)],
)
def test_ifeval_real_items(key, response, strict_violations, loose_violations):
    item = _ifeval_items()[key]
    meta = {k: item[k] for k in ("instruction_id_list", "kwargs", "prompt")}
    c = check_ifeval(response, meta)
    ids = item["instruction_id_list"]
    strict = _expected(ids, strict_violations)
    loose = _expected(ids, strict_violations if loose_violations is None else loose_violations)
    per = c.details["instructions"]
    assert [p["id"] for p in per] == ids
    assert [p["strict"] for p in per] == strict, per
    assert [p["loose"] for p in per] == loose, per
    assert c.correct == all(strict)
    assert c.correct_loose == all(loose)
    assert c.answer is None
    json.dumps(c.details)  # stored as JSON


def test_ifeval_cases_cover_every_instruction_both_ways():
    items = _ifeval_items()
    followed: set[str] = set()
    violated: set[str] = set()
    for key, _, strict_violations, _ in IFEVAL_CASES:
        ids = items[key]["instruction_id_list"]
        for ok, iid in zip(_expected(ids, strict_violations), ids, strict=True):
            (followed if ok else violated).add(iid)
    all_ids = {i for r in items.values() for i in r["instruction_id_list"]}
    assert len(all_ids) == 25
    assert set(INSTRUCTIONS) == all_ids
    assert followed == all_ids
    assert violated == all_ids
    assert len({key for key, *_ in IFEVAL_CASES}) >= 30


def test_ifeval_every_real_item_evaluates():
    # No instruction id or kwargs in the data makes a checker fail.
    for item in _ifeval_items().values():
        c = check_ifeval(item["prompt"], item)
        assert len(c.details["instructions"]) == len(item["instruction_id_list"])
        assert c.correct_loose is not None
        assert c.correct <= c.correct_loose


def test_ifeval_hub_style_null_kwargs_and_errors():
    meta = {
        "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
        "kwargs": [
            {"num_words": None, "relation": None},
            {"num_words": 3, "relation": "at least", "keyword": None},
        ],
        "prompt": "p",
    }
    assert check_ifeval("one two three", meta).correct
    assert not check_ifeval("one, two, three", meta).correct
    assert not check_ifeval("   ", meta).correct
    assert not check_ifeval("   ", meta).correct_loose
    with pytest.raises(ValueError, match="unknown IFEval instruction"):
        check_ifeval("x", {"instruction_id_list": ["nope:nope"], "kwargs": [{}]})
    with pytest.raises(ValueError, match="kwargs"):
        check_ifeval("x", {"instruction_id_list": ["punctuation:no_comma"], "kwargs": []})


def test_ifeval_language_detection_is_deterministic_and_thread_safe():
    item = _ifeval_items()[1108]
    text = _KANNADA
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda _: check_ifeval(text, item).correct, range(32)))
    assert results == [True] * 32


def test_ifeval_loose_variants():
    v = loose_variants("**Sure**\nbody *x*\nend")
    assert v[0] == "**Sure**\nbody *x*\nend"
    assert v[1] == "Sure\nbody x\nend"
    assert v[2:5] == ["body *x*\nend", "**Sure**\nbody *x*", "body *x*"]
    assert v[5:] == ["body x\nend", "Sure\nbody x", "body x"]


@pytest.mark.parametrize(
    ("text", "n"),
    [
        # The counts NLTK's Punkt (the reference's tokenizer) gives.
        ("Hello world. This is Mr. Smith. He lives in the U.S. now.", 3),
        ("I think so... and then? Yes! Done", 3),
        ("e.g. this is one. And two.", 3),  # "e.g." is not among Punkt's abbreviations
        ("Item 1\nItem 2\nItem 3", 1),  # a line break alone ends no sentence
        ("J. K. Rowling wrote it. It sold well.", 2),
        ("The price is 3.5 dollars. OK.", 2),
        ('"Hi." She said. Bye', 3),
        ("Wait... Then it happened.", 1),
        ("Plan B. It works.", 2),
        ("Vitamin C. It helps.", 1),  # "c" is a learned abbreviation
        ("Steps:\n1. Mix the flour.\n2. Add eggs.", 4),  # "1." before a capital is a sentence
        ("One sentence without a stop", 1),
        ("", 0),
    ],
)
def test_count_sentences(text, n):
    assert count_sentences(text) == n


def test_word_tokens():
    assert count_words("Hello, world! It's 3.5 km.") == 7  # \w+ runs, as NLTK's RegexpTokenizer
    tokens = capital_word_tokens("I DON'T KNOW, WELL-KNOWN U.S.A. (NASA) I'm fine")
    assert tokens == ["I", "DO", "N'T", "KNOW", "WELL-KNOWN", "U.S.A", "NASA", "I", "'m", "fine"]
    assert sum(t.isupper() for t in tokens) == 8
