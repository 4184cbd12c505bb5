"""SQLite schema changes are atomic and safe to race (issue item 10).

Every scenario runs the real command line in a subprocess: two first runs on one new file at
once, a process killed in the middle of its migrations, the half-migrated file an older qalign
could leave, and a corrupt, non-database, read-only or full file, each of which must give one
line naming the file (no traceback) and a non-zero exit.

Hooks the subprocesses need (wait for a go signal, hang after a given DDL statement, cap the
database size) are installed by `_DRIVER` through SQLAlchemy's class-level events before the
command line starts, so qalign's own code runs unchanged.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, select

from qalign.config import parse_config
from qalign.scheduler.sweeps import create_sweep
from qalign.steps.service import DatabaseFailure, StepService
from qalign.storage.engine import _switch_to_wal, make_engine, make_sessionmaker
from qalign.storage.migrate import HEAD, check_schema, upgrade
from qalign.storage.models import Base, Chain
from tests.sweeps_support import sweep_config, write_config

# Below pytest's 600 s timeout, with room for the rest of a test.
SUBPROCESS_TIMEOUT_S = 180.0

_DRIVER = r"""
import os, sys, time
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool

ready, go = os.environ.get("QALIGN_TEST_READY"), os.environ.get("QALIGN_TEST_GO")
hang_after, marker = os.environ.get("QALIGN_TEST_HANG_AFTER"), os.environ.get("QALIGN_TEST_MARKER")
max_pages = os.environ.get("QALIGN_TEST_MAX_PAGES")

if hang_after:
    def _hang(conn, cursor, statement, params, context, executemany):
        if " ".join(statement.split()).startswith(hang_after):
            Path(marker).write_text(str(os.getpid()))
            while True:  # the test kills this process (SIGKILL) once it sees the marker
                time.sleep(1)
    event.listen(Engine, "after_cursor_execute", _hang)

if max_pages:
    def _cap(dbapi_connection, record):
        dbapi_connection.execute("PRAGMA max_page_count=" + str(int(max_pages)))
    event.listen(Pool, "connect", _cap)

if ready:
    Path(ready).write_text(str(os.getpid()))
    while not Path(go).exists():  # start both processes' commands together
        time.sleep(0.005)

from qalign.cli import main
sys.argv[0] = "qalign"
main()
"""

FIRST_TABLES = {"sweeps", "prompts", "runs", "chains", "prompt_encodings", "proposals"}


def _cli(tmp_path: Path, *args: str, **hooks: str) -> subprocess.Popen[str]:
    env = {**os.environ, **{f"QALIGN_TEST_{k.upper()}": v for k, v in hooks.items()}}
    env.pop("QALIGN_DATABASE_URL", None)
    return subprocess.Popen(
        [sys.executable, "-c", _DRIVER, *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"qalign did not finish within {SUBPROCESS_TIMEOUT_S} s:\n{out}\n{err}")
    return proc.returncode, out, err


def _config(tmp_path: Path, name: str, toy: tuple[str, str]) -> Path:
    return write_config(tmp_path, sweep_config(name, *toy, prompts=1, beta=1.0, steps=1, chains=1))


def _run(tmp_path: Path, cfg: Path, url: str) -> tuple[int, str, str]:
    return _finish(_cli(tmp_path, "run", str(cfg), "--database", url, "--quiet", "--no-check"))


def _assert_ok(result: tuple[int, str, str]) -> None:
    code, out, err = result
    assert code == 0, f"exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in err, err


def _one_line_error(result: tuple[int, str, str]) -> str:
    code, out, err = result
    assert code != 0, f"expected a failure\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in err + out, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("Error: "), lines[0]
    return lines[0]


def _assert_complete(url: str) -> None:
    engine = create_engine(url)
    try:
        assert check_schema(engine) == HEAD
        names = set(inspect(engine).get_table_names())
        assert set(Base.metadata.tables) <= names, names
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
    finally:
        engine.dispose()


def _wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    """Wait until `path` exists; fail (not hang) if `proc` exits first."""
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"exited {proc.returncode} before {path.name}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path.name} never appeared")
        time.sleep(0.01)


# ---- (a) two first runs on one new file ----------------------------------------------------------


def test_two_first_runs_on_one_new_file_both_succeed(tmp_path: Path, toy: tuple[str, str]) -> None:
    cfgs = [_config(tmp_path, name, toy) for name in ("first", "second")]
    for round_ in range(10):
        work = tmp_path / f"round{round_}"
        work.mkdir()
        url = f"sqlite:///{work / 'new.sqlite'}"
        go = work / "go"
        procs = []
        for i, cfg in enumerate(cfgs):
            args = ("run", str(cfg), "--database", url, "--quiet", "--no-check")
            procs.append(_cli(work, *args, ready=str(work / f"ready{i}"), go=str(go)))
        for i, proc in enumerate(procs):
            _wait_for(work / f"ready{i}", proc)
        go.touch()
        for proc in procs:
            _assert_ok(_finish(proc))
        _assert_complete(url)


def test_opening_a_new_file_waits_out_another_connections_write_lock(tmp_path: Path) -> None:
    """Switching a new file to WAL while another connection holds the write lock is refused at
    once by SQLite (busy_timeout does not apply); opening through the engine retries until the
    lock is gone instead of failing the command (what made two first runs race)."""
    path = tmp_path / "new.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    plain = sqlite3.connect(path, timeout=30)
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        plain.execute("PRAGMA journal_mode=WAL")
    plain.close()

    engine = make_engine(f"sqlite:///{path}")
    opened: list[str] = []
    failed: list[BaseException] = []

    def open_it() -> None:
        try:
            with engine.connect() as conn:
                opened.append(conn.exec_driver_sql("PRAGMA journal_mode").scalar_one())
        except BaseException as exc:  # reported by the assertion below
            failed.append(exc)

    thread = threading.Thread(target=open_it)
    thread.start()
    # Release the lock only once the engine has been refused at least once and is retrying.
    while _switch_to_wal.statistics.get("attempt_number", 0) < 2 and thread.is_alive():
        time.sleep(0.005)
    holder.execute("COMMIT")
    holder.close()
    thread.join(timeout=SUBPROCESS_TIMEOUT_S)
    engine.dispose()
    assert not failed, failed
    assert opened == ["wal"]


# ---- (b) a kill in the middle of the migrations --------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE TABLE runs",  # inside the first revision
        "ALTER TABLE chains ADD COLUMN accepted_steps",  # inside the last one
    ],
)
def test_kill_during_migration_leaves_a_file_the_next_run_accepts(
    tmp_path: Path, toy: tuple[str, str], statement: str
) -> None:
    cfg = _config(tmp_path, "killed", toy)
    db = tmp_path / "killed.sqlite"
    url = f"sqlite:///{db}"
    marker = tmp_path / "after-ddl"
    proc = _cli(
        tmp_path,
        *("run", str(cfg), "--database", url, "--quiet", "--no-check"),
        hang_after=statement,
        marker=str(marker),
    )
    _wait_for(marker, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL
    _assert_ok(_run(tmp_path, cfg, url))
    _assert_complete(url)


# ---- (c) the half-state older releases could leave -----------------------------------------------


def _half_state(db: Path, keep: set[str], row: bool = False) -> None:
    """What an older qalign killed during its first migration left: some of the first revision's
    tables (its DDL was autocommitted) and an empty alembic_version (its row was not)."""
    url = f"sqlite:///{db}"
    upgrade(url, "0001_initial")
    conn = sqlite3.connect(db)
    try:
        conn.execute("DELETE FROM alembic_version")
        for table in ("proposals", "prompt_encodings", "chains", "runs", "prompts", "sweeps"):
            if table not in keep:
                conn.execute(f"DROP TABLE {table}")
        if row:
            conn.execute(
                "INSERT INTO sweeps (name, config, config_hash, status, created_at, updated_at) "
                "VALUES ('kept', '{}', 'x', 'created', '2026-01-01', '2026-01-01')"
            )
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize(
    "keep", [FIRST_TABLES, {"sweeps", "prompts", "runs"}], ids=["all-tables", "some-tables"]
)
def test_empty_half_state_is_rebuilt_and_one_with_data_refused(
    tmp_path: Path, toy: tuple[str, str], keep: set[str]
) -> None:
    cfg = _config(tmp_path, "repaired", toy)
    db = tmp_path / "half.sqlite"
    _half_state(db, keep)
    # A read-only command leaves the file alone and says what rebuilds it.
    listed = _finish(_cli(tmp_path, "sweep", "list", "--database", f"sqlite:///{db}"))
    assert "qalign db upgrade" in _one_line_error(listed)
    _assert_ok(_run(tmp_path, cfg, f"sqlite:///{db}"))
    _assert_complete(f"sqlite:///{db}")

    # Rows mean someone's data: never dropped, the file is refused as before.
    kept = tmp_path / "half-with-data.sqlite"
    _half_state(kept, keep, row=True)
    line = _one_line_error(_run(tmp_path, cfg, f"sqlite:///{kept}"))
    assert "no Alembic revision" in line, line
    conn = sqlite3.connect(kept)
    try:
        assert conn.execute("SELECT name FROM sweeps").fetchall() == [("kept",)]
    finally:
        conn.close()


# ---- (d) files SQLite cannot use -----------------------------------------------------------------


def _at_head(db: Path) -> None:
    upgrade(f"sqlite:///{db}")
    # The last connection to close checkpoints the WAL into the file and removes it, so the
    # bytes written below are what the next process reads.
    assert not Path(f"{db}-wal").exists()


def _garbage(db: Path, offset: int) -> None:
    size = db.stat().st_size
    assert size > offset
    with db.open("r+b") as f:
        f.seek(offset)
        f.write(bytes((i * 131 + 17) % 251 for i in range(size - offset)))


@pytest.mark.parametrize(
    ("offset", "phrase"),
    [(4096, "is corrupt"), (0, "is not a SQLite database")],
    ids=["garbage-pages", "garbage-header"],
)
def test_damaged_file_gives_one_line(
    tmp_path: Path, toy: tuple[str, str], offset: int, phrase: str
) -> None:
    db = tmp_path / "damaged.sqlite"
    _at_head(db)
    _garbage(db, offset)
    cfg = _config(tmp_path, "damaged", toy)
    line = _one_line_error(_run(tmp_path, cfg, f"sqlite:///{db}"))
    assert str(db) in line and phrase in line, line


def test_read_only_file_gives_one_line(tmp_path: Path, toy: tuple[str, str]) -> None:
    db = tmp_path / "ro.sqlite"
    _at_head(db)
    if os.geteuid() == 0:
        # root writes through any file mode; SQLite's own read-only open refuses writes alike.
        url = f"sqlite:///file:{db}?mode=ro&uri=true"
    else:
        db.chmod(0o444)
        url = f"sqlite:///{db}"
    cfg = _config(tmp_path, "readonly", toy)
    line = _one_line_error(_run(tmp_path, cfg, url))
    assert str(db) in line and "read-only" in line, line


def test_full_disk_gives_one_line_and_leaves_the_file_usable(
    tmp_path: Path, toy: tuple[str, str]
) -> None:
    db = tmp_path / "full.sqlite"
    url = f"sqlite:///{db}"
    cfg = _config(tmp_path, "full", toy)
    # SQLite reports a database at its max_page_count exactly as a full disk (SQLITE_FULL).
    proc = _cli(
        tmp_path, "run", str(cfg), "--database", url, "--quiet", "--no-check", max_pages="4"
    )
    line = _one_line_error(_finish(proc))
    assert str(db) in line and "disk is full" in line, line
    # The failed migration rolled back whole: with room again, the same command just works.
    _assert_ok(_run(tmp_path, cfg, url))
    _assert_complete(url)


def test_step_service_stops_the_run_on_a_read_only_file(
    tmp_path: Path, toy: tuple[str, str]
) -> None:
    """The commit goes through a raw pooled connection (`hotpath`), past the engine's error hook:
    the service still names the file and stops the run instead of failing chain after chain."""
    db = tmp_path / "steps.sqlite"
    engine = make_engine(f"sqlite:///{db}")
    try:
        upgrade(engine)
        sessions = make_sessionmaker(engine)
        raw = sweep_config("ro-steps", *toy, prompts=1, beta=1.0, steps=1, chains=1)
        create_sweep(sessions, parse_config(raw))
        with sessions() as s:
            chain_id = s.scalars(select(Chain.id)).one()
    finally:
        engine.dispose()
    ro = make_engine(f"sqlite:///file:{db}?mode=ro&uri=true")
    try:
        sessions = make_sessionmaker(ro)

        async def go() -> None:
            service = StepService(sessions)
            try:
                await service.take(chain_id, 0)  # the initial sample: read, generate, commit
            finally:
                await service.close()

        with pytest.raises(DatabaseFailure) as caught:
            asyncio.run(go())
        assert str(db) in str(caught.value) and "is read-only" in str(caught.value)
    finally:
        ro.dispose()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT count(*) FROM step_errors").fetchone() == (0,)
        assert conn.execute("SELECT status, attempts FROM chains").fetchall() == [("pending", 0)]
    finally:
        conn.close()
