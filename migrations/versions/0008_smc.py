"""Sequential Monte Carlo: proposals keep a log weight; resampling barriers and ancestry.

Revision ID: 0008_smc
Revises: 0007_latency
Create Date: 2026-12-20 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0008_smc"
down_revision: str | Sequence[str] | None = "0007_latency"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # NULL for every existing row: only SMC particles have weights.
    with op.batch_alter_table("proposals") as batch:
        batch.add_column(sa.Column("log_weight", sa.Float(), nullable=True))
    op.create_table(
        "smc_resamples",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("prompt_id", sa.Integer(), nullable=False),
        sa.Column("block", sa.Integer(), nullable=False),
        sa.Column("particles", sa.Integer(), nullable=False),
        sa.Column("ess", sa.Float(), nullable=False),
        sa.Column("resampled", sa.Boolean(), nullable=False),
        sa.Column("u", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name="fk_smc_resamples_run_id_runs", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["prompt_id"],
            ["prompts.id"],
            name="fk_smc_resamples_prompt_id_prompts",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "prompt_id", "block", name="pk_smc_resamples"),
    )
    op.create_table(
        "smc_ancestry",
        sa.Column("chain_id", sa.Integer(), nullable=False),
        sa.Column("block", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("prompt_id", sa.Integer(), nullable=False),
        sa.Column("parent_chain_id", sa.Integer(), nullable=False),
        sa.Column("log_weight", sa.Float(), nullable=True),
        sa.Column("state_tokens", sa.JSON(), nullable=False),
        sa.Column("state_reward", sa.Float(), nullable=True),
        sa.Column("state_finish", sa.String(length=10), nullable=False),
        sa.Column("state_text", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["chain_id"], ["chains.id"], name="fk_smc_ancestry_chain_id_chains", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name="fk_smc_ancestry_run_id_runs", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["prompt_id"],
            ["prompts.id"],
            name="fk_smc_ancestry_prompt_id_prompts",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["parent_chain_id"],
            ["chains.id"],
            name="fk_smc_ancestry_parent_chain_id_chains",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("chain_id", "block", name="pk_smc_ancestry"),
    )
    op.create_index(
        "ix_smc_ancestry_run_id_prompt_id_block", "smc_ancestry", ["run_id", "prompt_id", "block"]
    )


def downgrade() -> None:
    op.drop_index("ix_smc_ancestry_run_id_prompt_id_block", table_name="smc_ancestry")
    op.drop_table("smc_ancestry")
    op.drop_table("smc_resamples")
    with op.batch_alter_table("proposals") as batch:
        batch.drop_column("log_weight")
