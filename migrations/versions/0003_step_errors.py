"""Step errors: every failed attempt at a chain step, with its reason (shown by `sweep status`).

Revision ID: 0003_step_errors
Revises: 0002_answers
Create Date: 2026-11-28 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0003_step_errors"
down_revision: str | Sequence[str] | None = "0002_answers"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "step_errors",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("chain_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=80), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["chain_id"],
            ["chains.id"],
            name=op.f("fk_step_errors_chain_id_chains"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_step_errors_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_step_errors")),
    )
    op.create_index(op.f("ix_step_errors_chain_id"), "step_errors", ["chain_id"], unique=False)
    op.create_index(
        op.f("ix_step_errors_run_id_kind"), "step_errors", ["run_id", "kind"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_step_errors_run_id_kind"), table_name="step_errors")
    op.drop_index(op.f("ix_step_errors_chain_id"), table_name="step_errors")
    op.drop_table("step_errors")
