"""A partial index of the change events that change a customer (adoptions, customer
changes, outcomes): a worker loading a serving store looks for the customers changed
since it was built among them, and with several workers nearly every event is an
offer's (kept a day), so that read went through all of them: 0.45 s at 3.8M events.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-13 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As service.data.tables.CUSTOMER_EVENTS gives it today (a migration keeps its own copy).
CUSTOMER_EVENTS = "kind IN ('adoption', 'customer', 'outcome')"


def upgrade() -> None:
    op.create_index(
        "ix_change_events_customer_id",
        "change_events",
        ["id"],
        sqlite_where=sa.text(CUSTOMER_EVENTS),
        postgresql_where=sa.text(CUSTOMER_EVENTS),
    )


def downgrade() -> None:
    op.drop_index("ix_change_events_customer_id", table_name="change_events")
