"""Offers without their own customer index; recent outcomes found by time.

Every decision writes two or three offers, and ``ix_offers_customer_id_product_id_created_at``
was the one index on them whose entries land on random pages (the others grow at their
right edge: time-ordered ids, BRIN on time). Measured with ``bench/audit_insert.py`` on a
bank of 4M offers: about a quarter of PostgreSQL's CPU per recorded decision. Nothing
needs it: a customer's offers are found through ``ix_decisions_customer_id_created_at``
and ``ix_offers_decision_id``, and the reports join offers to adoptions from a date
range of decisions.

Outcomes gain a time index (BRIN on PostgreSQL: they arrive in time order): the rolling
conversion gauges each worker refreshes read the outcomes of the last week, and start-up
reads the declines of the cooldown, where both scanned every outcome ever recorded.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 18:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INDEX = "ix_offers_customer_id_product_id_created_at"


def upgrade() -> None:
    op.drop_index(_INDEX, table_name="offers")
    op.create_index(
        "ix_offer_outcomes_created_at", "offer_outcomes", ["created_at"], postgresql_using="brin"
    )


def downgrade() -> None:
    op.drop_index("ix_offer_outcomes_created_at", table_name="offer_outcomes")
    op.create_index(_INDEX, "offers", ["customer_id", "product_id", "created_at"])
