"""Each page's data as one JSON document that `static/dashboard.js` renders: `stats` (labelled
figures), `tables` (columns with a display format, rows of cells) and `charts` (line series).

Cells are plain values, or `{"text", "href"}` for links, or `{"before", "after"}` for a response
whose cut point is marked. Formats: `int`, `f3` (3 decimals), `f2`, `f1`, `pct`, `dur` (seconds
as h:mm:ss), `rhat` (3 decimals, or an exponent from 1e4), `text`, `time` (ISO timestamp).
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from qalign.dashboard import queries as q
from qalign.dashboard.analysis import AnalysisCache
from qalign.storage.repo import Sessions

# The two rewards are never just "mean reward": a state's and a proposal's differ.
STATE_REWARD = "mean reward of current states"
PROPOSAL_REWARD = "mean reward of proposals"


def _col(key: str, label: str, fmt: str = "text") -> dict[str, str]:
    return {"key": key, "label": label, "fmt": fmt}


def _stat(key: str, label: str, value: Any, fmt: str = "text") -> dict[str, Any]:
    return {"key": key, "label": label, "value": value, "fmt": fmt}


def _link(text: Any, href: str) -> dict[str, Any]:
    return {"text": str(text), "href": href}


def _fraction(done: int, total: int) -> str:
    return f"{done}/{total}"


def _share(done: int, total: int) -> float | None:
    return done / total if total else None


def _chart(
    key: str, title: str, x: str, y: str, series: list[dict[str, Any]], note: str | None = None
) -> dict[str, Any]:
    return {"key": key, "title": title, "x": x, "y": y, "series": series, "note": note}


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _rhat(x: Any) -> Any:
    return "inf" if isinstance(x, float) and math.isinf(x) else x


def sweeps_page(sessions: Sessions) -> dict[str, Any]:
    rows = q.sweeps_overview(sessions)
    table_rows = []
    for r in rows:
        failures = r["chains_failed"]
        table_rows.append(
            {
                "key": str(r["id"]),
                "cells": {
                    "name": _link(r["name"], f"/sweep/{r['id']}"),
                    "status": r["status"],
                    "runs": r["runs"],
                    "chains": _fraction(r["chains_done"], r["chains"]),
                    "running": r["chains_running"],
                    "steps": _fraction(r["steps_done"], r["steps_total"]),
                    "progress": _share(r["steps_done"], r["steps_total"]),
                    "steps_per_s": r["steps_per_s"],
                    "eta": r["eta_s"],
                    "failed": failures,
                    "step_errors": r["step_errors"],
                    "last_step_at": r["last_step_at"] and r["last_step_at"].isoformat(),
                },
                "cls": "bad" if failures else None,
            }
        )
    return {
        "title": "Sweeps",
        "crumbs": [],
        "as_of": _now(),
        "stats": [
            _stat("sweeps", "sweeps", len(rows), "int"),
            _stat("steps", "steps committed", sum(r["steps_done"] for r in rows), "int"),
        ],
        "tables": [
            {
                "key": "sweeps",
                "title": "Sweeps",
                "columns": [
                    _col("name", "sweep"),
                    _col("status", "status"),
                    _col("runs", "runs", "int"),
                    _col("chains", "chains done"),
                    _col("running", "chains running", "int"),
                    _col("steps", "steps done"),
                    _col("progress", "progress", "pct"),
                    _col("steps_per_s", "steps/s", "f1"),
                    _col("eta", "ETA", "dur"),
                    _col("failed", "failed chains", "int"),
                    _col("step_errors", "failed step attempts", "int"),
                    _col("last_step_at", "last step", "time"),
                ],
                "rows": table_rows,
            }
        ],
        "charts": [],
    }


def _grid_label(run: dict[str, Any], varying: list[str]) -> str:
    names = {"model": "model", "beta": "beta", "temperature": "T", "steps": "steps"}
    parts = [f"{names[k]}={run[k]:g}" if isinstance(run[k], float) else f"{names[k]}={run[k]}"
             for k in varying]  # fmt: skip
    return ", ".join(parts) or f"run {run['grid_index']}"


def _varying(runs: list[dict[str, Any]]) -> list[str]:
    return [k for k in ("model", "beta", "temperature", "steps") if len({r[k] for r in runs}) > 1]


def sweep_page(sessions: Sessions, cache: AnalysisCache, sweep_id: int) -> dict[str, Any]:
    sweep = q.sweep_row(sessions, sweep_id)
    runs = q.sweep_runs(sessions, sweep_id)
    varying = _varying(runs)
    rows: list[dict[str, Any]] = []
    series: dict[str, list[dict[str, Any]]] = {k: [] for k in CHART_KEYS}
    pending = 0
    for r in runs:
        fp = q.run_fingerprint(sessions, r["run_id"])
        got = cache.get("run", r["run_id"], r["method"], fp)
        a = got["result"] or {}
        pending += not got["current"]
        label = _grid_label(r, varying)
        failed = "; ".join(f"{n}: {why}" for why, n in r["failed_by_reason"].items())
        attempts = "; ".join(f"{kind}: {n}" for kind, n in r["step_errors"].items())
        rows.append(
            {
                "key": str(r["run_id"]),
                "cells": {
                    "run": _link(f"run {r['grid_index']}", f"/run/{r['run_id']}"),
                    "method": r["method"],
                    "model": r["model"],
                    "beta": r["beta"],
                    "temperature": r["temperature"],
                    "steps": r["steps"],
                    "chains": _fraction(r["chains_done"] + r["chains_converged"], r["chains"]),
                    "progress": _fraction(r["steps_done"], r["steps_total"]),
                    "share": _share(r["steps_done"], r["steps_total"]),
                    "acceptance": r["acceptance_rate"],
                    "state_reward": r["state_reward"],
                    "rhat_reward": _rhat(a.get("rhat_reward_max")),
                    "rhat_length": _rhat(a.get("rhat_length_max")),
                    "ess_reward": a.get("ess_reward_min"),
                    "steps_per_s": r["steps_per_s"],
                    "eta": r["eta_s"],
                    "converged": r["prompts_converged"],
                    "failed_chains": r["chains_failed"],
                    "failed_by_reason": failed or "",
                    "step_errors": attempts or "",
                },
                "cls": "bad" if r["chains_failed"] else None,
            }
        )
        for key, (section, name) in CHART_SOURCES.items():
            points = (a.get(section) or {}).get(name)
            if points:
                series[key].append({"name": label, "points": points})
    note = (
        f"plots computing for {pending} run(s); shown as of the last computation"
        if pending
        else None
    )
    total = sum(r["steps_total"] for r in runs)
    done = sum(r["steps_done"] for r in runs)
    return {
        "title": f"Sweep {sweep.name}",
        "crumbs": [_link("sweeps", "/")],
        "as_of": _now(),
        "stats": [
            _stat("status", "status", sweep.status),
            _stat("runs", "runs", len(runs), "int"),
            _stat("steps", "steps done", _fraction(done, total)),
            _stat("failed", "failed chains", sum(r["chains_failed"] for r in runs), "int"),
        ],
        "tables": [
            {
                "key": "runs",
                "title": "Runs (one per grid point)",
                "columns": [
                    _col("run", "run"),
                    _col("method", "method"),
                    _col("model", "model"),
                    _col("beta", "beta", "g"),
                    _col("temperature", "T", "g"),
                    _col("steps", "steps", "int"),
                    _col("chains", "chains done"),
                    _col("progress", "steps done"),
                    _col("share", "progress", "pct"),
                    _col("acceptance", "acceptance rate", "f3"),
                    _col("state_reward", STATE_REWARD, "f3"),
                    _col("rhat_reward", "R-hat reward (max)", "rhat"),
                    _col("rhat_length", "R-hat length (max)", "rhat"),
                    _col("ess_reward", "ESS reward (min)", "f1"),
                    _col("steps_per_s", "steps/s", "f1"),
                    _col("eta", "ETA", "dur"),
                    _col("converged", "prompts converged (stop_when)", "int"),
                    _col("failed_chains", "failed chains", "int"),
                    _col("failed_by_reason", "failed chains by reason"),
                    _col("step_errors", "failed step attempts by kind"),
                ],
                "rows": rows,
            }
        ],
        "charts": [
            _chart(k, CHART_TITLES[k][0], "step", CHART_TITLES[k][1], series[k], note)
            for k in CHART_KEYS
        ],
    }


CHART_SOURCES = {
    "state_reward": ("per_step", "state_reward"),
    "proposal_reward": ("per_step", "proposal_reward"),
    "acceptance": ("per_step", "acceptance"),
    "length": ("per_step", "state_length"),
    "rhat": ("diagnostics_over_steps", "rhat_reward_max"),
    "ess": ("diagnostics_over_steps", "ess_reward_min"),
}
CHART_KEYS = list(CHART_SOURCES)
CHART_TITLES = {
    "state_reward": (STATE_REWARD, "reward"),
    "proposal_reward": (PROPOSAL_REWARD, "reward"),
    "acceptance": ("acceptance rate", "accepted share"),
    "length": ("response length of current states (mean tokens)", "tokens"),
    "rhat": ("R-hat of the states' reward (max over prompts)", "R-hat"),
    "ess": ("ESS of the states' reward (min over prompts, bulk or tail)", "ESS"),
}


def run_page(
    sessions: Sessions, cache: AnalysisCache, run_id: int, prompt: int | None
) -> dict[str, Any]:
    run, sweep = q.run_row(sessions, run_id)
    totals = q.run_totals(sessions, run_id)
    fp = totals["fingerprint"]
    got = cache.get("run", run_id, run.method, fp)
    curves = cache.get("curves", run_id, run.method, fp)
    a = got["result"] or {}
    per_prompt = a.get("prompts") or {}
    prompts = q.run_prompts(sessions, run_id)
    prompt_rows = []
    for p in prompts:
        d = per_prompt.get(p["prompt_index"], {})
        prompt_rows.append(
            {
                "key": str(p["prompt_index"]),
                "cells": {
                    "prompt": _link(p["prompt_index"], f"/run/{run_id}?prompt={p['prompt_index']}"),
                    "chains": _fraction(p["chains_done"], p["chains"]),
                    "failed": p["chains_failed"],
                    "acceptance": p["acceptance_rate"],
                    "state_reward": p["state_reward"],
                    "accuracy": d.get("accuracy"),
                    "rhat_reward": _rhat(d.get("rhat_reward")),
                    "rhat_length": _rhat(d.get("rhat_length")),
                    "ess_bulk": d.get("ess_bulk_reward"),
                    "ess_tail": d.get("ess_tail_reward"),
                },
                "cls": "sel" if prompt == p["prompt_index"] else None,
            }
        )
    chosen = prompt if prompt is not None else (prompts[0]["prompt_index"] if prompts else None)
    chain_rows = []
    if chosen is not None:
        for c in q.prompt_chains(sessions, run_id, chosen):
            chain_rows.append(
                {
                    "key": str(c["chain_id"]),
                    "cells": {
                        "chain": _link(f"chain {c['chain_index']}", f"/chain/{c['chain_id']}"),
                        "status": c["status"],
                        "step": _fraction(c["current_step"], c["target_steps"]),
                        "acceptance": c["acceptance_rate"],
                        "state_reward": c["state_reward"],
                        "last_error": c["last_error"] or "",
                    },
                    "cls": "bad" if c["status"] == "failed" else None,
                }
            )
    cut = a.get("cut_acceptance") or []
    curve_doc = curves["result"] or {}
    curve_series = [
        {"name": m, "points": [[p[0], p[1]] for p in pts]}
        for m, pts in (curve_doc.get("curves") or {}).items()
    ]
    # runs stored before latency columns existed have no server-seconds: no such series
    seconds_series = [
        {"name": m, "points": [[p[3], p[1]] for p in pts if p[3] is not None]}
        for m, pts in (curve_doc.get("curves") or {}).items()
        if pts and all(len(p) > 3 and p[3] is not None for p in pts)
    ]
    curve_note = curve_doc.get("error") or curves["error"]
    if not curves["current"]:
        curve_note = (curve_note + "; " if curve_note else "") + "recomputing"
    diag_note = None if got["current"] else "computing; shown as of the last computation"
    grid = f"method={run.method}, model={run.generator_model}, beta={run.beta}, "
    grid += f"T={run.temperature:g}, steps={run.steps}"
    return {
        "title": f"Run {run.grid_index} of {sweep.name}",
        "subtitle": grid,
        "crumbs": [_link("sweeps", "/"), _link(sweep.name, f"/sweep/{sweep.id}")],
        "as_of": _now(),
        "stats": [
            _stat("method", "method", run.method),
            _stat("model", "model", run.generator_model),
            _stat("beta", "beta", run.beta, "g"),
            _stat("temperature", "T", run.temperature, "g"),
            _stat("steps", "steps done", _fraction(totals["steps_done"], totals["steps_total"])),
            _stat("acceptance", "acceptance rate", totals["acceptance_rate"], "f3"),
            _stat("state_reward", STATE_REWARD, totals["state_reward"], "f3"),
            _stat("prompts", "prompts", len(prompts), "int"),
            _stat("accuracy", "accuracy of current answers", a.get("accuracy"), "pct"),
            _stat("rhat_reward", "R-hat reward (max)", _rhat(a.get("rhat_reward_max")), "rhat"),
            _stat("ess_reward", "ESS reward (min)", a.get("ess_reward_min"), "f1"),
        ],
        "tables": [
            {
                "key": "prompts",
                "title": "Prompts (click one for its chains)",
                "note": diag_note,
                "columns": [
                    _col("prompt", "prompt"),
                    _col("chains", "chains done"),
                    _col("failed", "failed chains", "int"),
                    _col("acceptance", "acceptance rate", "f3"),
                    _col("state_reward", STATE_REWARD, "f3"),
                    _col("accuracy", "accuracy of current answers", "pct"),
                    _col("rhat_reward", "R-hat reward", "rhat"),
                    _col("rhat_length", "R-hat length", "rhat"),
                    _col("ess_bulk", "ESS bulk reward", "f1"),
                    _col("ess_tail", "ESS tail reward", "f1"),
                ],
                "rows": prompt_rows,
            },
            {
                "key": "chains",
                "title": f"Chains of prompt {chosen}",
                "note": q.prompt_text(sessions, run, chosen) if chosen is not None else None,
                "columns": [
                    _col("chain", "chain"),
                    _col("status", "status"),
                    _col("step", "step / target"),
                    _col("acceptance", "acceptance rate", "f3"),
                    _col("state_reward", "reward of current state", "f3"),
                    _col("last_error", "last error"),
                ],
                "rows": chain_rows,
            },
        ],
        "charts": [
            _chart(
                "cut",
                "acceptance by cut position",
                "cut (token index, bin start)",
                "accepted share",
                [{"name": "acceptance", "points": [[b["from"], b["acceptance"]] for b in cut]}]
                if cut
                else [],
                diag_note,
            ),
            _chart(
                "curves",
                "error vs compute (qalign predict's methods)",
                "generated tokens per prompt",
                "error (1 - accuracy)",
                curve_series,
                curve_note,
            ),
            _chart(
                "curves_seconds",
                "error vs server-seconds (qalign predict's methods)",
                "generator + reward server seconds per prompt",
                "error (1 - accuracy)",
                seconds_series,
                curve_note if seconds_series else "no latency stored for this run",
            ),
            *(
                _chart(k, CHART_TITLES[k][0], "step", CHART_TITLES[k][1], s, diag_note)
                for k in CHART_KEYS
                if (s := _one_series(a, k))
            ),
        ],
    }


def _one_series(a: dict[str, Any], key: str) -> list[dict[str, Any]]:
    section, name = CHART_SOURCES[key]
    points = (a.get(section) or {}).get(name)
    return [{"name": "this run", "points": points}] if points else []


def chain_page(sessions: Sessions, chain_id: int) -> dict[str, Any]:
    d = q.chain_detail(sessions, chain_id)
    chain, run, prompt = d["chain"], d["run"], d["prompt"]
    latency = d["latency_columns"]
    rows = []
    state = d["state_before_first_shown"]
    for p in d["proposals"]:
        cut_at = 0 if p["step"] == 0 else q.cut_char(state, p["text"])
        decision = "initial" if p["step"] == 0 else ("accepted" if p["accepted"] else "rejected")
        cells = {
            "step": p["step"],
            "decision": decision,
            "cut": p["cut"],
            # Step 0 (the initial sample) has no state to cut: nothing to mark.
            "text": p["text"]
            if p["step"] == 0
            else {"before": p["text"][:cut_at], "after": p["text"][cut_at:]},
            "reward": p["reward"],
            "alpha": p["alpha"],
            "gen_tokens": p["gen_tokens"],
            "response_len": p["response_len"],
            "reward_tokens": p["reward_tokens"],
            "gen_ms": p["gen_latency_ms"],
            "reward_ms": p["reward_latency_ms"],
            **{c: p[c] for c in latency},
            "finish": p["finish"],
            "why": p["reject_reason"] or p["error"] or "",
        }
        rows.append({"key": str(p["step"]), "cells": cells, "cls": decision})
        if p["step"] == 0 or p["accepted"]:
            state = p["text"]
    shown = len(d["proposals"])
    return {
        "title": f"Chain {chain.chain_index} of prompt {prompt.prompt_index}",
        "subtitle": f"run {run.grid_index} ({run.name})",
        "crumbs": [
            _link("sweeps", "/"),
            _link("sweep", f"/sweep/{run.sweep_id}"),
            _link(f"run {run.grid_index}", f"/run/{run.id}?prompt={prompt.prompt_index}"),
        ],
        "as_of": _now(),
        "stats": [
            _stat("status", "status", chain.status),
            _stat("step", "step / target", _fraction(chain.current_step, chain.target_steps)),
            _stat("accepted", "accepted steps", chain.accepted_steps, "int"),
            _stat("state_reward", "reward of current state", chain.state_reward, "f3"),
            _stat("seed", "seed", chain.seed, "int"),
            _stat("last_error", "last error", chain.last_error or ""),
        ],
        "tables": [
            {
                "key": "trajectory",
                "title": "Trajectory, proposal by proposal",
                "note": (
                    f"the latest {shown} of {d['proposals_total']} proposals"
                    if shown < d["proposals_total"]
                    else "the text is marked (|) where the proposal leaves the state it was "
                    "proposed from; `cut` is the token index"
                ),
                "columns": [
                    _col("step", "step", "int"),
                    _col("decision", "decision"),
                    _col("cut", "cut", "int"),
                    _col("text", "response (kept | new)", "cut"),
                    _col("reward", "reward", "f3"),
                    _col("alpha", "acceptance probability", "f3"),
                    _col("gen_tokens", "generated tokens", "int"),
                    _col("response_len", "response tokens", "int"),
                    _col("reward_tokens", "reward tokens", "int"),
                    _col("gen_ms", "generator latency ms", "f1"),
                    _col("reward_ms", "reward latency ms", "f1"),
                    *(_col(c, c.replace("_", " "), "f3") for c in latency),
                    _col("finish", "finish"),
                    _col("why", "reject reason / error"),
                ],
                "rows": rows,
            }
        ],
        "charts": [],
        "prompt": q.prompt_text(sessions, run, prompt.prompt_index),
    }
