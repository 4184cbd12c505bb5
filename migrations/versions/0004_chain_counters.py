"""Chain counters: accepted steps, reasoned rejections and first/last step times per chain.

`sweep status` reads these instead of aggregating every proposal, so it stays fast on sweeps
with millions of proposals. The step commit keeps them current; existing rows are backfilled.

Revision ID: 0004_chain_counters
Revises: 0003_step_errors
Create Date: 2026-11-27 07:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0004_chain_counters"
down_revision: str | Sequence[str] | None = "0003_step_errors"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("chains") as batch:
        batch.add_column(
            sa.Column("accepted_steps", sa.Integer(), server_default="0", nullable=False)
        )
        batch.add_column(
            sa.Column("rejected_with_reason", sa.Integer(), server_default="0", nullable=False)
        )
        batch.add_column(sa.Column("first_step_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("last_step_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        """
        UPDATE chains SET
          accepted_steps = (SELECT count(*) FROM proposals p
                            WHERE p.chain_id = chains.id AND p.step > 0 AND p.accepted),
          rejected_with_reason = (SELECT count(*) FROM proposals p
                                  WHERE p.chain_id = chains.id AND p.reject_reason IS NOT NULL),
          first_step_at = (SELECT min(p.created_at) FROM proposals p WHERE p.chain_id = chains.id),
          last_step_at = (SELECT max(p.created_at) FROM proposals p WHERE p.chain_id = chains.id)
        WHERE current_step >= 0
        """
    )


def downgrade() -> None:
    with op.batch_alter_table("chains") as batch:
        batch.drop_column("last_step_at")
        batch.drop_column("first_step_at")
        batch.drop_column("rejected_with_reason")
        batch.drop_column("accepted_steps")
