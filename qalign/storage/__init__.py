"""The database layer: models, engines, migrations.

SQLite (the embedded default, `qalign.sqlite` in the current directory) or PostgreSQL
(`postgresql://...`, psycopg 3); choose with `--database URL` or `$QALIGN_DATABASE_URL`.
The schema is managed by Alembic (`qalign db upgrade`); see `qalign.storage.migrate`.
"""

from qalign.storage.engine import (
    ENV_DATABASE_URL,
    database_url,
    make_engine,
    make_sessionmaker,
    normalize_url,
    open_connection,
    ping,
    redact_url,
)
from qalign.storage.errors import (
    DatabaseConnectionError,
    DatabaseUnreachableError,
    InvalidDatabaseURLError,
    MigrationError,
    MigrationsNotFoundError,
    SchemaNotAtHeadError,
    SQLiteDirectoryMissingError,
    SQLiteFileError,
    StorageError,
)
from qalign.storage.migrate import (
    check_schema,
    current_revision,
    downgrade,
    ensure_schema,
    head_revision,
    make_config,
    migrations_dir,
    upgrade,
)
from qalign.storage.models import (
    Base,
    Chain,
    ChainStatus,
    Prompt,
    PromptEncoding,
    Proposal,
    Run,
    Sweep,
    SweepStatus,
)
from qalign.storage.types import UTCDateTime

__all__ = [
    "ENV_DATABASE_URL",
    "Base",
    "Chain",
    "ChainStatus",
    "DatabaseConnectionError",
    "DatabaseUnreachableError",
    "InvalidDatabaseURLError",
    "MigrationError",
    "MigrationsNotFoundError",
    "Prompt",
    "PromptEncoding",
    "Proposal",
    "Run",
    "SQLiteDirectoryMissingError",
    "SQLiteFileError",
    "SchemaNotAtHeadError",
    "StorageError",
    "Sweep",
    "SweepStatus",
    "UTCDateTime",
    "check_schema",
    "current_revision",
    "database_url",
    "downgrade",
    "ensure_schema",
    "head_revision",
    "make_config",
    "make_engine",
    "make_sessionmaker",
    "migrations_dir",
    "normalize_url",
    "open_connection",
    "ping",
    "redact_url",
    "upgrade",
]
