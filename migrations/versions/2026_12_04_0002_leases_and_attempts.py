"""leases on jobs, the attempts table, the attempt that wrote each epoch

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from service.models import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lease_owner", sa.String(200), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("heartbeat_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("enqueued_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("epochs_redone", sa.Integer(), nullable=False, server_default="0"))
    op.create_index("ix_jobs_status_lease", "jobs", ["status", "lease_expires_at"])
    with op.batch_alter_table("epochs") as batch:
        batch.add_column(sa.Column("attempt", sa.Integer(), nullable=True))
    op.create_table(
        "attempts",
        sa.Column("job_id", sa.String(36), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(200), nullable=False),
        sa.Column("claimed_at", UTCDateTime(), nullable=False),
        sa.Column("ended_at", UTCDateTime(), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("resumed_from_epoch", sa.Integer(), nullable=True),
        sa.Column("epochs_redone", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_attempts_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "attempt", name=op.f("pk_attempts")),
    )


def downgrade() -> None:
    op.drop_table("attempts")
    with op.batch_alter_table("epochs") as batch:
        batch.drop_column("attempt")
    op.drop_index("ix_jobs_status_lease", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        for column in ("epochs_redone", "enqueued_at", "heartbeat_at", "lease_expires_at", "lease_owner"):
            batch.drop_column(column)
