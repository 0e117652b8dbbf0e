"""One final outcome per offer; idempotency keys scoped by API key; keyed decisions.

- An offer takes at most one final outcome (accepted, declined or not_now): a partial
  unique index, so two concurrent answers cannot both be recorded. Offers that already
  hold several keep their first (lowest id) and lose the later ones, which contradicted
  it; the downgrade cannot bring those back.
- ``Idempotency-Key`` values belong to the API key that sent them: outcomes and feedback
  record the key's prefix and are unique on (prefix, idempotency key) instead of on the
  idempotency key alone, which let one caller's key collide with another's. Rows
  recorded before this revision keep a null prefix: no caller can match them any more,
  which is the point (who sent them is unknown).
- Decisions record the API key and ``Idempotency-Key`` of a keyed request, so a retry
  reaching another worker finds the decision already made (a partial index: decisions
  without a key cost it nothing).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FINAL = "outcome IN ('accepted', 'declined', 'not_now')"
_KEYED = "idempotency_key IS NOT NULL"


def upgrade() -> None:
    op.execute(
        f"DELETE FROM offer_outcomes WHERE {_FINAL} AND EXISTS (SELECT 1 FROM offer_outcomes "
        "AS earlier WHERE earlier.offer_id = offer_outcomes.offer_id "
        f"AND earlier.id < offer_outcomes.id AND earlier.{_FINAL})"
    )
    for table in ("offer_outcomes", "feedback"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("api_key_prefix", sa.String(length=16), nullable=True))
            batch.drop_constraint(op.f(f"uq_{table}_idempotency_key"), type_="unique")
            batch.create_unique_constraint(
                op.f(f"uq_{table}_api_key_prefix_idempotency_key"),
                ["api_key_prefix", "idempotency_key"],
            )
    op.create_index(
        "uq_offer_outcomes_one_final",
        "offer_outcomes",
        ["offer_id"],
        unique=True,
        sqlite_where=sa.text(_FINAL),
        postgresql_where=sa.text(_FINAL),
    )
    op.add_column("decisions", sa.Column("api_key_prefix", sa.String(length=16), nullable=True))
    op.add_column("decisions", sa.Column("idempotency_key", sa.String(length=128), nullable=True))
    op.create_index(
        "ix_decisions_api_key_prefix_idempotency_key",
        "decisions",
        ["api_key_prefix", "idempotency_key"],
        sqlite_where=sa.text(_KEYED),
        postgresql_where=sa.text(_KEYED),
    )


def downgrade() -> None:
    op.drop_index("ix_decisions_api_key_prefix_idempotency_key", table_name="decisions")
    with op.batch_alter_table("decisions") as batch:
        batch.drop_column("idempotency_key")
        batch.drop_column("api_key_prefix")
    op.drop_index("uq_offer_outcomes_one_final", table_name="offer_outcomes")
    for table in ("feedback", "offer_outcomes"):
        # Globally unique again: of keys that only differed by API key, the first stays.
        op.execute(
            f"UPDATE {table} SET idempotency_key = NULL WHERE idempotency_key IS NOT NULL "
            f"AND EXISTS (SELECT 1 FROM {table} AS earlier WHERE earlier.idempotency_key = "
            f"{table}.idempotency_key AND earlier.id < {table}.id)"
        )
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(
                op.f(f"uq_{table}_api_key_prefix_idempotency_key"), type_="unique"
            )
            batch.create_unique_constraint(op.f(f"uq_{table}_idempotency_key"), ["idempotency_key"])
            batch.drop_column("api_key_prefix")
