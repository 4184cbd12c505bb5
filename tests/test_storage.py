"""The storage layer on real SQLite and PostgreSQL: migrations, schema checks, engines, models.

NaN policy (tested below): callers store a NaN reward / log_a as NULL (`qalign.storage.repo`
does). The backends differ if a NaN slips through: SQLite stores NULL, PostgreSQL stores NaN.
±inf round-trips on both. NaN/±inf inside JSON columns is refused on both (PostgreSQL's json
type rejects it; the engines' JSON serializer refuses it everywhere).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import Engine, delete, func, inspect, make_url, select, text
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool, StaticPool

from qalign.cli_db import db_group
from qalign.storage import (
    Base,
    Chain,
    DatabaseConnectionError,
    DatabaseUnreachableError,
    InvalidDatabaseURLError,
    Prompt,
    PromptEncoding,
    Proposal,
    Run,
    SchemaNotAtHeadError,
    SQLiteDirectoryMissingError,
    Sweep,
    check_schema,
    current_revision,
    database_url,
    downgrade,
    ensure_schema,
    head_revision,
    make_engine,
    make_sessionmaker,
    migrate,
    ping,
    redact_url,
    upgrade,
)

UTC = dt.UTC


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def migrated(engine: Engine) -> Engine:
    upgrade(engine)
    return engine


def _tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def _schema_diff(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, Base.metadata))


def _names(engine: Engine) -> set[tuple[str, str, str]]:
    """(table, kind, name) of every named primary key, unique constraint, foreign key, index."""
    insp = inspect(engine)
    out: set[tuple[str, str, str]] = set()
    for table in Base.metadata.tables:
        pk = insp.get_pk_constraint(table)["name"]
        if pk:
            out.add((table, "pk", pk))
        out |= {(table, "uq", str(u["name"])) for u in insp.get_unique_constraints(table)}
        out |= {(table, "fk", str(f["name"])) for f in insp.get_foreign_keys(table)}
        # PostgreSQL reports a unique constraint's backing index as an index too.
        out |= {
            (table, "ix", str(i["name"]))
            for i in insp.get_indexes(table)
            if not i.get("duplicates_constraint")
        }
    return out


def _model_names() -> set[tuple[str, str, str]]:
    out: set[tuple[str, str, str]] = set()
    for name, table in Base.metadata.tables.items():
        for c in table.constraints:
            kind = type(c).__name__
            short = {"PrimaryKeyConstraint": "pk", "UniqueConstraint": "uq"}.get(kind)
            short = short or ("fk" if kind == "ForeignKeyConstraint" else None)
            if short:
                out.add((name, short, str(c.name)))
        out |= {(name, "ix", str(i.name)) for i in table.indexes}
    return out


# --- migrations -------------------------------------------------------------------------------


def test_upgrade_downgrade_upgrade_and_models_match_migrations(engine: Engine) -> None:
    head = head_revision()
    newest = sorted(p.stem for p in (migrate.migrations_dir() / "versions").glob("0*.py"))[-1]
    assert head == newest
    assert current_revision(engine) is None

    upgrade(engine)
    assert current_revision(engine) == head
    assert _tables(engine) == set(Base.metadata.tables) | {"alembic_version"}
    assert _schema_diff(engine) == []
    assert _names(engine) == _model_names()  # every name exactly as the naming convention says

    downgrade(engine, "base")
    assert current_revision(engine) is None
    assert _tables(engine) - {"alembic_version"} == set()  # Alembic keeps its (empty) table

    upgrade(engine)
    assert current_revision(engine) == head
    assert _schema_diff(engine) == []
    upgrade(engine)  # idempotent
    assert current_revision(engine) == head


def test_upgrade_accepts_a_url_and_disposes_its_engine(db_url: str) -> None:
    upgrade(db_url)
    eng = make_engine(db_url)
    try:
        assert check_schema(eng) == head_revision()
    finally:
        eng.dispose()


def test_concurrent_ensure_schema_on_postgres(pg_url: str) -> None:
    with ThreadPoolExecutor(4) as pool:
        revisions = list(pool.map(lambda _: ensure_schema(pg_url), range(4)))
    assert revisions == [head_revision()] * 4


def test_in_memory_sqlite_shares_one_connection() -> None:
    eng = make_engine("sqlite://")
    assert isinstance(eng.pool, StaticPool)
    assert ensure_schema(eng) == head_revision()
    assert check_schema(eng) == head_revision()
    eng.dispose()


# --- check_schema / ensure_schema -------------------------------------------------------------


def test_check_schema_on_an_empty_database(engine: Engine, db_url: str) -> None:
    with pytest.raises(SchemaNotAtHeadError) as err:
        check_schema(engine)
    e = err.value
    assert (e.state, e.current, e.head) == ("empty", None, head_revision())
    assert "qalign db upgrade" in str(e)
    assert "current: none" in str(e) and f"head: {head_revision()}" in str(e)
    if db_url.startswith("sqlite"):  # a check does not create the file
        assert not Path(make_url(db_url).database or "").exists()


def test_check_schema_at_head(migrated: Engine) -> None:
    assert check_schema(migrated) == head_revision()
    assert ensure_schema(migrated) == head_revision()


def test_check_schema_ahead_refuses_everything(migrated: Engine) -> None:
    with migrated.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff_from_the_future'"))
    with pytest.raises(SchemaNotAtHeadError) as err:
        check_schema(migrated)
    e = err.value
    assert (e.state, e.current) == ("ahead", "ffff_from_the_future")
    message = str(e)
    assert "newer qalign" in message and "qalign db upgrade" in message
    assert "current: ffff_from_the_future" in message and f"head: {head_revision()}" in message
    with pytest.raises(SchemaNotAtHeadError, match="newer qalign"):
        upgrade(migrated)
    with pytest.raises(SchemaNotAtHeadError, match="newer qalign"):
        ensure_schema(migrated)


def _newer_migrations(tmp_path: Path) -> Path:
    """A copy of the migrations with one more (empty) revision: what a newer qalign ships."""
    folder = tmp_path / "newer-migrations"
    shutil.copytree(migrate.migrations_dir(), folder, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "versions" / "9999_next.py").write_text(
        'revision = "9999_next"\n'
        f'down_revision = "{head_revision()}"\n'
        "branch_labels = None\n"
        "depends_on = None\n\n\n"
        "def upgrade():\n    pass\n\n\n"
        "def downgrade():\n    pass\n"
    )
    return folder


def test_check_schema_behind_then_ensure_schema_upgrades(
    migrated: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    this_head = head_revision()
    newer = _newer_migrations(tmp_path)
    with monkeypatch.context() as m:  # this process is now the newer qalign
        m.setattr(migrate, "migrations_dir", lambda: newer)
        m.setattr(migrate, "HEAD", "9999_next")
        assert head_revision() == "9999_next"
        with pytest.raises(SchemaNotAtHeadError) as err:
            check_schema(migrated)
        assert (err.value.state, err.value.current, err.value.head) == (
            "behind",
            this_head,
            "9999_next",
        )
        assert "qalign db upgrade" in str(err.value)
        assert f"current: {this_head}, head: 9999_next" in str(err.value)
        assert ensure_schema(migrated) == "9999_next"
    # Back to this qalign: the database was migrated by a newer one.
    with pytest.raises(SchemaNotAtHeadError) as err:
        check_schema(migrated)
    assert err.value.state == "ahead"


def test_tables_without_a_revision_are_not_silently_adopted(engine: Engine) -> None:
    Base.metadata.create_all(engine)
    with pytest.raises(SchemaNotAtHeadError) as err:
        check_schema(engine)
    assert err.value.state == "unversioned"
    with pytest.raises(SchemaNotAtHeadError):
        upgrade(engine)
    with pytest.raises(SchemaNotAtHeadError):
        ensure_schema(engine)


# --- engines ----------------------------------------------------------------------------------


def test_sqlite_pragmas_on_every_connection_and_across_threads(sqlite_url: str) -> None:
    eng = make_engine(sqlite_url)
    assert isinstance(eng.pool, QueuePool) and eng.pool.size() == 32
    pragmas = ("journal_mode", "busy_timeout", "synchronous", "foreign_keys")
    with eng.connect() as a, eng.connect() as b:
        for conn in (a, b):
            got = [conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in pragmas]
            assert got == ["wal", 30000, 1, 1]  # synchronous 1 == NORMAL
        # check_same_thread=False: a connection may be used from another thread.
        seen: list[Any] = []
        worker = threading.Thread(
            target=lambda: seen.append(a.exec_driver_sql("SELECT 7").scalar())
        )
        worker.start()
        worker.join()
        assert seen == [7]
    eng.dispose()


def test_pool_sizes_from_arguments_and_environment(
    sqlite_url: str, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = make_engine(pg_url)
    assert pg.dialect.driver == "psycopg"
    assert isinstance(pg.pool, QueuePool) and pg.pool.size() == 32
    assert not pg.pool._pre_ping  # idle connections are pinged by our checkout hook instead
    pg.dispose()
    monkeypatch.setenv("QALIGN_DB_POOL_SIZE", "5")
    monkeypatch.setenv("QALIGN_DB_MAX_OVERFLOW", "0")
    for url in (sqlite_url, pg_url):
        eng = make_engine(url)
        assert isinstance(eng.pool, QueuePool)
        assert (eng.pool.size(), eng.pool._max_overflow) == (5, 0)
        eng.dispose()
        eng = make_engine(url, pool_size=3, max_overflow=2)
        assert isinstance(eng.pool, QueuePool)
        assert (eng.pool.size(), eng.pool._max_overflow) == (3, 2)
        eng.dispose()
    monkeypatch.setenv("QALIGN_DB_POOL_SIZE", "many")
    with pytest.raises(ValueError, match="QALIGN_DB_POOL_SIZE"):
        make_engine(sqlite_url)


def test_database_url_precedence_and_normalisation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("QALIGN_DATABASE_URL", raising=False)
    assert database_url() == f"sqlite:///{tmp_path / 'qalign.sqlite'}"
    monkeypatch.setenv("QALIGN_DATABASE_URL", "postgres://u:p@db:5432/q")
    assert database_url() == "postgresql+psycopg://u:p@db:5432/q"
    assert database_url("sqlite:///x.sqlite") == "sqlite:///x.sqlite"
    assert database_url("  ") == "postgresql+psycopg://u:p@db:5432/q"
    assert database_url("postgresql://u@h/d") == "postgresql+psycopg://u@h/d"
    assert database_url("postgresql+psycopg://u@h/d") == "postgresql+psycopg://u@h/d"
    monkeypatch.setenv("QALIGN_DATABASE_URL", "")
    assert database_url() == f"sqlite:///{tmp_path / 'qalign.sqlite'}"


def test_redact_url() -> None:
    assert redact_url("postgresql+psycopg://u:s3cret@h:5432/db") == (
        "postgresql+psycopg://u:***@h:5432/db"
    )
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redact_url("sqlite:////tmp/x.sqlite") == "sqlite:////tmp/x.sqlite"
    assert "s3cret" not in redact_url("postgresql://u:s3cret@h:port/db")  # unparsable port


def test_malformed_and_unsupported_urls() -> None:
    with pytest.raises(InvalidDatabaseURLError, match="malformed database URL") as err:
        make_engine("not a url")
    assert "postgresql://" in str(err.value)  # shows what a good URL looks like
    with pytest.raises(InvalidDatabaseURLError) as err:
        make_engine("postgresql://u:topsecret@h:notaport/db")
    assert "topsecret" not in str(err.value) and "notaport" in str(err.value)
    with pytest.raises(InvalidDatabaseURLError, match="unsupported database backend 'mysql'"):
        make_engine("mysql://u@h/db")
    with pytest.raises(InvalidDatabaseURLError, match="empty"):
        make_engine("")


def test_missing_sqlite_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    with pytest.raises(SQLiteDirectoryMissingError) as err:
        make_engine(f"sqlite:///{missing / 'q.sqlite'}")
    assert err.value.directory == str(missing)
    assert str(missing) in str(err.value) and "mkdir -p" in str(err.value)


def test_unreachable_postgres_names_host_and_port_without_password() -> None:
    eng = make_engine("postgresql://postgres:topsecret@127.0.0.1:1/test")
    with pytest.raises(DatabaseUnreachableError) as err:
        ping(eng)
    e = err.value
    assert (e.host, e.port, e.reason) == ("127.0.0.1", 1, "refused")
    assert "127.0.0.1:1" in str(e) and "topsecret" not in str(e) and "***" in str(e)
    with pytest.raises(DatabaseUnreachableError):
        check_schema(eng)
    eng.dispose()
    result = CliRunner().invoke(
        db_group, ["check", "--database", "postgresql://postgres:topsecret@127.0.0.1:1/test"]
    )
    assert result.exit_code == 1
    assert "127.0.0.1:1" in result.output and "topsecret" not in result.output


def test_missing_postgres_database_says_how_to_create_it(pg_url: str) -> None:
    eng = make_engine(make_url(pg_url).set(database="qalign_no_such_db"))
    with pytest.raises(DatabaseConnectionError) as err:
        ping(eng)
    assert err.value.reason == "missing-database"
    assert "CREATE DATABASE" in str(err.value)
    eng.dispose()


# --- models -----------------------------------------------------------------------------------


def _sweep(session: Session, name: str = "s") -> Sweep:
    sweep = Sweep(name=name, config={"grid": {"beta": [0.5, 1.0]}, "n": 3}, config_hash="ab" * 32)
    session.add(sweep)
    session.flush()
    return sweep


def _graph(session: Session) -> tuple[Sweep, Run, Prompt, Chain]:
    sweep = _sweep(session)
    run = Run(
        sweep_id=sweep.id,
        grid_index=0,
        name="beta=1",
        method="qalign",
        beta=1.0,
        temperature=1.0,
        steps=4,
        generator_model="gen",
        reward_model="rm",
        config={"beta": 1.0},
    )
    prompt = Prompt(
        sweep_id=sweep.id,
        prompt_index=0,
        messages=[{"role": "user", "content": "hi ✓"}],
        reference="42",
        row={"question": "hi", "answer": 42},
    )
    session.add_all([run, prompt])
    session.flush()
    chain = Chain(
        run_id=run.id,
        prompt_id=prompt.id,
        chain_index=0,
        seed=2**62 + 1,
        rng_key="r0/p0/c0",
        target_steps=4,
    )
    session.add(chain)
    session.flush()
    return sweep, run, prompt, chain


def _proposal(chain: Chain, step: int, **kw: Any) -> Proposal:
    values: dict[str, Any] = {
        "chain_id": chain.id,
        "run_id": chain.run_id,
        "step": step,
        "cut": 0,
        "new_tokens": [1, 2, 3],
        "response_len": 3,
        "text": "a b c",
        "reward": 0.5,
        "log_a": -0.25,
        "alpha": 0.75,
        "accepted": True,
        "finish": "stop",
        "gen_seed": 2**31 - 2,
        "gen_tokens": 3,
        "gen_latency_ms": 1.5,
        "reward_latency_ms": 2.5,
        "endpoint": "http://127.0.0.1:8000",
    }
    values.update(kw)
    return Proposal(**values)


def test_round_trip_of_every_model(migrated: Engine) -> None:
    sessions = make_sessionmaker(migrated)
    tokens = [*range(0, 200_000, 997), 2**31 - 1]
    enqueued = dt.datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    with sessions.begin() as s:
        sweep, run, prompt, chain = _graph(s)
        s.add(PromptEncoding(prompt_id=prompt.id, model="gen", token_ids=tokens, n_tokens=7))
        chain.state_tokens = tokens
        chain.state_logprobs = [-0.5, -1e-300, 0.0]
        chain.state_reward = -math.inf
        chain.state_finish = "length"
        chain.state_text = "multi\nline ✓"
        chain.enqueued_at = enqueued
        s.add(_proposal(chain, 0, reward=math.inf, log_a=-math.inf, worker="w1", error=None))
        s.add(_proposal(chain, 1, reward=-math.inf, log_a=math.inf, accepted=False))
        s.add(_proposal(chain, 2, reward=None, log_a=None, reject_reason="nan_reward"))
        ids = (sweep.id, run.id, prompt.id, chain.id)

    with sessions() as s:
        sweep = s.get_one(Sweep, ids[0])
        assert sweep.config == {"grid": {"beta": [0.5, 1.0]}, "n": 3}
        assert sweep.status == "active"
        run = s.get_one(Run, ids[1])
        assert (run.beta, run.reward_model, run.config) == (1.0, "rm", {"beta": 1.0})
        prompt = s.get_one(Prompt, ids[2])
        assert prompt.messages == [{"role": "user", "content": "hi ✓"}]
        assert prompt.row == {"question": "hi", "answer": 42}
        enc = s.scalars(select(PromptEncoding)).one()
        assert enc.token_ids == tokens and all(type(t) is int for t in enc.token_ids)
        chain = s.get_one(Chain, ids[3])
        assert (chain.current_step, chain.status, chain.attempts) == (-1, "pending", 0)
        assert chain.seed == 2**62 + 1
        assert chain.state_tokens == tokens
        assert chain.state_logprobs == [-0.5, -1e-300, 0.0]
        assert chain.state_reward == -math.inf
        assert chain.state_text == "multi\nline ✓"
        # Datetimes come back timezone-aware in UTC on both backends.
        assert chain.enqueued_at == enqueued and chain.enqueued_at.tzinfo == UTC
        for stamp in (sweep.created_at, sweep.updated_at, chain.created_at, chain.updated_at):
            assert stamp.tzinfo == UTC
            assert abs(dt.datetime.now(UTC) - stamp) < dt.timedelta(minutes=5)
        props = s.scalars(select(Proposal).order_by(Proposal.step)).all()
        assert [(p.reward, p.log_a) for p in props] == [
            (math.inf, -math.inf),
            (-math.inf, math.inf),
            (None, None),
        ]
        assert props[0].new_tokens == [1, 2, 3] and props[0].worker == "w1"
        assert props[0].gen_seed == 2**31 - 2 and props[0].accepted is True
        assert props[1].accepted is False and props[2].reject_reason == "nan_reward"
        assert props[0].created_at.tzinfo == UTC
        # SQL comparisons on datetimes agree with Python's.
        later = s.scalar(
            select(func.count()).select_from(Chain).where(Chain.enqueued_at < enqueued)
        )
        assert later == 0


def test_nan_in_float_columns_differs_by_backend(migrated: Engine) -> None:
    """Callers must store NaN as NULL; if one slips through, SQLite keeps NULL, PostgreSQL NaN."""
    sessions = make_sessionmaker(migrated)
    with sessions.begin() as s:
        *_, chain = _graph(s)
        s.add(_proposal(chain, 0, reward=math.nan, log_a=math.nan))
    with sessions() as s:
        p = s.scalars(select(Proposal)).one()
        if migrated.dialect.name == "sqlite":
            assert (p.reward, p.log_a) == (None, None)
        else:
            assert p.reward is not None and math.isnan(p.reward)
            assert p.log_a is not None and math.isnan(p.log_a)


def test_non_finite_floats_in_json_are_refused(migrated: Engine) -> None:
    sessions = make_sessionmaker(migrated)
    for bad in (math.nan, -math.inf):
        # SQLite: StatementError around the ValueError; psycopg: the ValueError itself.
        refused = pytest.raises((StatementError, ValueError), match="JSON compliant")
        with refused, sessions.begin() as s:
            *_, chain = _graph(s)
            chain.state_logprobs = [-0.1, bad]


def test_naive_datetimes_are_refused(migrated: Engine) -> None:
    sessions = make_sessionmaker(migrated)
    with pytest.raises(StatementError, match="naive datetime"), sessions.begin() as s:
        *_, chain = _graph(s)
        chain.enqueued_at = dt.datetime(2025, 1, 1)


def test_unique_chain_step(migrated: Engine) -> None:
    sessions = make_sessionmaker(migrated)
    with sessions.begin() as s:
        *_, chain = _graph(s)
        s.add(_proposal(chain, 0))
        chain_id = chain.id
        run_id = chain.run_id
    with pytest.raises(IntegrityError), sessions.begin() as s:
        chain = s.get_one(Chain, chain_id)
        s.add(_proposal(chain, 0, text="again"))
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Proposal)) == 1
        assert s.get_one(Chain, chain_id).run_id == run_id


def test_foreign_keys_enforced_and_cascade(migrated: Engine) -> None:
    sessions = make_sessionmaker(migrated)
    with pytest.raises(IntegrityError), sessions.begin() as s:
        s.add(Prompt(sweep_id=12345, prompt_index=0, messages=[], row={}))
    with sessions.begin() as s:
        sweep, _, prompt, chain = _graph(s)
        s.add(PromptEncoding(prompt_id=prompt.id, model="gen", token_ids=[1], n_tokens=1))
        s.add(_proposal(chain, 0))
        sweep_id = sweep.id
    with sessions.begin() as s:
        s.execute(delete(Sweep).where(Sweep.id == sweep_id))
    with sessions() as s:
        for model in (Run, Prompt, PromptEncoding, Chain, Proposal):
            assert s.scalar(select(func.count()).select_from(model)) == 0, model


def test_many_threads_write_at_once(migrated: Engine) -> None:
    """32 threads (a worker's pool) commit small transactions concurrently without errors."""
    sessions = make_sessionmaker(migrated)
    with sessions.begin() as s:
        *_, chain = _graph(s)
        chain_id, run_id = chain.id, chain.run_id

    def work(t: int) -> None:
        for k in range(4):
            with sessions.begin() as s:
                s.add(_proposal(s.get_one(Chain, chain_id), 4 * t + k, run_id=run_id))

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(work, range(32)))
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Proposal)) == 128


# --- CLI --------------------------------------------------------------------------------------


def test_cli_upgrade_and_check_print_redacted_urls(db_url: str) -> None:
    url = db_url
    if url.startswith("postgresql"):  # trust auth: the password is never asked for
        url = make_url(url).set(password="hunter2").render_as_string(hide_password=False)
    runner = CliRunner()
    result = runner.invoke(db_group, ["check", "--database", url])
    assert result.exit_code == 1, result.output
    assert "qalign db upgrade" in result.output and "hunter2" not in result.output

    result = runner.invoke(db_group, ["upgrade", "--database", url])
    assert result.exit_code == 0, result.output
    assert f"upgraded from an empty database to {head_revision()}" in result.output
    assert "hunter2" not in result.output

    result = runner.invoke(db_group, ["upgrade", "--database", url])
    assert result.exit_code == 0 and "already at revision" in result.output

    result = runner.invoke(db_group, ["check", "--database", url])
    assert result.exit_code == 0, result.output
    assert head_revision() in result.output and "hunter2" not in result.output
    if url != db_url:
        assert "***" in result.output


def test_cli_uses_environment_and_has_examples(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QALIGN_DATABASE_URL", sqlite_url)
    runner = CliRunner()
    assert runner.invoke(db_group, ["upgrade"]).exit_code == 0
    assert runner.invoke(db_group, ["check"]).exit_code == 0
    for cmd in ("upgrade", "check"):
        help_text = runner.invoke(db_group, [cmd, "--help"]).output
        assert "Examples:" in help_text and f"qalign db {cmd} --database" in help_text
    bad = runner.invoke(db_group, ["upgrade", "--revision", "nope"])
    assert bad.exit_code == 1 and "nope" in bad.output


def _step_params(chain_id: int, step: int, tokens: tuple[int, ...], **kw: Any) -> Any:
    from qalign.core import Finish

    values: dict[str, Any] = {
        "chain_id": chain_id,
        "run_id": 1,
        "step": step,
        "cut": 1,
        "new_tokens": tokens[1:],
        "response_len": len(tokens),
        "text": "a\x00b",
        "reward": math.nan,
        "log_a": -math.inf,
        "alpha": 0.0,
        "accepted": False,
        "finish": "length",
        "reject_reason": "non_finite_reward",
        "gen_seed": 2**31 - 2,
        "reward_tokens": 12,
        "gen_latency_ms": 1.5,
        "reward_latency_ms": 2.5,
        "endpoint": "http://127.0.0.1:8000",
        "worker": "w1",
        "state_tokens": tokens,
        "state_logprobs": None,
        "state_reward": 0.25,
        "state_finish": Finish.STOP.value,
        "state_text": "state ✓",
        "reward_terms": {"rm": 1.5, "ref": -math.inf},
        "generator_seconds": 0.125,
        "reward_seconds": 0.0,
        "queue_seconds": 2.5,
        "log_weight": None,  # set by SMC blocks only
    }
    values.update(kw)
    return values


def test_step_hot_path_reads_and_writes_what_the_orm_sees(migrated: Engine) -> None:
    """The driver-level step statements agree with the models, and the compare-and-set holds."""
    from qalign.storage import repo

    sessions = make_sessionmaker(migrated)
    with sessions.begin() as s:
        _, run, _, chain = _graph(s)
        run.config = {"generator_model": "gen", "beta": 1.0}
        chain.target_steps = 1
        chain_id = chain.id
    ctx = repo.read_chain(sessions, chain_id)
    assert (ctx.current_step, ctx.status, ctx.state) == (-1, "pending", None)
    assert repo.prompt_messages(sessions, ctx.prompt_id)[0]["content"] == "hi ✓"
    before = dt.datetime.now(dt.UTC)
    # the commit returns the chain's stored target_steps
    assert repo.commit_step(sessions, _step_params(chain_id, 0, (5, 6, 7))) == 1
    assert repo.commit_step(sessions, _step_params(chain_id, 0, (9,))) is None  # duplicate delivery
    with sessions() as s:
        p = s.execute(select(Proposal)).scalar_one()
        c = s.get(Chain, chain_id)
        assert c is not None
        assert (p.step, p.new_tokens, p.gen_tokens, p.text, p.reward, p.log_a) == (
            0, [6, 7], 2, "a\ufffdb", None, -math.inf,
        )  # fmt: skip
        assert (p.accepted, p.reject_reason, p.worker, p.reward_tokens) == (
            False, "non_finite_reward", "w1", 12,
        )  # fmt: skip
        assert p.reward_terms == {"rm": 1.5, "ref": None}  # JSON has no infinities
        assert (p.generator_seconds, p.reward_seconds, p.queue_seconds) == (0.125, 0.0, 2.5)
        assert before <= p.created_at <= dt.datetime.now(dt.UTC)
        assert p.created_at.tzinfo is not None and c.updated_at == p.created_at
        assert (c.current_step, c.status, c.state_tokens, c.state_logprobs, c.state_text) == (
            0, "running", [5, 6, 7], None, "state ✓",
        )  # fmt: skip
        n_null = s.execute(select(func.count()).where(Chain.state_logprobs.is_(None))).scalar()
        assert n_null == 1  # SQL NULL, not JSON null
    ctx = repo.read_chain(sessions, chain_id)
    assert ctx.state is not None and ctx.state.tokens == (5, 6, 7) and ctx.state.reward == 0.25
    # A proposal that exists without the chain having moved (should never happen) blocks the
    # commit and leaves the chain where it was: both writes are one atomic unit.
    with sessions.begin() as s:
        s.add(_proposal(c, 1))
    assert repo.commit_step(sessions, _step_params(chain_id, 1, (5, 8))) is None
    with sessions() as s:
        c = s.get(Chain, chain_id)
        assert c is not None and (c.current_step, c.state_tokens) == (0, [5, 6, 7])
        s.execute(delete(Proposal).where(Proposal.step == 1))
        s.commit()
    assert repo.commit_step(sessions, _step_params(chain_id, 1, (5, 8), accepted=True)) == 1
    with sessions() as s:
        c = s.get(Chain, chain_id)
        assert c is not None and (c.current_step, c.status) == (1, "done")
        # status counters: step 1 was accepted, both proposals carried a reject reason
        assert (c.accepted_steps, c.rejected_with_reason) == (1, 2)
        assert c.first_step_at is not None and c.last_step_at == c.updated_at
        assert c.first_step_at < c.last_step_at
    assert repo.commit_step(sessions, _step_params(chain_id, 2, (5,))) is None  # finished chain
    with pytest.raises(LookupError, match="chain 999 does not exist"):
        repo.read_chain(sessions, 999)
    with pytest.raises(ValueError, match="commit_step takes exactly"):
        repo.commit_step(sessions, {"chain_id": chain_id, "step": 2})


@pytest.mark.parametrize(
    ("reward", "logprobs", "text"),
    [
        (0.25, (-0.5, -1.25, -0.125), "state ✓"),
        (math.nan, None, "a\x00b"),  # an unscored state; NUL is stored as U+FFFD
        (math.inf, (-0.5, -math.inf, -1.0), "x"),  # logprobs JSON cannot hold: stored as NULL
    ],
)
def test_committed_row_is_what_reading_the_chain_back_returns(
    migrated: Engine, reward: float, logprobs: tuple[float, ...] | None, text: str
) -> None:
    """A driver goes on from `committed_row` instead of reading the chain again: it must be
    the row a read returns (but for `updated_at`, the commit's own clock)."""
    from qalign.core import Finish, State
    from qalign.storage import repo

    sessions = make_sessionmaker(migrated)
    with sessions.begin() as s:
        _, run, _, chain = _graph(s)
        run.config = {"generator_model": "gen", "beta": 1.0}
        chain.target_steps = 3
        chain_id = chain.id
    before = repo.read_chain(sessions, chain_id)
    state = State(tokens=(5, 6, 7), reward=reward, finish=Finish.STOP, logprobs=logprobs)
    params = _step_params(chain_id, 0, state.tokens, state_reward=reward,
                          state_logprobs=logprobs, state_text=text)  # fmt: skip
    target = repo.commit_step(sessions, params)
    assert target == 3
    row = repo.committed_row(before, 0, target, state, text)
    read = repo.read_chain(sessions, chain_id)
    assert row.state is not None and read.state is not None
    assert math.isnan(row.state.reward) == math.isnan(read.state.reward)
    nan_free = dataclasses.replace(row.state, reward=0.0 if math.isnan(reward) else reward)
    assert nan_free == dataclasses.replace(read.state, reward=nan_free.reward)
    assert dataclasses.replace(row, state=None, updated_at=read.updated_at) == (
        dataclasses.replace(read, state=None)
    )
    assert abs((row.updated_at - read.updated_at).total_seconds()) < 60


def test_steps_committed_together_are_each_their_own_compare_and_set(migrated: Engine) -> None:
    """`commit_steps` (one transaction, pipelined on PostgreSQL) gives each step what
    `commit_step` alone would: stale and duplicate steps change nothing, the others commit."""
    from qalign.storage import repo

    sessions = make_sessionmaker(migrated)
    with sessions.begin() as s:
        _, run, prompt, chain = _graph(s)
        run.config = {"generator_model": "gen", "beta": 1.0}
        chain.target_steps = 2
        other = Chain(run_id=run.id, prompt_id=prompt.id, chain_index=1, seed=1, rng_key="k1",
                      target_steps=5, current_step=-1, status="pending", attempts=0)  # fmt: skip
        s.add(other)
        s.flush()
        a, b = chain.id, other.id
    assert repo.commit_steps(sessions, [_step_params(a, 0, (5, 6)), _step_params(b, 0, (7,))]) == [
        2,
        5,
    ]
    got = repo.commit_steps(
        sessions,
        [
            _step_params(a, 0, (9,)),  # a redelivered step 0: a duplicate
            _step_params(a, 1, (5, 8)),
            _step_params(b, 2, (7, 7)),  # chain b is at step 0: not its next step
            _step_params(b, 1, (7, 3)),
        ],
    )
    assert got == [None, 2, None, 5]
    # A proposal that exists without its chain having moved: the batch goes again step by
    # step, and only that step is refused.
    with sessions.begin() as s:
        c = s.get(Chain, a)
        assert c is not None
        s.add(_proposal(c, 2))
    got = repo.commit_steps(sessions, [_step_params(a, 2, (1,)), _step_params(b, 2, (7, 4))])
    assert got == [None, 5]
    with sessions() as s:
        steps = s.execute(select(Proposal.chain_id, Proposal.step).order_by(Proposal.id)).all()
        ca, cb = s.get(Chain, a), s.get(Chain, b)
        assert ca is not None and cb is not None
        assert (ca.current_step, ca.status, cb.current_step, cb.status) == (1, "running", 2,
                                                                           "running")  # fmt: skip
    assert sorted(steps) == [(a, 0), (a, 1), (a, 2), (b, 0), (b, 1), (b, 2)]


def test_chain_counters_are_backfilled_by_their_migration(engine: Engine) -> None:
    """0004 fills the status counters of chains that already have proposals."""
    upgrade(engine, "0003_step_errors")
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    with engine.begin() as c:
        c.execute(
            text(
                "INSERT INTO sweeps (id, name, config, config_hash, status, created_at, "
                "updated_at) VALUES (1, 's', '{}', 'h', 'active', :t, :t)"
            ),
            {"t": t0},
        )
        c.execute(
            text(
                "INSERT INTO runs (id, sweep_id, grid_index, name, method, temperature, "
                "steps, generator_model, config, created_at) VALUES "
                "(1, 1, 0, 'r', 'qalign', 1.0, 3, 'g', '{}', :t)"
            ),
            {"t": t0},
        )
        c.execute(
            text(
                "INSERT INTO prompts (id, sweep_id, prompt_index, messages, row) "
                "VALUES (1, 1, 0, '[]', '{}')"
            )
        )
        for cid, cur in ((1, 2), (2, -1)):
            c.execute(
                text(
                    "INSERT INTO chains (id, run_id, prompt_id, chain_index, seed, rng_key, "
                    "target_steps, current_step, status, attempts, created_at, updated_at) "
                    "VALUES (:id, 1, 1, :id, 1, 'k', 3, :cur, 'running', 0, :t, :t)"
                ),
                {"id": cid, "cur": cur, "t": t0},
            )
        for step, acc, reason in ((0, True, None), (1, True, None), (2, False, "nan_reward")):
            c.execute(
                text(
                    "INSERT INTO proposals (chain_id, run_id, step, cut, new_tokens, "
                    "response_len, text, alpha, accepted, finish, reject_reason, gen_seed, "
                    "gen_tokens, gen_latency_ms, reward_latency_ms, endpoint, created_at) "
                    "VALUES (1, 1, :s, 0, '[1]', 1, 'x', 1.0, :a, 'stop', :r, 1, 1, 0, 0, "
                    "'e', :t)"
                ),
                {"s": step, "a": acc, "r": reason, "t": t0 + dt.timedelta(seconds=step)},
            )
    upgrade(engine)
    with make_sessionmaker(engine)() as s:
        one, two = s.get(Chain, 1), s.get(Chain, 2)
        assert one is not None and two is not None
        assert (one.accepted_steps, one.rejected_with_reason) == (1, 1)
        assert (one.first_step_at, one.last_step_at) == (t0, t0 + dt.timedelta(seconds=2))
        assert (two.accepted_steps, two.first_step_at) == (0, None)


def test_head_constant_is_alembics_head() -> None:
    """`migrate.HEAD` (used without importing Alembic) must name the newest migration."""
    from qalign.storage import migrate

    assert migrate.head_revision() == migrate.HEAD


@pytest.mark.parametrize("idle", [False, True])
def test_step_statements_survive_a_postgres_restart_of_their_connections(
    pg_url: str, idle: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pooled connections killed server-side (as by a restart) are replaced, not raised.

    A recently used connection is not pinged: its first statement fails and runs again on a
    fresh connection. One idle for longer than PING_AFTER_IDLE_S is pinged and replaced.
    """
    from qalign.storage import engine as engine_mod
    from qalign.storage import repo

    if idle:
        monkeypatch.setattr(engine_mod, "PING_AFTER_IDLE_S", 0.0)
    upgrade(pg_url)
    eng = make_engine(pg_url, pool_size=2, max_overflow=0)
    sessions = make_sessionmaker(eng)
    with sessions.begin() as s:
        _, run, _, chain = _graph(s)
        run.config = {"generator_model": "gen", "beta": 1.0}
        chain_id = chain.id
    with make_engine(pg_url).connect() as admin:
        killed = admin.execute(
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                 "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        ).all()  # fmt: skip
    assert killed  # the pool's connections are gone on the server side
    assert repo.commit_step(sessions, _step_params(chain_id, 0, (5, 6, 7))) is not None
    assert repo.read_chain(sessions, chain_id).current_step == 0
    eng.dispose()
