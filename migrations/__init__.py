"""qalign's Alembic migration scripts (see qalign.storage.migrate; no alembic.ini needed)."""
