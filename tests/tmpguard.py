"""Keep the test session out of the system temp folder.

`start()` runs before any test: it makes one session directory in the system temp folder and
points $TMPDIR (and `tempfile`) at it, so every temp file the suite or its subprocesses create
lands there (pytest's own `tmp_path` directories included). `finish()` removes that directory
and lists what else appeared in the system temp folder while the suite ran. Entries named like
ours ("qalign*") are leaks: they fail the session when $QALIGN_TMP_GUARD is "fail" (what
scripts/test.sh sets) and are reported otherwise, because on a machine shared with other
checkouts another test session can create the same names at the same time. Other new entries
are only reported.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# Prefixes the project's code, tests and benchmarks use for their temp files and directories.
OURS = ("qalign",)


@dataclass
class TmpGuard:
    system: Path
    session: Path
    before: set[str] = field(default_factory=set)
    old_tmpdir: str | None = None

    def leftovers(self) -> tuple[list[str], list[str]]:
        """(ours, others): entries new in the system temp folder, except the session dir."""
        try:
            now = set(os.listdir(self.system))
        except OSError:
            return [], []
        new = sorted(now - self.before - {self.session.name})
        ours = [n for n in new if n.lower().startswith(OURS)]
        return ours, [n for n in new if n not in ours]


def start() -> TmpGuard:
    system = Path(tempfile.gettempdir())
    before = set(os.listdir(system))
    session = Path(tempfile.mkdtemp(prefix="pytest-qalign-session-", dir=system))
    # The same mode as /tmp: tests run some programs as another user (a private PostgreSQL
    # cluster runs as `postgres` when the suite runs as root), and those must reach their own
    # directories in here.
    session.chmod(0o1777)
    guard = TmpGuard(system, session, before, os.environ.get("TMPDIR"))
    os.environ["TMPDIR"] = str(session)
    tempfile.tempdir = None  # gettempdir() caches; make it read $TMPDIR again
    return guard


def finish(guard: TmpGuard) -> tuple[list[str], list[str]]:
    """Restore $TMPDIR, delete the session directory; return the leftovers (ours, others)."""
    if guard.old_tmpdir is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = guard.old_tmpdir
    tempfile.tempdir = None
    # Keeping the session directory is opt-in: it holds every failed test's tmp_path.
    if os.environ.get("QALIGN_KEEP_TEST_TMP") != "1":
        shutil.rmtree(guard.session, ignore_errors=True)
    return guard.leftovers()
