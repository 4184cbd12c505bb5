"""Task loaders: the real evaluation files under ../shared/data, the paper's templates, seeded
selection and option shuffling, the hub code path (with `datasets.load_dataset` faked), the custom
task's formats, and clear errors."""

from __future__ import annotations

import ast
import json
import math
import random
import sys
import types
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from qalign.tasks import TASKS, Check, TaskItem, get_task
from qalign.tasks.mmlu import SUBJECTS, MMLUReduxTask, normalise_error_type, read_redux_csv

DATA = Path(__file__).parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"the evaluation data folder {DATA} is missing (see its README)"
)

COUNTS = [
    ("gsm8k", "gsm8k", 1319),
    ("gsm8k-socratic", "gsm8k", 1319),
    ("math500", "math500", 500),
    ("truthfulqa-mc1", "truthfulqa", 817),
    ("ifeval", "ifeval", 541),
    ("mmlu-redux", "mmlu_redux", 5330),
]

MC_CLOSING = (
    "\nProvide your reasoning about the answer and finish your answer with the letter "
    "corresponding to the correct option (e.g., A, B, C, or D).\n\n"
)


def user_text(item: TaskItem) -> str:
    assert [m["role"] for m in item.messages] == ["user"]
    return item.messages[0]["content"]


@pytest.fixture(scope="module")
def tqa() -> list[TaskItem]:
    return get_task("truthfulqa-mc1").load(str(DATA / "truthfulqa"))


@pytest.fixture(scope="module")
def mmlu_all() -> list[TaskItem]:
    return get_task("mmlu-redux", only_ok=False).load(str(DATA / "mmlu_redux"))


# --- registry ------------------------------------------------------------------------------


def test_registry_names() -> None:
    assert TASKS == (
        "gsm8k", "gsm8k-socratic", "gsm-symbolic-p1", "gsm-symbolic-p2", "math500",
        "mmlu-redux", "truthfulqa-mc1", "ifeval", "custom",
    )  # fmt: skip
    for name in TASKS:
        task = get_task(name)
        assert task.name == name
        assert get_task(name) is not task  # a fresh task each time


def test_unknown_task_and_bad_options() -> None:
    with pytest.raises(ValueError, match=r"unknown task 'gsm9k'; known: gsm8k, gsm8k-socratic"):
        get_task("gsm9k")
    with pytest.raises(ValueError, match="bad options"):
        get_task("gsm8k", only_ok=False)
    with pytest.raises(ValueError, match="no \\{prompt\\} placeholder"):
        get_task("custom", template="Answer this.")


# --- counts, references, templates on the real files ----------------------------------------


@needs_data
@pytest.mark.parametrize(("name", "folder", "count"), COUNTS)
def test_counts_and_json_meta(name: str, folder: str, count: int) -> None:
    items = get_task(name).load(str(DATA / folder))
    assert len(items) == count
    assert [it.meta["source_index"] for it in items] == list(range(count))
    json.dumps([it.meta for it in items])  # storable as-is


@needs_data
def test_mmlu_counts(mmlu_all: list[TaskItem]) -> None:
    files = sorted(p.stem.removeprefix("mmlu_") for p in (DATA / "mmlu_redux").glob("mmlu_*.csv"))
    assert files == sorted(SUBJECTS) and len(SUBJECTS) == 57
    assert len(mmlu_all) == 5700
    assert Counter(it.meta["subject"] for it in mmlu_all) == dict.fromkeys(SUBJECTS, 100)
    types_ = Counter(it.meta["error_type"] for it in mmlu_all)
    assert types_["ok"] == 5330
    assert set(types_) == {
        "ok", "wrong_groundtruth", "bad_question_clarity", "bad_options_clarity",
        "no_correct_answer", "multiple_correct_answers", "expert",
    }  # fmt: skip
    ok = get_task("mmlu-redux").load(str(DATA / "mmlu_redux"))
    assert [it.meta["id"] for it in ok] == [
        it.meta["id"] for it in mmlu_all if it.meta["error_type"] == "ok"
    ]


@needs_data
def test_gsm8k_references_and_template() -> None:
    raw = [json.loads(line) for line in (DATA / "gsm8k" / "test.jsonl").open()]
    for name in ("gsm8k", "gsm8k-socratic"):
        items = get_task(name).load(str(DATA / "gsm8k"))
        assert items[0].reference == "18"
        assert user_text(items[0]) == (
            "Solve the following grade school math problem step-by-step: " + raw[0]["question"]
        )
        assert all(it.reference is not None and it.reference.lstrip("-").isdigit() for it in items)
    # "#### 2,125" and the like lose their thousands commas
    with_comma = [i for i, r in enumerate(raw) if "," in r["answer"].rsplit("####", 1)[1]]
    assert with_comma
    items = get_task("gsm8k").load(str(DATA / "gsm8k" / "test.jsonl"))
    for i in with_comma:
        assert items[i].reference == raw[i]["answer"].rsplit("####", 1)[1].strip().replace(",", "")
    # the socratic file is picked from the folder: its rows differ from main only in solutions
    soc = get_task("gsm8k-socratic").load(str(DATA / "gsm8k"))
    assert [it.reference for it in soc] == [it.reference for it in items]


@needs_data
def test_math500_reference_and_template() -> None:
    items = get_task("math500").load(str(DATA / "math500"))
    first = items[0]
    assert first.reference == r"\left( 3, \frac{\pi}{2} \right)"
    assert first.meta["unique_id"] == "test/precalculus/807.json"
    assert first.meta["level"] == 2
    text = user_text(first)
    assert text.startswith(
        "Solve the following math problem step-by-step: Convert the point $(0,3)$"
    )
    assert text.endswith("\n\nPresent the answer in LaTex format: \\boxed{Your answer}")


@needs_data
def test_truthfulqa_reference_points_at_first_mc1_target(tqa: list[TaskItem]) -> None:
    raw = json.loads((DATA / "truthfulqa" / "mc_task_v0.json").read_text())
    assert raw[0]["question"].startswith("What is the smallest country in the world")
    for item, row in zip(tqa, raw, strict=True):
        targets = row["mc1_targets"]
        first = next(iter(targets))
        assert targets[first] == 1
        letters, choices = item.meta["letters"], item.meta["choices"]
        assert item.reference is not None
        assert choices[letters.index(item.reference)] == first
        assert sorted(choices) == sorted(targets)
        assert [choices[k] for k in range(len(choices))] == [
            list(targets)[j] for j in item.meta["permutation"]
        ]
        text = user_text(item)
        assert text.startswith(
            "Choose the correct answer to the following multiple-choice question.\n\n"
            f"Question: {row['question']}\n\n"
        )
        options = "".join(f"{x}). {c}\n" for x, c in zip(letters, choices, strict=True))
        assert text.endswith(options + MC_CLOSING)


@needs_data
def test_truthfulqa_correct_position_roughly_uniform(tqa: list[TaskItem]) -> None:
    observed = Counter(it.meta["answer_index"] for it in tqa)
    sizes = [len(it.meta["choices"]) for it in tqa]
    assert observed[0] < 0.5 * len(tqa)  # unshuffled, it would be 100 %
    for pos in range(4):  # every item has at least 2 options; most have 4 or more
        expected = sum(1 / n for n in sizes if n > pos)
        var = sum((1 / n) * (1 - 1 / n) for n in sizes if n > pos)
        assert abs(observed[pos] - expected) < 4 * math.sqrt(var), (pos, observed, expected)
    unshuffled = get_task("truthfulqa-mc1", shuffle_choices=False).load(str(DATA / "truthfulqa"))
    assert {it.reference for it in unshuffled} == {"A"}


@needs_data
def test_mmlu_letters_point_at_the_answer(mmlu_all: list[TaskItem]) -> None:
    by_id = {it.meta["id"]: it for it in mmlu_all}
    for subject in SUBJECTS:
        rows = read_redux_csv(DATA / "mmlu_redux" / f"mmlu_{subject}.csv")
        assert len(rows) == 100
        for r, row in enumerate(rows):
            item = by_id[f"{subject}/{r}"]
            choices = ast.literal_eval(row["choices"])
            letters = item.meta["letters"]
            assert letters == ["A", "B", "C", "D"]
            assert item.reference is not None
            assert (
                item.meta["choices"][letters.index(item.reference)] == choices[int(row["answer"])]
            )
            assert sorted(item.meta["choices"]) == sorted(choices)
    # a known item (a semicolon-delimited file): anatomy row 0's answer is "Narcolepsy"
    anatomy0 = by_id["anatomy/0"]
    assert anatomy0.meta["choices"][anatomy0.meta["answer_index"]] == "Narcolepsy"
    text = user_text(anatomy0)
    assert text.startswith(
        "Choose the correct answer to the following multiple-choice question about anatomy.\n\n"
        "Question: Which of the following is a disorder characterized by uncontrollable "
        "episodes of falling asleep during the day?\n\nA). "
    )
    assert text.endswith(MC_CLOSING)
    assert "about high school us history." in user_text(by_id["high_school_us_history/0"])
    # correct positions are spread over A-D
    positions = Counter(it.reference for it in mmlu_all)
    assert all(1200 < positions[x] < 1650 for x in "ABCD"), positions


@needs_data
def test_mmlu_file_quirks() -> None:
    folder = DATA / "mmlu_redux"
    # the one Mac-Roman byte (0xD5) is read as a right single quote
    rows = read_redux_csv(folder / "mmlu_moral_scenarios.csv")
    assert any("my sister’s head" in r["question"] for r in rows)
    assert not any("\ufffd" in v for r in rows for v in r.values() if v)
    # semicolon files and files with other column orders read by name
    for subject in ("anatomy", "prehistory", "moral_disputes", "machine_learning", "econometrics"):
        rows = read_redux_csv(folder / f"mmlu_{subject}.csv")
        assert len(rows) == 100
        assert all(isinstance(ast.literal_eval(r["choices"]), list) for r in rows)
        assert all(r["answer"].strip().isdigit() for r in rows)
    assert normalise_error_type("OK ") == "ok"
    assert normalise_error_type("Wrong Groundtruth") == "wrong_groundtruth"
    assert normalise_error_type("bad question clarity") == "bad_question_clarity"


@needs_data
def test_mmlu_subset() -> None:
    task = get_task("mmlu-redux", only_ok=False)
    one = task.load(str(DATA / "mmlu_redux"), subset="virology")
    assert len(one) == 100 and {it.meta["subject"] for it in one} == {"virology"}
    two = MMLUReduxTask(only_ok=False).load(
        str(DATA / "mmlu_redux"), subset=["virology", "anatomy"]
    )
    assert [it.meta["subject"] for it in two] == ["anatomy"] * 100 + ["virology"] * 100
    assert [
        it.meta["id"] for it in task.load(str(DATA / "mmlu_redux"), subset="anatomy,virology")
    ] == [it.meta["id"] for it in two]
    # a single subject file
    file = task.load(str(DATA / "mmlu_redux" / "mmlu_anatomy.csv"))
    assert [it.messages for it in file] == [it.messages for it in two[:100]]
    ok = get_task("mmlu-redux").load(str(DATA / "mmlu_redux"), subset="anatomy")
    assert 0 < len(ok) < 100
    with pytest.raises(ValueError, match=r"unknown subject\(s\) 'astrology'"):
        task.load(str(DATA / "mmlu_redux"), subset="astrology")


@needs_data
def test_ifeval_records() -> None:
    items = get_task("ifeval").load(str(DATA / "ifeval"))
    first, last = items[0], items[-1]
    assert first.reference is None
    assert first.meta["key"] == 1000 and last.meta["key"] == 3757
    assert first.meta["instruction_id_list"] == [
        "punctuation:no_comma",
        "detectable_format:number_highlighted_sections",
        "length_constraints:number_words",
    ]
    assert first.meta["kwargs"] == [
        {},
        {"num_highlights": 3},
        {"relation": "at least", "num_words": 300},
    ]
    assert user_text(first) == first.meta["prompt"]
    assert sum(len(it.meta["instruction_id_list"]) for it in items) == 834
    assert all(len(it.meta["kwargs"]) == len(it.meta["instruction_id_list"]) for it in items)


# --- determinism: selection and shuffling -----------------------------------------------------


@needs_data
@pytest.mark.parametrize(("name", "folder", "count"), COUNTS)
def test_limit_and_shuffle_seed(name: str, folder: str, count: int) -> None:
    task, path = get_task(name), str(DATA / folder)
    full = task.load(path)
    assert task.load(path) == full  # deterministic
    head = task.load(path, limit=7)
    assert head == full[:7]
    assert task.load(path, limit=0) == []
    assert len(task.load(path, limit=count + 10)) == count
    shuffled = task.load(path, shuffle_seed=3, limit=25)
    order = list(range(count))
    random.Random(3).shuffle(order)
    assert [it.meta["source_index"] for it in shuffled] == order[:25]
    # the same items as in the full load: option order and references do not depend on limit
    # or on the selection
    assert shuffled == [full[i] for i in order[:25]]
    assert task.load(path, shuffle_seed=3, limit=10) == shuffled[:10]
    other = task.load(path, shuffle_seed=4, limit=25)
    assert [it.meta["source_index"] for it in other] != order[:25]
    with pytest.raises(ValueError, match="limit"):
        task.load(path, limit=-1)


@needs_data
def test_choice_shuffle_is_per_item_and_seeded(tqa: list[TaskItem]) -> None:
    path = str(DATA / "truthfulqa")
    again = get_task("truthfulqa-mc1", choice_seed=0).load(path)
    assert [it.meta["permutation"] for it in again] == [it.meta["permutation"] for it in tqa]
    reseeded = get_task("truthfulqa-mc1", choice_seed=1).load(path)
    differ = sum(
        a.meta["permutation"] != b.meta["permutation"] for a, b in zip(tqa, reseeded, strict=True)
    )
    assert differ > len(tqa) // 2
    # MMLU: an item's options are the same whatever subset, only_ok or limit selected it
    full = {
        it.meta["id"]: it
        for it in get_task("mmlu-redux", only_ok=False).load(str(DATA / "mmlu_redux"))
    }
    some = get_task("mmlu-redux").load(
        str(DATA / "mmlu_redux"), subset="virology", shuffle_seed=9, limit=5
    )
    for it in some:
        ref = full[it.meta["id"]]
        assert (it.messages, it.reference, it.meta["choices"]) == (
            ref.messages,
            ref.reference,
            ref.meta["choices"],
        )


# --- GSM-Symbolic (a small local file in the hub's shape) -------------------------------------

SYMBOLIC_ROWS = [
    {
        "id": 0,
        "instance": k,
        "question": f"Ava has {k + 2} apples and buys {1000 * (k + 1)} more. How many now?",
        "answer": f"She has <<{k + 2}+{1000 * (k + 1)}>> apples.\n#### {1000 * (k + 1) + k + 2:,}",
        "original_id": 12,
        "original_question": "...",
        "original_answer": "...",
        "canary": "canary GUID",
    }
    for k in range(5)
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.mark.parametrize("variant", ["gsm-symbolic-p1", "gsm-symbolic-p2"])
def test_gsm_symbolic_local(tmp_path: Path, variant: str) -> None:
    config = variant.rsplit("-", 1)[1]
    write_jsonl(tmp_path / config / "test.jsonl", SYMBOLIC_ROWS)
    task = get_task(variant)
    from_root = task.load(str(tmp_path))  # the hub repository's layout: <config>/test.jsonl
    from_folder = task.load(str(tmp_path / config))
    from_file = task.load(str(tmp_path / config / "test.jsonl"))
    assert from_root == from_folder == from_file
    assert [it.reference for it in from_root] == ["1002", "2003", "3004", "4005", "5006"]
    assert from_root[1].meta == {"source_index": 1, "id": 0, "instance": 1, "original_id": 12}
    assert user_text(from_root[0]) == (
        "Solve the following grade school math problem step-by-step: "
        + str(SYMBOLIC_ROWS[0]["question"])
    )
    order = list(range(5))
    random.Random(0).shuffle(order)
    assert task.load(str(tmp_path), shuffle_seed=0, limit=2) == [from_root[i] for i in order[:2]]


def test_gsm_bad_rows(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "no final answer"}])
    with pytest.raises(ValueError, match=r"row 0: no '####' final answer"):
        get_task("gsm8k").load(str(tmp_path / "a.jsonl"))
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "answer": "#### 1"}])
    with pytest.raises(ValueError, match="row 0"):
        get_task("gsm-symbolic-p1").load(str(tmp_path / "b.jsonl"))


# --- errors -----------------------------------------------------------------------------------


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_task("gsm8k").load(str(tmp_path / "nowhere.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"no test_socratic\.jsonl in the folder"):
        get_task("gsm8k-socratic").load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"mc_task_v0\.json"):
        get_task("truthfulqa-mc1").load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"input_data\.jsonl"):
        get_task("ifeval").load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no mmlu_<subject>\.csv files"):
        get_task("mmlu-redux").load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is not a file"):
        get_task("custom").load(str(tmp_path / "x.jsonl"))
    with pytest.raises(ValueError, match="needs `path`"):
        get_task("custom").load(None)
    with pytest.raises(ValueError, match="has no subsets"):
        get_task("gsm8k").load(str(tmp_path), subset="main")


# --- custom -----------------------------------------------------------------------------------


def test_custom_formats(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"q": "What is 2+2?", "a": 4, "extra": "x"},
        {"q": "What is 3+3?", "a": 6, "extra": "y"},
    ]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text(
        "\ufeffq,a,extra\nWhat is 2+2?,4,x\nWhat is 3+3?,6,y\n", encoding="utf-8"
    )
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    task = get_task(
        "custom", prompt_field="q", answer_field="a", system_prompt="Be brief.",
        template="Solve: {prompt} Put the answer in \\boxed{}.",
    )  # fmt: skip
    for ext in ("jsonl", "json", "csv", "parquet"):
        items = task.load(str(tmp_path / f"d.{ext}"))
        assert [it.reference for it in items] == ["4", "6"], ext
        assert items[0].messages == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Solve: What is 2+2? Put the answer in \\boxed{}."},
        ]
        assert items[1].meta["source_index"] == 1
        assert items[1].meta["row"]["extra"] == "y"
    plain = get_task("custom", prompt_field="q", answer_field=None).load(
        str(tmp_path / "d.jsonl"), limit=1
    )
    assert plain == [
        TaskItem(
            messages=[{"role": "user", "content": "What is 2+2?"}],
            reference=None,
            meta={"source_index": 0, "checker": "math", "row": rows[0]},
        )
    ]


def test_custom_missing_columns(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", [{"question": "q1", "answer": "1"}, {"question": "q2"}])
    with pytest.raises(
        ValueError, match=r"row 1 has no column\(s\) 'answer'; its columns are 'question'"
    ):
        get_task("custom").load(str(tmp_path / "d.jsonl"))
    with pytest.raises(ValueError, match=r"no column\(s\) 'prompt'"):
        get_task("custom", prompt_field="prompt").load(str(tmp_path / "d.jsonl"))
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(ValueError, match="cannot tell the format"):
        get_task("custom").load(str(tmp_path / "d.txt"))


# --- the hub code path, with datasets.load_dataset faked ---------------------------------------


def fake_hub(
    monkeypatch: pytest.MonkeyPatch, tables: dict[tuple[str, str | None, str], list[dict[str, Any]]]
) -> list[tuple[Any, ...]]:
    import datasets

    calls: list[tuple[Any, ...]] = []

    def load_dataset(path: str, name: str | None = None, *, split: str) -> list[dict[str, Any]]:
        calls.append((path, name, split))
        return tables[(path, name, split)]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    gsm = [{"question": "Q?", "answer": "work\n#### 1,000"}]
    tqa = [
        {
            "question": "Is it?",
            "mc1_targets": {"choices": ["Yes.", "No.", "Maybe."], "labels": [1, 0, 0]},
            "mc2_targets": {"choices": ["Yes."], "labels": [1]},
        }
    ]
    ife = [
        {
            "key": 1000,
            "prompt": "Write.",
            "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
            "kwargs": [
                {"num_words": None, "relation": None},
                {"num_words": 300, "relation": "at least"},
            ],
        }
    ]
    mmlu_row = {
        "question": "Q?", "choices": ["a", "b", "c", "d"], "answer": 2, "error_type": "ok",
        "source": "s", "correct_answer": None, "potential_reason": None,
    }  # fmt: skip
    math_rows = [
        {
            "problem": "1+1?",
            "solution": "\\boxed{2}",
            "answer": "2",
            "subject": "Algebra",
            "level": 1,
            "unique_id": "test/algebra/1.json",
        }
    ]
    tables: dict[tuple[str, str | None, str], list[dict[str, Any]]] = {
        ("openai/gsm8k", "main", "test"): gsm,
        ("openai/gsm8k", "socratic", "test"): gsm,
        ("apple/GSM-Symbolic", "p1", "test"): gsm,
        ("apple/GSM-Symbolic", "p2", "test"): gsm,
        ("HuggingFaceH4/MATH-500", None, "test"): math_rows,
        ("truthfulqa/truthful_qa", "multiple_choice", "validation"): tqa,
        ("google/IFEval", None, "train"): ife,
    }
    for s in SUBJECTS:
        tables[("edinburgh-dawg/mmlu-redux-2.0", s, "test")] = [
            mmlu_row,
            mmlu_row | {"error_type": "Wrong Groundtruth"},
        ]
    calls = fake_hub(monkeypatch, tables)

    for name in ("gsm8k", "gsm8k-socratic", "gsm-symbolic-p1", "gsm-symbolic-p2"):
        assert [it.reference for it in get_task(name).load(None)] == ["1000"]
    assert get_task("math500").load(None)[0].meta["unique_id"] == "test/algebra/1.json"
    [item] = get_task("truthfulqa-mc1").load(None)
    assert item.meta["choices"][item.meta["letters"].index(item.reference)] == "Yes."
    [item] = get_task("ifeval").load(None)
    assert item.meta["kwargs"] == [{}, {"num_words": 300, "relation": "at least"}]
    items = get_task("mmlu-redux").load(None)
    assert len(items) == 57 and all(
        it.meta["choices"][it.meta["answer_index"]] == "c" for it in items
    )
    assert len(get_task("mmlu-redux", only_ok=False).load(None, subset="anatomy")) == 2
    assert calls[:7] == [
        ("openai/gsm8k", "main", "test"),
        ("openai/gsm8k", "socratic", "test"),
        ("apple/GSM-Symbolic", "p1", "test"),
        ("apple/GSM-Symbolic", "p2", "test"),
        ("HuggingFaceH4/MATH-500", None, "test"),
        ("truthfulqa/truthful_qa", "multiple_choice", "validation"),
        ("google/IFEval", None, "train"),
    ]
    assert [c[1] for c in calls[7:64]] == list(SUBJECTS)
    assert calls[-1] == ("edinburgh-dawg/mmlu-redux-2.0", "anatomy", "test")


# --- check() delegates to qalign.tasks.checkers ------------------------------------------------


def test_check_delegates(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[Any, ...]] = []
    fake = types.ModuleType("qalign.tasks.checkers")

    def record(kind: str) -> Any:
        def check(*args: Any) -> Check:
            seen.append((kind, *args))
            return Check(answer=None, correct=False)

        return check

    for kind in ("check_gsm8k", "check_math", "check_choice", "check_ifeval"):
        setattr(fake, kind, record(kind))
    monkeypatch.setitem(sys.modules, "qalign.tasks.checkers", fake)

    mc = TaskItem([], "B", {"letters": ["A", "B", "C"], "choices": ["x", "y", "z"]})
    get_task("gsm8k").check("r", TaskItem([], "18"))
    get_task("math500").check("r", TaskItem([], "\\frac12"))
    get_task("mmlu-redux").check("r", mc)
    get_task("truthfulqa-mc1").check("r", mc)
    get_task("ifeval").check("r", TaskItem([], None, {"key": 1}))
    get_task("custom").check("r", TaskItem([], "7"))
    get_task("custom", checker="gsm8k").check("r", TaskItem([], "7"))
    get_task("custom").check("r", TaskItem([], "8", {"checker": "gsm8k"}))  # the item's choice
    assert seen == [
        ("check_gsm8k", "r", "18"),
        ("check_math", "r", "\\frac12"),
        ("check_choice", "r", ["A", "B", "C"], "B"),
        ("check_choice", "r", ["A", "B", "C"], "B"),
        ("check_ifeval", "r", {"key": 1}),
        ("check_math", "r", "7"),
        ("check_gsm8k", "r", "7"),
        ("check_gsm8k", "r", "8"),
    ]
