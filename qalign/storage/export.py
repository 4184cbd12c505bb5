"""Export a sweep's chains and proposals to JSONL and Parquet, streaming in batches."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import select

from qalign.storage.models import Chain, Prompt, Proposal, Run
from qalign.storage.repo import Sessions

BATCH = 2000


def _proposal_fields() -> dict[str, Any]:
    return {
        "run_id": Proposal.run_id,
        "run": Run.name,
        "chain_id": Proposal.chain_id,
        "prompt_index": Prompt.prompt_index,
        "chain_index": Chain.chain_index,
        **{
            c: getattr(Proposal, c)
            for c in (
                "step",
                "cut",
                "new_tokens",
                "response_len",
                "text",
                "reward",
                "log_a",
                "alpha",
                "accepted",
                "finish",
                "reject_reason",
                "gen_seed",
                "gen_tokens",
                "reward_tokens",
                "gen_latency_ms",
                "reward_latency_ms",
                "endpoint",
                "worker",
                "created_at",
            )
        },
    }


def _chain_fields() -> dict[str, Any]:
    return {
        "run_id": Chain.run_id,
        "run": Run.name,
        "chain_id": Chain.id,
        "prompt_index": Prompt.prompt_index,
        **{
            c: getattr(Chain, c)
            for c in (
                "chain_index",
                "seed",
                "status",
                "current_step",
                "target_steps",
                "state_tokens",
                "state_reward",
                "state_finish",
                "state_text",
                "attempts",
                "last_error",
            )
        },
        "reference": Prompt.reference,
    }


def _clean(v: Any) -> Any:
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if hasattr(v, "isoformat"):
        return v.isoformat()
    return v


def _rows(sessions: Sessions, fields: dict[str, Any], query: Any) -> Iterator[list[dict[str, Any]]]:
    names = list(fields)
    with sessions() as s:
        for part in s.execute(query.execution_options(yield_per=BATCH)).partitions(BATCH):
            yield [dict(zip(names, map(_clean, r), strict=True)) for r in part]


def _proposal_rows(sessions: Sessions, sweep_id: int) -> Iterator[list[dict[str, Any]]]:
    fields = _proposal_fields()
    q = (
        select(*fields.values())
        .join(Chain, Chain.id == Proposal.chain_id)
        .join(Run, Run.id == Proposal.run_id)
        .join(Prompt, Prompt.id == Chain.prompt_id)
        .where(Run.sweep_id == sweep_id)
        .order_by(Proposal.run_id, Proposal.chain_id, Proposal.step)
    )
    return _rows(sessions, fields, q)


def _chain_rows(sessions: Sessions, sweep_id: int) -> Iterator[list[dict[str, Any]]]:
    fields = _chain_fields()
    q = (
        select(*fields.values())
        .join(Run, Run.id == Chain.run_id)
        .join(Prompt, Prompt.id == Chain.prompt_id)
        .where(Run.sweep_id == sweep_id)
        .order_by(Chain.id)
    )
    return _rows(sessions, fields, q)


def _write(batches: Iterator[list[dict[str, Any]]], base: Path, formats: set[str]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 0
    jsonl = base.with_suffix(".jsonl").open("w") if "jsonl" in formats else None
    writer = None
    try:
        for batch in batches:
            n += len(batch)
            if jsonl is not None:
                jsonl.writelines(json.dumps(row) + "\n" for row in batch)
            if "parquet" in formats:
                table = pa.Table.from_pylist(batch)
                if writer is None:
                    writer = pq.ParquetWriter(base.with_suffix(".parquet"), table.schema)
                writer.write_table(table.cast(writer.schema))
    finally:
        if jsonl is not None:
            jsonl.close()
        if writer is not None:
            writer.close()
    return n


def export_sweep(
    sessions: Sessions, sweep_id: int, out_dir: Path, formats: set[str]
) -> dict[str, int]:
    """Write `chains.*` and `proposals.*` under `out_dir`; returns row counts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return {
        "chains": _write(_chain_rows(sessions, sweep_id), out_dir / "chains", formats),
        "proposals": _write(_proposal_rows(sessions, sweep_id), out_dir / "proposals", formats),
    }
