"""Export a sweep's chains and proposals to JSONL and Parquet, streaming in batches.

A sweep with `method: smc` runs also exports its resampling barriers (`smc_resamples.*`) and
particle genealogy (`smc_ancestry.*`); `proposals.log_weight` holds the particles' weights.

Every stored value exports (README "Exporting"): Parquet columns take their types from the SQL
schema, identical in every batch; non-finite floats are null in JSONL (strict JSON), and in
Parquet ±inf stays ±inf while NaN is null.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, String, select
from sqlalchemy.types import TypeDecorator

from qalign.storage.models import Chain, Prompt, Proposal, Run, SmcAncestry, SmcResample
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
                "reward_terms",
                "generator_seconds",
                "reward_seconds",
                "queue_seconds",
                "log_weight",
            )
        },
    }


def _resample_fields() -> dict[str, Any]:
    return {
        "run_id": SmcResample.run_id,
        "run": Run.name,
        "prompt_index": Prompt.prompt_index,
        **{c: getattr(SmcResample, c)
           for c in ("block", "particles", "ess", "resampled", "u", "created_at")},
    }  # fmt: skip


def _ancestry_fields() -> dict[str, Any]:
    return {
        "run_id": SmcAncestry.run_id,
        "run": Run.name,
        "prompt_index": Prompt.prompt_index,
        "chain_id": SmcAncestry.chain_id,
        "chain_index": Chain.chain_index,
        **{c: getattr(SmcAncestry, c)
           for c in ("block", "parent_chain_id", "log_weight", "state_tokens", "state_reward",
                     "state_finish", "state_text")},
    }  # fmt: skip


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
                "source_chain_id",
                "source_step",
            )
        },
        "reference": Prompt.reference,
    }


# JSON columns have no single SQL type; the exported ones hold token ids.
_TOKEN_ID_COLUMNS = frozenset({"new_tokens", "state_tokens"})


class ExportSchemaError(TypeError):
    """An exported column has an SQL type with no Parquet type assigned (a code bug)."""


def _arrow_type(name: str, column: Any) -> Any:
    """The Parquet type of an exported column, from its SQL type (never from the values)."""
    import pyarrow as pa

    sql_type = column.type
    if isinstance(sql_type, TypeDecorator):
        sql_type = sql_type.impl_instance
    if isinstance(sql_type, Boolean):
        return pa.bool_()
    # Every integer is int64: ids and seeds are BIGINT on PostgreSQL and Python ints on SQLite.
    if isinstance(sql_type, Integer):
        return pa.int64()
    if isinstance(sql_type, Float):
        return pa.float64()
    if isinstance(sql_type, DateTime):
        return pa.timestamp("us", tz="UTC")
    if isinstance(sql_type, String):  # Text is a String
        return pa.string()
    if isinstance(sql_type, JSON) and name in _TOKEN_ID_COLUMNS:
        return pa.list_(pa.int64())
    if isinstance(sql_type, JSON) and name == "reward_terms":
        return pa.map_(pa.string(), pa.float64())
    raise ExportSchemaError(
        f"export column {name!r} has SQL type {sql_type!r} with no Parquet type"
    )


def _arrow_schema(fields: dict[str, Any]) -> Any:
    import pyarrow as pa

    return pa.schema([pa.field(name, _arrow_type(name, col)) for name, col in fields.items()])


def _json_value(v: Any) -> Any:
    return v.isoformat() if hasattr(v, "isoformat") else json_safe(v)


def _parquet_value(v: Any) -> Any:
    # float64 holds ±inf exactly; NaN means "no value" in qalign (it is stored as NULL, and
    # SQLite turns a stray NaN into NULL too), so it becomes null on both backends.
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def json_safe(obj: Any) -> Any:
    """`obj` with every non-finite float (also nested in lists and dicts) replaced by None."""
    # Strict JSON has no Infinity/NaN tokens; null is the only portable spelling of "no number".
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def _rows(sessions: Sessions, query: Any) -> Iterator[list[tuple[Any, ...]]]:
    with sessions() as s:
        for part in s.execute(query.execution_options(yield_per=BATCH)).partitions(BATCH):
            yield [tuple(r) for r in part]


def _proposal_rows(
    sessions: Sessions, sweep_id: int, fields: dict[str, Any]
) -> Iterator[list[tuple[Any, ...]]]:
    q = (
        select(*fields.values())
        .join(Chain, Chain.id == Proposal.chain_id)
        .join(Run, Run.id == Proposal.run_id)
        .join(Prompt, Prompt.id == Chain.prompt_id)
        .where(Run.sweep_id == sweep_id)
        .order_by(Proposal.run_id, Proposal.chain_id, Proposal.step)
    )
    return _rows(sessions, q)


def _chain_rows(
    sessions: Sessions, sweep_id: int, fields: dict[str, Any]
) -> Iterator[list[tuple[Any, ...]]]:
    q = (
        select(*fields.values())
        .join(Run, Run.id == Chain.run_id)
        .join(Prompt, Prompt.id == Chain.prompt_id)
        .where(Run.sweep_id == sweep_id)
        .order_by(Chain.id)
    )
    return _rows(sessions, q)


def _smc_rows(
    sessions: Sessions, sweep_id: int, fields: dict[str, Any], table: Any
) -> Iterator[list[tuple[Any, ...]]]:
    q = select(*fields.values()).join(Run, Run.id == table.run_id)
    q = q.join(Prompt, Prompt.id == table.prompt_id)
    order: tuple[Any, ...]
    if table is SmcAncestry:
        q = q.join(Chain, Chain.id == SmcAncestry.chain_id)
        order = (SmcAncestry.run_id, Prompt.prompt_index, SmcAncestry.block, Chain.chain_index)
    else:
        order = (SmcResample.run_id, Prompt.prompt_index, SmcResample.block)
    return _rows(sessions, q.where(Run.sweep_id == sweep_id).order_by(*order))


def _has_smc(sessions: Sessions, sweep_id: int) -> bool:
    with sessions() as s:
        found = s.execute(
            select(Run.id).where(Run.sweep_id == sweep_id, Run.method == "smc").limit(1)
        ).first()
    return found is not None


def _write(
    batches: Iterator[list[tuple[Any, ...]]], fields: dict[str, Any], base: Path, formats: set[str]
) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = list(fields)
    n = 0
    jsonl = base.with_suffix(".jsonl").open("w") if "jsonl" in formats else None
    writer = None
    try:
        if "parquet" in formats:
            # One schema for every batch: inferring it per batch would make a batch whose
            # values are all null (or all ints) disagree with the next one.
            schema = _arrow_schema(fields)
            writer = pq.ParquetWriter(base.with_suffix(".parquet"), schema)
        for batch in batches:
            n += len(batch)
            if jsonl is not None:
                for row in batch:
                    record = dict(zip(names, map(_json_value, row), strict=True))
                    jsonl.write(json.dumps(record, allow_nan=False) + "\n")
            if writer is not None:
                columns = zip(*batch, strict=True)
                arrays = [
                    pa.array([_parquet_value(v) for v in col], type=f.type)
                    for col, f in zip(columns, writer.schema, strict=True)
                ]
                writer.write_table(pa.Table.from_arrays(arrays, schema=writer.schema))
    finally:
        if jsonl is not None:
            jsonl.close()
        if writer is not None:
            writer.close()
    return n


def export_sweep(
    sessions: Sessions, sweep_id: int, out_dir: Path, formats: set[str]
) -> dict[str, int]:
    """Write `chains.*` and `proposals.*` under `out_dir` (and, for a sweep with SMC runs,
    `smc_resamples.*` and `smc_ancestry.*`); returns row counts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    chains, proposals = _chain_fields(), _proposal_fields()
    counts = {
        "chains": _write(
            _chain_rows(sessions, sweep_id, chains), chains, out_dir / "chains", formats
        ),
        "proposals": _write(
            _proposal_rows(sessions, sweep_id, proposals), proposals, out_dir / "proposals", formats
        ),
    }
    if _has_smc(sessions, sweep_id):
        for name, fields, table in (
            ("smc_resamples", _resample_fields(), SmcResample),
            ("smc_ancestry", _ancestry_fields(), SmcAncestry),
        ):
            rows = _smc_rows(sessions, sweep_id, fields, table)
            counts[name] = _write(rows, fields, out_dir / name, formats)
    return counts
