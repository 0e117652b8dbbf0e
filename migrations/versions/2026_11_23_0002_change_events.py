"""Change log polled by serving workers (adoptions, outcomes, offers, catalogue, model).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 13:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "change_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("customer_external_id", sa.String(length=128), nullable=True),
        sa.Column("product_code", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.String(length=64), nullable=True),
        sa.Column("origin", sa.String(length=64), nullable=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "kind IN ('adoption', 'customer', 'offer', 'outcome', 'catalogue', 'model')",
            name=op.f("ck_change_events_kind"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_change_events")),
    )


def downgrade() -> None:
    op.drop_table("change_events")
