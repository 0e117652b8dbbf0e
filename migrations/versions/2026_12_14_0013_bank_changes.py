"""Deletions and closings in the bank counted by triggers, and an index of when each
customer was last updated.

A worker mapping a serving store checks that the bank has not lost rows since the
store was read. It counted the customers and adoptions tables for that, and scanned
customers twice more for ``updated_at``: about 1.2 s of a core at a million customers
(ten times that at ten million), at every worker start and activation, while the
machine served. Now triggers keep two numbers in ``bank_changes`` (statements that
deleted or moved rows; statements that changed a closing day) and the check reads
them; ``ix_customers_updated_at`` answers the rest. See
:class:`service.data.tables.BankChanges`.

PostgreSQL: statement triggers, so a bulk statement costs one update of the row; a delete
or an update that changes no row changes no number (transition tables tell). An update
of adoptions counts as a closing without comparing each row's days (nbo's own updates
change nothing else), and one that sets an adoption's customer, product or day as a
deletion. SQLite: row triggers, by the same rules.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-14 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BUMP_DELETED = "UPDATE bank_changes SET deleted = deleted + 1 WHERE id = 1"
_BUMP_CLOSED = "UPDATE bank_changes SET closed = closed + 1 WHERE id = 1"


def _bump_if_rows(function: str, rows: str, bump: str) -> str:
    """A trigger function that runs ``bump`` when the transition table ``rows`` of its
    statement holds any row."""
    return f"""CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM {rows}) THEN
        {bump};
    END IF;
    RETURN NULL;
END $$"""


POSTGRESQL = [
    _bump_if_rows("nbo_bank_deleted", "gone", _BUMP_DELETED),
    # Every statement: TRUNCATE has no transition table, and a statement that sets an
    # adoption's customer, product or day is never nbo's own.
    f"""CREATE FUNCTION nbo_bank_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    {_BUMP_DELETED};
    RETURN NULL;
END $$""",
    _bump_if_rows("nbo_adoptions_closed", "now_is", _BUMP_CLOSED),
    "CREATE TRIGGER customers_deleted AFTER DELETE ON customers REFERENCING OLD TABLE AS gone "
    "FOR EACH STATEMENT EXECUTE FUNCTION nbo_bank_deleted()",
    "CREATE TRIGGER adoptions_deleted AFTER DELETE ON adoptions REFERENCING OLD TABLE AS gone "
    "FOR EACH STATEMENT EXECUTE FUNCTION nbo_bank_deleted()",
    "CREATE TRIGGER customers_truncated AFTER TRUNCATE ON customers "
    "FOR EACH STATEMENT EXECUTE FUNCTION nbo_bank_truncated()",
    "CREATE TRIGGER adoptions_truncated AFTER TRUNCATE ON adoptions "
    "FOR EACH STATEMENT EXECUTE FUNCTION nbo_bank_truncated()",
    # nbo itself only ever updates closing days (the imports, on rows whose day differs):
    # a statement that set any other column of an adoption is someone else's, and counts
    # as a deletion whatever it changed.
    "CREATE TRIGGER adoptions_moved AFTER UPDATE OF customer_id, product_id, adopted_at "
    "ON adoptions FOR EACH STATEMENT EXECUTE FUNCTION nbo_bank_truncated()",
    # Any statement that updated rows counts as a closing: comparing each row's old and
    # new day joined the two transition tables, 4.4 s more for 1M rows (and hours when
    # the planner chose a nested loop over them).
    "CREATE TRIGGER adoptions_closed AFTER UPDATE ON adoptions REFERENCING NEW TABLE AS now_is "
    "FOR EACH STATEMENT EXECUTE FUNCTION nbo_adoptions_closed()",
]
POSTGRESQL_DOWN = [
    "DROP TRIGGER adoptions_closed ON adoptions",
    "DROP TRIGGER adoptions_moved ON adoptions",
    "DROP TRIGGER adoptions_truncated ON adoptions",
    "DROP TRIGGER customers_truncated ON customers",
    "DROP TRIGGER adoptions_deleted ON adoptions",
    "DROP TRIGGER customers_deleted ON customers",
    "DROP FUNCTION nbo_adoptions_closed()",
    "DROP FUNCTION nbo_bank_truncated()",
    "DROP FUNCTION nbo_bank_deleted()",
]

SQLITE = [
    f"CREATE TRIGGER customers_deleted AFTER DELETE ON customers BEGIN {_BUMP_DELETED}; END",
    f"CREATE TRIGGER adoptions_deleted AFTER DELETE ON adoptions BEGIN {_BUMP_DELETED}; END",
    "CREATE TRIGGER adoptions_moved AFTER UPDATE OF customer_id, product_id, adopted_at "
    f"ON adoptions BEGIN {_BUMP_DELETED}; END",
    f"CREATE TRIGGER adoptions_closed AFTER UPDATE ON adoptions BEGIN {_BUMP_CLOSED}; END",
]
SQLITE_DOWN = [
    "DROP TRIGGER adoptions_closed",
    "DROP TRIGGER adoptions_moved",
    "DROP TRIGGER adoptions_deleted",
    "DROP TRIGGER customers_deleted",
]


def upgrade() -> None:
    op.create_table(
        "bank_changes",
        sa.Column("id", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("deleted", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("closed", sa.BigInteger(), server_default="0", nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_bank_changes_one_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bank_changes")),
    )
    op.execute("INSERT INTO bank_changes (id, deleted, closed) VALUES (1, 0, 0)")
    op.create_index("ix_customers_updated_at", "customers", ["updated_at"])
    postgresql = op.get_bind().dialect.name == "postgresql"
    for statement in POSTGRESQL if postgresql else SQLITE:
        op.execute(statement)


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    for statement in POSTGRESQL_DOWN if postgresql else SQLITE_DOWN:
        op.execute(statement)
    op.drop_index("ix_customers_updated_at", table_name="customers")
    op.drop_table("bank_changes")
