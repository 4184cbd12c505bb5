"""Extending and warm-starting sweeps: the history of `qalign sweep extend` per run, and where a
warm-started chain's initial state came from.

Existing chains get NULL sources (they started from a generated sample).

Revision ID: 0005_extend_warm_start
Revises: 0004_chain_counters
Create Date: 2026-11-29 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0005_extend_warm_start"
down_revision: str | Sequence[str] | None = "0004_chain_counters"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sweep_extensions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sweep_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("old_steps", sa.Integer(), nullable=False),
        sa.Column("new_steps", sa.Integer(), nullable=False),
        sa.Column("steps_done", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["sweep_id"],
            ["sweeps.id"],
            name=op.f("fk_sweep_extensions_sweep_id_sweeps"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
            name=op.f("fk_sweep_extensions_run_id_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sweep_extensions")),
    )
    op.create_index(
        op.f("ix_sweep_extensions_sweep_id"), "sweep_extensions", ["sweep_id"], unique=False
    )
    op.create_index(
        op.f("ix_sweep_extensions_run_id"), "sweep_extensions", ["run_id"], unique=False
    )
    with op.batch_alter_table("chains") as batch:
        batch.add_column(sa.Column("source_chain_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("source_step", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_chains_source_chain_id_chains"),
            "chains",
            ["source_chain_id"],
            ["id"],
            ondelete="SET NULL",
        )
        batch.create_index(op.f("ix_chains_source_chain_id"), ["source_chain_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("chains") as batch:
        batch.drop_index(op.f("ix_chains_source_chain_id"))
        batch.drop_constraint(op.f("fk_chains_source_chain_id_chains"), type_="foreignkey")
        batch.drop_column("source_step")
        batch.drop_column("source_chain_id")
    op.drop_index(op.f("ix_sweep_extensions_run_id"), table_name="sweep_extensions")
    op.drop_index(op.f("ix_sweep_extensions_sweep_id"), table_name="sweep_extensions")
    op.drop_table("sweep_extensions")
