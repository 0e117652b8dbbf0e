"""Audit tables without foreign keys, with BRIN time indexes on PostgreSQL.

Decisions and offers are written on the hot path, many a second, by one code path that
writes a decision and its offers in one statement. On PostgreSQL each foreign key is a
row lock per row written (on a customer, a product, the decision just inserted), which
took about a quarter of the database's work per decision; customers and products are
never deleted, so the ids stay meaningful without them. Rows arrive in time order, so
BRIN indexes answer date ranges (reports, the contact history read at start-up) for
next to no upkeep; SQLite has no BRIN and keeps a B-tree.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 18:40:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEYS = (
    ("offers", "fk_offers_decision_id_decisions", "decisions", "decision_id", "CASCADE"),
    ("offers", "fk_offers_customer_id_customers", "customers", "customer_id", "SET NULL"),
    ("offers", "fk_offers_product_id_products", "products", "product_id", None),
    ("decisions", "fk_decisions_customer_id_customers", "customers", "customer_id", "SET NULL"),
)


def upgrade() -> None:
    for table in ("offers", "decisions"):
        with op.batch_alter_table(table) as batch:
            for _, name, *_ in (k for k in _KEYS if k[0] == table):
                batch.drop_constraint(name, type_="foreignkey")
    op.drop_index("ix_decisions_created_at", table_name="decisions")
    op.create_index("ix_decisions_created_at", "decisions", ["created_at"], postgresql_using="brin")
    op.create_index("ix_offers_created_at", "offers", ["created_at"], postgresql_using="brin")


def downgrade() -> None:
    op.drop_index("ix_offers_created_at", table_name="offers")
    op.drop_index("ix_decisions_created_at", table_name="decisions")
    op.create_index("ix_decisions_created_at", "decisions", ["created_at"])
    for table in ("offers", "decisions"):
        with op.batch_alter_table(table) as batch:
            for _, name, target, column, ondelete in (k for k in _KEYS if k[0] == table):
                batch.create_foreign_key(name, target, [column], ["id"], ondelete=ondelete)
