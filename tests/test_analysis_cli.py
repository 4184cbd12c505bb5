"""`qalign eval`, `qalign predict`, `qalign report` end to end on toy sweeps.

An `ancestral` sweep and a `qalign` sweep (two β) run into one database with `qalign run`; a
test-only task (`FirstWordYes` below, passed as `--task tests.test_analysis_cli:FirstWordYes`,
registered nowhere) takes the first word of a toy response as its answer, right when it is "yes".
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

from qalign.analysis import predict as P
from qalign.analysis.data import acceptance_by_step, list_runs, load_samples, load_trajectories
from qalign.cli_analysis import eval_command, predict_command, report_command
from qalign.storage import make_engine, make_sessionmaker
from qalign.storage.models import Answer, Chain, Proposal, Run
from qalign.tasks.base import Check, TaskItem
from tests.sweeps_support import cli, sweep_config, write_config

TASK = "tests.test_analysis_cli:FirstWordYes"
PROMPTS, SAMPLES, CHAINS, STEPS = 6, 8, 2, 8


class FirstWordYes:
    """Test-only task: the answer is the response's first word; right when it is "yes"."""

    name = "first-word-yes"

    def load(self, path, **kwargs):  # not needed: the sweeps use inline prompts
        raise NotImplementedError

    def check(self, response: str, item: TaskItem) -> Check:
        words = response.split()
        answer = words[0] if words else None
        return Check(answer, answer == "yes", details={"words": len(words)})


class ContainsYes:
    """Test-only free-form task (like IFEval): no votable answer; right when "yes" appears."""

    name = "contains-yes"

    def check(self, response: str, item: TaskItem) -> Check:
        return Check(None, "yes" in response.split())


class Broken:
    name = "broken"

    def check(self, response: str, item: TaskItem) -> Check:
        raise RuntimeError("checker bug")


def _run_sweeps(url: str, tmp_path: Path, toy: tuple[str, str]) -> None:
    anc = sweep_config("anc", *toy, prompts=PROMPTS, chains=SAMPLES, method="ancestral")
    del anc["steps"], anc["beta"]
    qa = sweep_config("qa", *toy, prompts=PROMPTS, chains=CHAINS, beta=[0.5, 2.0], steps=STEPS)
    for cfg in (anc, qa):
        out = cli("run", str(write_config(tmp_path, cfg)), "--database", url, "--quiet")
        assert out.returncode == 0, out.stderr


def _invoke(command, *args: str):
    return CliRunner().invoke(command, list(args), catch_exceptions=False)


def _answers(url: str) -> list[tuple]:
    sessions = make_sessionmaker(make_engine(url))
    with sessions() as s:
        rows = s.execute(
            select(
                Answer.proposal_id,
                Answer.task,
                Answer.answer,
                Answer.correct,
                Answer.correct_loose,
                Answer.details,
            ).order_by(Answer.proposal_id)
        ).all()
    return [tuple(r) for r in rows]


def test_eval_predict_report_end_to_end(sqlite_url, tmp_path, toy):
    db = ["--database", sqlite_url]
    _run_sweeps(sqlite_url, tmp_path, toy)
    sessions = make_sessionmaker(make_engine(sqlite_url))

    # Before eval: predict and report say what to do.
    out = CliRunner().invoke(predict_command, ["anc", "--method", "mv", *db])
    assert out.exit_code != 0 and "run `qalign eval anc` first" in out.output
    out = CliRunner().invoke(report_command, ["anc", "-o", str(tmp_path / "r"), *db])
    assert out.exit_code != 0 and "qalign eval" in out.output
    # The toy prompts name no task: eval asks for one; unknown tasks are reported clearly.
    out = CliRunner().invoke(eval_command, ["anc", "--quiet", *db])
    assert out.exit_code != 0 and "--task" in out.output and "Traceback" not in out.output
    out = CliRunner().invoke(eval_command, ["anc", "--task", "no-such-task", "--quiet", *db])
    assert out.exit_code != 0 and "unknown task 'no-such-task'" in out.output
    out = CliRunner().invoke(eval_command, ["anc", "--task", "tests.nope:X", "--quiet", *db])
    assert out.exit_code != 0 and "cannot import" in out.output
    out = CliRunner().invoke(
        eval_command, ["anc", "--task", "tests.test_analysis_cli:Broken", "--quiet", *db]
    )
    assert out.exit_code != 0 and "checker bug" in out.output

    # eval: every proposal checked, identical responses once, twice gives the same rows.
    out = _invoke(eval_command, "anc", "qa", "--task", TASK, "--quiet", *db)
    n_anc, n_qa = PROMPTS * SAMPLES, 2 * PROMPTS * CHAINS * (STEPS + 1)
    assert f"sweep 'anc': checked {n_anc} proposals" in out.output
    assert f"sweep 'qa': checked {n_qa} proposals" in out.output
    first = _answers(sqlite_url)
    out = _invoke(eval_command, "anc", "qa", "--task", TASK, "--quiet", *db)
    assert _answers(sqlite_url) == first and len(first) == n_anc + n_qa
    with sessions() as s:
        texts = {pid: text for pid, text in s.execute(select(Proposal.id, Proposal.text))}
    for pid, task, answer, correct, loose, details in first:
        words = texts[pid].split()
        assert task == "first-word-yes" and answer == (words[0] if words else None)
        assert correct == (answer == "yes") and loose is None
        assert details == {"words": len(words)}
    distinct = int(out.output.split("(")[1].split()[0])
    assert distinct < n_anc  # the toy repeats itself: duplicates were checked once

    # The loaded data agrees with the database.
    runs = list_runs(sessions, [1, 2])
    anc_run, qa_runs = runs[0], runs[1:]
    samples = load_samples(sessions, anc_run.id, texts=True)
    assert sorted(samples) == list(range(PROMPTS))
    assert all(len(v) == SAMPLES for v in samples.values())
    for run in qa_runs:
        chains = load_trajectories(sessions, run.id, texts=True)
        with sessions() as s:
            finals = s.execute(
                select(Chain.prompt_id, Chain.chain_index, Chain.state_text)
                .where(Chain.run_id == run.id)
                .order_by(Chain.prompt_id, Chain.chain_index)
            ).all()
        flat = [c for k in sorted(chains) for c in chains[k]]
        assert [c.states[-1].text for c in flat] == [f.state_text for f in finals]
        assert all(c.length == STEPS + 1 for c in flat)
        sql, walked = acceptance_by_step(sessions, run.id), P.acceptance_by_step(flat)
        assert [(k, n) for k, _, n in sql] == [(k, n) for k, _, n in walked]
        assert [a for _, a, _ in sql] == pytest.approx([a for _, a, _ in walked])

    # predict: every method, checked against the samples where a brute force is easy.
    results = {}
    for method in ("mv", "wmv", "bon", "mbr", "qalign"):
        out = _invoke(predict_command, "anc", "qa", "--method", method, "--json", *db)
        results[method] = json.loads(out.output)
        for curve in results[method]:
            for p in curve["points"]:
                assert 0 <= p["ci_low"] <= p["accuracy"] <= p["ci_high"] <= 1
                assert p["prompts"] == PROMPTS and p["gen_tokens"] > 0
                assert p["server_seconds"] > 0  # every proposal has its latency stored
    for method in ("mv", "wmv", "bon", "mbr"):
        (curve,) = results[method]
        assert curve["run"] == anc_run.name and curve["run_method"] == "ancestral"
        assert [p["budget"] for p in curve["points"]] == [1, 2, 4, 8]
        uses_rm = [p["reward_tokens"] > 0 for p in curve["points"]]
        assert uses_rm == [method in ("wmv", "bon")] * 4  # MV and MBR never call the RM
    right = [s.correct for pool in samples.values() for s in pool]
    for method in ("mv", "wmv", "bon", "mbr"):  # budget 1 = one sample: the share that is right
        assert results[method][0]["points"][0]["accuracy"] == pytest.approx(sum(right) / len(right))
    best = [max(pool, key=lambda s: s.reward).correct for pool in samples.values()]
    assert results["bon"][0]["points"][-1]["accuracy"] == pytest.approx(sum(best) / PROMPTS)
    assert [c["run"] for c in results["qalign"]] == [r.name for r in qa_runs]
    for curve, run in zip(results["qalign"], qa_runs, strict=True):
        assert [p["budget"] for p in curve["points"]] == [1, 2, 4, 8, 16, 18]
        chains = load_trajectories(sessions, run.id)
        first_samples = [chains[k][0].states[0].correct for k in sorted(chains)]
        assert curve["points"][0]["accuracy"] == pytest.approx(sum(first_samples) / PROMPTS)
        full = [P.mv_correct([st for c in chains[k] for st in c.states]) for k in sorted(chains)]
        assert curve["points"][-1]["accuracy"] == pytest.approx(sum(full) / PROMPTS)

    # Text output, budgets, burn-in and FLOPs.
    out = _invoke(
        predict_command, "qa", "--method", "qalign", "--budgets", "2,4,64", "--burn-in", "2",
        "--thin", "2", "--generator-params", "1e9", "--reward-params", "2e9", *db,
    )  # fmt: skip
    assert "burn-in 2, thin 2" in out.output and "FLOPs/prompt" in out.output
    for run in qa_runs:
        assert run.label in out.output
    assert "budget(s) 64; skipped" in out.output
    out = CliRunner().invoke(predict_command, ["anc", "--method", "qalign", *db])
    assert out.exit_code != 0 and "needs QAlign/QUEST runs" in out.output

    # report: Markdown with tables per task and method, and the PNGs it references.
    report_dir = tmp_path / "report"
    out = _invoke(
        report_command, "anc", "qa", "-o", str(report_dir), "--generator-params", "1e9",
        "--reward-params", "1e9", "--bootstrap", "200", *db,
    )  # fmt: skip
    assert "wrote" in out.output
    md = (report_dir / "report.md").read_text()
    pngs = [
        "compare-first-word-yes.png",
        "error_vs_compute-first-word-yes.png",
        "error_vs_seconds-first-word-yes.png",
        "accuracy_vs_beta-first-word-yes.png",
        "acceptance.png",
        "rewards.png",
    ]
    for name in pngs:
        data = (report_dir / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000, name
        assert f"]({name})" in md, name
    assert "## Task: first-word-yes" in md
    for heading in ("MV", "WMV", "BoN", "QAlign"):
        assert f"### {heading}: accuracy by budget" in md
    assert "FLOPs per prompt by budget" in md
    assert "QAlign: generator + reward server seconds per prompt by budget" in md
    assert "Not shown (no latency stored)" not in md
    for run in runs:
        assert md.count(f"| {run.label} |") >= 2, run.label  # run summary + tables
    summary = json.loads((report_dir / "report.json").read_text())
    assert {c["method"] for c in summary["curves"]} == {"mv", "wmv", "bon", "qalign"}
    assert sorted(summary["images"]) == sorted(pngs)

    # Rows from before the latency columns (NULL): those runs lose the seconds axis only.
    with sessions.begin() as s:
        s.execute(
            update(Proposal).where(Proposal.run_id == anc_run.id).values(generator_seconds=None)
        )
    _invoke(report_command, "anc", "qa", "-o", str(tmp_path / "old"), "--bootstrap", "50", *db)
    md = (tmp_path / "old" / "report.md").read_text()
    assert f"Not shown (no latency stored): {anc_run.label}." in md
    assert "### MV: accuracy by budget" in md and "MV: generator + reward server" not in md
    with sessions.begin() as s:
        s.execute(update(Proposal).values(reward_seconds=None))
    _invoke(report_command, "anc", "qa", "-o", str(tmp_path / "none"), "--bootstrap", "50", *db)
    md = (tmp_path / "none" / "report.md").read_text()
    assert "error_vs_seconds" not in md and "server seconds" not in md
    assert not list((tmp_path / "none").glob("error_vs_seconds-*"))
    out = _invoke(predict_command, "qa", "--method", "qalign", "--json", *db)
    assert all(p["server_seconds"] is None for c in json.loads(out.output) for p in c["points"])

    # A free-form task: nothing to vote on, so the report chooses MBR (and BoN, QAlign by MBR).
    _invoke(eval_command, "anc", "qa", "--task", "tests.test_analysis_cli:ContainsYes", *db)
    out = _invoke(predict_command, "anc", "--method", "mv", *db)
    assert "use --method mbr" in out.output
    _invoke(report_command, "anc", "qa", "-o", str(tmp_path / "free"), "--bootstrap", "50", *db)
    md = (tmp_path / "free" / "report.md").read_text()
    assert "## Task: contains-yes" in md and "### MV:" not in md
    for heading in ("MBR (ROUGE-1)", "BoN", "QAlign (MBR)"):
        assert f"### {heading}: accuracy by budget" in md
    assert "(error_vs_compute-contains-yes.png)" in md


def test_eval_and_predict_on_postgresql(pg_url, tmp_path, toy):
    db = ["--database", pg_url]
    anc = sweep_config("anc-pg", *toy, prompts=3, chains=4, method="ancestral")
    del anc["steps"], anc["beta"]
    qa = sweep_config("qa-pg", *toy, prompts=3, chains=2, beta=1.0, steps=4)
    for cfg in (anc, qa):
        out = cli("run", str(write_config(tmp_path, cfg)), "--database", pg_url, "--quiet")
        assert out.returncode == 0, out.stderr
    _invoke(eval_command, "anc-pg", "qa-pg", "--task", TASK, "--quiet", *db)
    first = _answers(pg_url)
    _invoke(eval_command, "qa-pg", "anc-pg", "--task", TASK, "--quiet", "--workers", "2", *db)
    assert _answers(pg_url) == first and len(first) == 3 * 4 + 3 * 2 * 5
    by_method = defaultdict(list)
    for method in ("mv", "bon", "qalign"):
        out = _invoke(predict_command, "anc-pg", "qa-pg", "--method", method, "--json", *db)
        by_method[method] = json.loads(out.output)
    assert [p["budget"] for p in by_method["qalign"][0]["points"]] == [1, 2, 4, 8, 10]
    assert all(not math.isnan(p["accuracy"]) for c in by_method["mv"] for p in c["points"])
    out = _invoke(report_command, "anc-pg", "qa-pg", "-o", str(tmp_path / "rep"), *db)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "(error_vs_compute-first-word-yes.png)" in md and "(acceptance.png)" in md
    assert "accuracy_vs_beta" not in md  # one β only
    sessions = make_sessionmaker(make_engine(pg_url))
    with sessions() as s:
        assert s.execute(select(Run.name).order_by(Run.id)).scalars().first() is not None


def test_every_command_has_help_with_an_example():
    for command in (eval_command, predict_command, report_command):
        out = CliRunner().invoke(command, ["--help"])
        assert out.exit_code == 0 and "Example:" in out.output, command.name


def test_resolve_task_hook_accepts_objects_classes_and_registered_names():
    from qalign.analysis.evaluate import TaskNotFoundError, resolve_task

    assert resolve_task(TASK).name == "first-word-yes"
    assert resolve_task("tests.test_analysis_cli:FirstWordYes").check("yes no", None).correct
    with pytest.raises(TaskNotFoundError, match="has no"):
        resolve_task("tests.test_analysis_cli:Missing")
    with pytest.raises(TaskNotFoundError, match="is not a task"):
        resolve_task("tests.test_analysis_cli:PROMPTS")
    assert resolve_task("gsm8k").name == "gsm8k"


def test_eval_predict_report_on_a_power_sweep(sqlite_url, tmp_path, toy):
    """Power chains store no rewards: eval checks them, reward-free predictions work, and the
    ones that need rewards say so instead of failing."""
    db = ["--database", sqlite_url]
    cfg = sweep_config("pw", *toy, prompts=3, chains=2, steps=4, method="power", alpha=2.0)
    del cfg["reward"], cfg["beta"]
    out = cli("run", str(write_config(tmp_path, cfg)), "--database", sqlite_url, "--quiet")
    assert out.returncode == 0, out.stderr
    out = _invoke(eval_command, "pw", "--task", TASK, "--quiet", *db)
    assert "sweep 'pw': checked 30 proposals" in out.output
    # Power chains have their own vote (`--method power`, see tests/test_compare.py); every
    # other prediction method names the runs it needs rather than failing on NULL rewards.
    for method, needs in (("mv", "ancestral"), ("bon", "ancestral"), ("qalign", "qalign")):
        out = CliRunner().invoke(predict_command, ["pw", "--method", method, *db])
        assert out.exit_code != 0 and f"`method: {needs}`" in out.output, out.output
        assert "Traceback" not in out.output
    out = _invoke(predict_command, "pw", "--method", "power", "--json", *db)
    assert {c["run_method"] for c in json.loads(out.output)} == {"power"}
    out = CliRunner().invoke(report_command, ["pw", "-o", str(tmp_path / "r"), *db])
    assert out.exit_code == 0, out.output
    md = (tmp_path / "r" / "report.md").read_text()
    assert "### Power: accuracy by budget" in md and "(acceptance.png)" in md
