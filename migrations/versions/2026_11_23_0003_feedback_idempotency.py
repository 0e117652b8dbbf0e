"""Feedback retries are counted once: an optional, unique Idempotency-Key per answer.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 15:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("feedback") as batch:
        batch.add_column(sa.Column("idempotency_key", sa.String(length=128), nullable=True))
        batch.create_unique_constraint(op.f("uq_feedback_idempotency_key"), ["idempotency_key"])


def downgrade() -> None:
    with op.batch_alter_table("feedback") as batch:
        batch.drop_constraint(op.f("uq_feedback_idempotency_key"), type_="unique")
        batch.drop_column("idempotency_key")
