"""Initial schema: sweeps, runs, prompts, prompt_encodings, chains, proposals.

Generated with Alembic autogenerate from qalign.storage.models, then tidied. Every constraint and
index name is the one the models' naming convention produces (op.f marks them as final), so
`alembic.autogenerate.compare_metadata` finds no difference after this revision
(tests/test_storage.py checks it on SQLite and PostgreSQL).

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-27 03:56:44.333742
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0001_initial"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("config_hash", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sweeps")),
        sa.UniqueConstraint("name", name=op.f("uq_sweeps_name")),
    )
    op.create_table(
        "prompts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sweep_id", sa.Integer(), nullable=False),
        sa.Column("prompt_index", sa.Integer(), nullable=False),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("reference", sa.Text(), nullable=True),
        sa.Column("row", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["sweep_id"], ["sweeps.id"], name=op.f("fk_prompts_sweep_id_sweeps"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prompts")),
        sa.UniqueConstraint(
            "sweep_id", "prompt_index", name=op.f("uq_prompts_sweep_id_prompt_index")
        ),
    )
    op.create_index(op.f("ix_prompts_sweep_id"), "prompts", ["sweep_id"], unique=False)
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sweep_id", sa.Integer(), nullable=False),
        sa.Column("grid_index", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=500), nullable=False),
        sa.Column("method", sa.String(length=20), nullable=False),
        sa.Column("beta", sa.Float(), nullable=True),
        sa.Column("temperature", sa.Float(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("generator_model", sa.String(length=300), nullable=False),
        sa.Column("reward_model", sa.String(length=300), nullable=True),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["sweep_id"], ["sweeps.id"], name=op.f("fk_runs_sweep_id_sweeps"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
        sa.UniqueConstraint("sweep_id", "grid_index", name=op.f("uq_runs_sweep_id_grid_index")),
    )
    op.create_index(op.f("ix_runs_sweep_id"), "runs", ["sweep_id"], unique=False)
    op.create_table(
        "chains",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("prompt_id", sa.Integer(), nullable=False),
        sa.Column("chain_index", sa.Integer(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("rng_key", sa.String(length=100), nullable=False),
        sa.Column("target_steps", sa.Integer(), nullable=False),
        sa.Column("current_step", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("state_tokens", sa.JSON(), nullable=True),
        sa.Column("state_logprobs", sa.JSON(), nullable=True),
        sa.Column("state_reward", sa.Float(), nullable=True),
        sa.Column("state_finish", sa.String(length=10), nullable=True),
        sa.Column("state_text", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["prompt_id"],
            ["prompts.id"],
            name=op.f("fk_chains_prompt_id_prompts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_chains_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_chains")),
        sa.UniqueConstraint(
            "run_id",
            "prompt_id",
            "chain_index",
            name=op.f("uq_chains_run_id_prompt_id_chain_index"),
        ),
    )
    op.create_index(op.f("ix_chains_prompt_id"), "chains", ["prompt_id"], unique=False)
    op.create_index("ix_chains_run_id_status", "chains", ["run_id", "status"], unique=False)
    op.create_index("ix_chains_status_updated_at", "chains", ["status", "updated_at"], unique=False)
    op.create_table(
        "prompt_encodings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prompt_id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=300), nullable=False),
        sa.Column("token_ids", sa.JSON(), nullable=False),
        sa.Column("n_tokens", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["prompt_id"],
            ["prompts.id"],
            name=op.f("fk_prompt_encodings_prompt_id_prompts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prompt_encodings")),
        sa.UniqueConstraint("prompt_id", "model", name=op.f("uq_prompt_encodings_prompt_id_model")),
    )
    op.create_table(
        "proposals",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("chain_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("cut", sa.Integer(), nullable=False),
        sa.Column("new_tokens", sa.JSON(), nullable=False),
        sa.Column("response_len", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("reward", sa.Float(), nullable=True),
        sa.Column("log_a", sa.Float(), nullable=True),
        sa.Column("alpha", sa.Float(), nullable=False),
        sa.Column("accepted", sa.Boolean(), nullable=False),
        sa.Column("finish", sa.String(length=10), nullable=False),
        sa.Column("reject_reason", sa.String(length=40), nullable=True),
        sa.Column("gen_seed", sa.BigInteger(), nullable=False),
        sa.Column("gen_tokens", sa.Integer(), nullable=False),
        sa.Column("reward_tokens", sa.Integer(), nullable=True),
        sa.Column("gen_latency_ms", sa.Float(), nullable=False),
        sa.Column("reward_latency_ms", sa.Float(), nullable=False),
        sa.Column("endpoint", sa.String(length=300), nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["chain_id"],
            ["chains.id"],
            name=op.f("fk_proposals_chain_id_chains"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_proposals_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_proposals")),
        sa.UniqueConstraint("chain_id", "step", name=op.f("uq_proposals_chain_id_step")),
    )
    op.create_index("ix_proposals_run_id_step", "proposals", ["run_id", "step"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_proposals_run_id_step", table_name="proposals")
    op.drop_table("proposals")
    op.drop_table("prompt_encodings")
    op.drop_index("ix_chains_status_updated_at", table_name="chains")
    op.drop_index("ix_chains_run_id_status", table_name="chains")
    op.drop_index(op.f("ix_chains_prompt_id"), table_name="chains")
    op.drop_table("chains")
    op.drop_index(op.f("ix_runs_sweep_id"), table_name="runs")
    op.drop_table("runs")
    op.drop_index(op.f("ix_prompts_sweep_id"), table_name="prompts")
    op.drop_table("prompts")
    op.drop_table("sweeps")
