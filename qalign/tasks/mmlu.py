"""MMLU-Redux (edinburgh-dawg/mmlu-redux-2.0): 57 MMLU subjects x 100 re-annotated questions.

Prompt: one user turn, the paper's multiple-choice template (QAlign repository,
`qalign/utils/data.py`, `processmmlu_data`), with the options in a shuffled order:

    Choose the correct answer to the following multiple-choice question about {subject}.

    Question: {question}

    A). {option}
    B). {option}
    ...

    Provide your reasoning about the answer and finish your answer with the letter
    corresponding to the correct option (e.g., A, B, C, or D).

(the last sentence is one line) and one more empty line: the text ends with "\\n\\n", as in the
reference code. `{subject}` is the subject name with underscores as spaces (the reference code
built it with a leading space, giving "about  anatomy"; we write a single space).

Reference: the letter of the correct option after shuffling. The options of each item are
shuffled with a generator seeded by (`choice_seed`, the item id `"<subject>/<row>"`), so an
item's order never depends on `limit`, `shuffle_seed`, `subset` or `only_ok`.

Rows: by default only rows whose annotation `error_type` is `ok` are kept (`only_ok=True`; 5,330
of 5,700); `only_ok=False` keeps every row, with its normalised `error_type` in `meta` (flagged
rows keep the original MMLU answer as the reference).

The local files are the authors' raw annotation CSVs (`mmlu_<subject>.csv`); `read_redux_csv`
handles their quirks: `;` or `,` delimiters, columns in differing orders (read by name), a stray
Mac-Roman byte in moral_scenarios, `choices` as a Python-list literal, and `error_type`
spellings (`OK `, `Wrong Groundtruth`, ...) normalised to lower_snake_case.
"""

from __future__ import annotations

import ast
import csv
import io
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qalign.tasks.base import Check, TaskItem
from qalign.tasks.custom import StrPath, hub_rows, item_rng, select_indices, user_turn

# --- multiple-choice helpers (shared with TruthfulQA) ----------------------------------------

LETTERS = string.ascii_uppercase
MC_CLOSING = (
    "\nProvide your reasoning about the answer and finish your answer with the letter "
    "corresponding to the correct option (e.g., A, B, C, or D).\n\n"
)


def mc_prompt(intro: str, question: str, choices: Sequence[str], letters: Sequence[str]) -> str:
    """The paper's multiple-choice user turn."""
    options = "".join(
        f"{letter}). {choice}\n" for letter, choice in zip(letters, choices, strict=True)
    )
    return f"{intro}Question: {question}\n\n{options}{MC_CLOSING}"


@dataclass(frozen=True)
class Shuffled:
    """Options in presentation order. `permutation[k]` is the original index of option k."""

    choices: list[str]
    letters: list[str]
    answer_index: int
    permutation: list[int]

    @property
    def reference(self) -> str:
        return self.letters[self.answer_index]


def shuffle_options(
    choices: Sequence[str],
    answer: int,
    *,
    seed: int,
    namespace: str,
    key: str,
    shuffle: bool = True,
) -> Shuffled:
    """Shuffle `choices` with a generator that depends only on (seed, namespace, key)."""
    n = len(choices)
    if not 2 <= n <= len(LETTERS):
        raise ValueError(f"expected 2 to {len(LETTERS)} options, got {n}")
    if not 0 <= answer < n:
        raise ValueError(f"answer index {answer} is out of range for {n} options")
    perm = list(range(n))
    if shuffle:
        item_rng(seed, namespace, key).shuffle(perm)
    return Shuffled(
        choices=[str(choices[j]) for j in perm],
        letters=list(LETTERS[:n]),
        answer_index=perm.index(answer),
        permutation=perm,
    )


def check_choice_item(response: str, item: TaskItem) -> Check:
    from qalign.tasks.checkers import check_choice

    if item.reference is None:
        raise ValueError("this multiple-choice item has no reference letter")
    return check_choice(response, list(item.meta["letters"]), item.reference)


# --- MMLU-Redux --------------------------------------------------------------------------------

HUB_ID = "edinburgh-dawg/mmlu-redux-2.0"
HUB_SPLIT = "test"
INTRO = "Choose the correct answer to the following multiple-choice question about {subject}.\n\n"

SUBJECTS: tuple[str, ...] = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
    "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
    "college_medicine", "college_physics", "computer_security", "conceptual_physics",
    "econometrics", "electrical_engineering", "elementary_mathematics", "formal_logic",
    "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics",
    "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history", "human_aging", "human_sexuality", "international_law",
    "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law",
    "professional_medicine", "professional_psychology", "public_relations", "security_studies",
    "sociology", "us_foreign_policy", "virology", "world_religions",
)  # fmt: skip

_REQUIRED = ("question", "choices", "answer")


def normalise_error_type(value: str | None) -> str:
    """`OK ` -> `ok`, `Wrong Groundtruth` -> `wrong_groundtruth`, ..."""
    return re.sub(r"\s+", "_", (value or "").strip().lower())


def _decode(raw: bytes) -> str:
    """UTF-8, except that bytes which are not valid UTF-8 are read as Mac Roman (the one such byte
    in the release, 0xD5 in mmlu_moral_scenarios.csv, is a Mac-Roman right quote)."""
    text = raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    return re.sub(
        "[\udc80-\udcff]+",
        lambda m: bytes(ord(c) - 0xDC00 for c in m.group()).decode("mac_roman"),
        text,
    )


def read_redux_csv(path: Path) -> list[dict[str, str]]:
    """The rows of one raw MMLU-Redux annotation CSV, columns by name."""
    text = _decode(path.read_bytes())
    header = text.split("\n", 1)[0]
    delimiter = ";" if header.count(";") > header.count(",") else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    missing = [c for c in _REQUIRED if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path}: no column(s) {', '.join(missing)} in the header {header!r}")
    return [{k: v for k, v in row.items() if k} for row in reader]


def _subjects(subset: str | Sequence[str] | None, available: Sequence[str]) -> list[str]:
    if subset is None:
        return list(available)
    names = [s.strip() for s in subset.split(",")] if isinstance(subset, str) else list(subset)
    names = [n.removeprefix("mmlu_") for n in names if n]
    unknown = [n for n in names if n not in available]
    if unknown or not names:
        raise ValueError(
            f"mmlu-redux: unknown subject(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
            f"known: {', '.join(available)}"
        )
    return [s for s in available if s in set(names)]


def _local_files(path: StrPath, subset: str | Sequence[str] | None) -> list[tuple[str, Path]]:
    p = Path(path)
    if p.is_file():
        subject = p.stem.removeprefix("mmlu_")
        return [(s, p) for s in _subjects(subset, [subject])]
    if not p.is_dir():
        raise FileNotFoundError(f"mmlu-redux: {str(p)!r} does not exist")
    found = {f.stem.removeprefix("mmlu_"): f for f in sorted(p.glob("mmlu_*.csv"))}
    if not found:
        raise FileNotFoundError(f"mmlu-redux: no mmlu_<subject>.csv files in {str(p)!r}")
    return [(s, found[s]) for s in _subjects(subset, sorted(found))]


@dataclass(frozen=True)
class _Row:
    subject: str
    row: int  # index of the row in its subject's file / hub split
    question: str
    choices: list[str]
    answer: int
    error_type: str
    correct_answer: str | None


def _canonical(subject: str, i: int, raw: dict[str, Any], where: str) -> _Row:
    try:
        choices = raw["choices"]
        if isinstance(choices, str):
            choices = ast.literal_eval(choices)
        if not isinstance(choices, list | tuple) or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"choices is not a list of strings: {raw['choices']!r}")
        answer = int(str(raw["answer"]).strip())
        if not 0 <= answer < len(choices):
            raise ValueError(f"answer {answer} is out of range for {len(choices)} choices")
        correct = raw.get("correct_answer")
        return _Row(
            subject=subject,
            row=i,
            question=str(raw["question"]),
            choices=list(choices),
            answer=answer,
            error_type=normalise_error_type(raw.get("error_type")),
            correct_answer=None if correct in (None, "") else str(correct),
        )
    except (KeyError, ValueError, SyntaxError) as exc:
        raise ValueError(f"mmlu-redux: {where} row {i}: {exc!s}") from exc


class MMLUReduxTask:
    """MMLU-Redux; `only_ok=True` keeps the rows annotated `ok` (see the module docstring)."""

    name = "mmlu-redux"

    def __init__(
        self, only_ok: bool = True, shuffle_choices: bool = True, choice_seed: int = 0
    ) -> None:
        self.only_ok = only_ok
        self.shuffle_choices = shuffle_choices
        self.choice_seed = choice_seed

    def load(
        self,
        path: StrPath | None,
        *,
        subset: str | Sequence[str] | None = None,
        split: str | None = None,
        limit: int | None = None,
        shuffle_seed: int | None = None,
    ) -> list[TaskItem]:
        """Items of every subject, or of `subset` (a subject name, a comma-separated string of
        names, or a list), in subject-name order then row order. `path`: a folder of
        `mmlu_<subject>.csv` files or one such file (`split` unused); None loads the hub
        dataset, one config per subject. Each item's `meta` has `id` ("<subject>/<row>"),
        `row` (its row in the subject's file), `source_index` (its position among the loaded
        rows, after the `only_ok` filter), the shuffled `choices`, `letters`, `answer_index`,
        `permutation` and the normalised `error_type`."""
        rows: list[_Row] = []
        if path is None:
            for subject in _subjects(subset, SUBJECTS):
                hub = hub_rows(HUB_ID, subject, split or HUB_SPLIT)
                where = f"{HUB_ID} ({subject})"
                rows.extend(_canonical(subject, i, r, where) for i, r in enumerate(hub))
        else:
            for subject, file in _local_files(path, subset):
                raw = read_redux_csv(file)
                rows.extend(_canonical(subject, i, r, str(file)) for i, r in enumerate(raw))
        if self.only_ok:
            rows = [r for r in rows if r.error_type == "ok"]
        if not rows:
            raise ValueError(f"mmlu-redux: no rows were loaded from {path or HUB_ID}")
        return [self._item(rows[i], i) for i in select_indices(len(rows), limit, shuffle_seed)]

    def _item(self, r: _Row, source_index: int) -> TaskItem:
        item_id = f"{r.subject}/{r.row}"
        sh = shuffle_options(
            r.choices, r.answer, seed=self.choice_seed, namespace=self.name, key=item_id,
            shuffle=self.shuffle_choices,
        )  # fmt: skip
        intro = INTRO.replace("{subject}", r.subject.replace("_", " "))
        meta: dict[str, Any] = {
            "id": item_id,
            "subject": r.subject,
            "row": r.row,
            "source_index": source_index,
            "choices": sh.choices,
            "letters": sh.letters,
            "answer_index": sh.answer_index,
            "permutation": sh.permutation,
            "error_type": r.error_type,
        }
        if r.correct_answer is not None:
            meta["annotated_correct_answer"] = r.correct_answer
        if len(set(r.choices)) < len(r.choices):
            # A few rows repeat an option text; if it is the correct one, two letters carry it.
            meta["duplicate_choices"] = True
            right = r.choices[r.answer]
            meta["correct_letters"] = [
                letter for letter, c in zip(sh.letters, sh.choices, strict=True) if c == right
            ]
        return TaskItem(
            messages=user_turn(mc_prompt(intro, r.question, sh.choices, sh.letters)),
            reference=sh.reference,
            meta=meta,
        )

    def check(self, response: str, item: TaskItem) -> Check:
        return check_choice_item(response, item)
