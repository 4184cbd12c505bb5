"""Wall-clock cost: each proposal keeps its generator, reward and queue seconds (NULL before).

Revision ID: 0007_latency
Revises: 0006_reward_terms
Create Date: 2026-12-09 18:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0007_latency"
down_revision: str | Sequence[str] | None = "0006_reward_terms"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("generator_seconds", "reward_seconds", "queue_seconds")


def upgrade() -> None:
    # Nullable, no default: rows committed before this revision have no measurement, and NULL
    # says so (a 0 would read as "free").
    with op.batch_alter_table("proposals") as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("proposals") as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)
