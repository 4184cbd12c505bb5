"""Alembic revisions of the qalign schema, oldest first."""
