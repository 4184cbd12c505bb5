"""Composite rewards: each proposal keeps its reward's terms by name (NULL for one reward).

Revision ID: 0006_reward_terms
Revises: 0005_extend_warm_start
Create Date: 2026-12-02 18:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0006_reward_terms"
down_revision: str | Sequence[str] | None = "0005_extend_warm_start"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("proposals") as batch:
        batch.add_column(sa.Column("reward_terms", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("proposals") as batch:
        batch.drop_column("reward_terms")
