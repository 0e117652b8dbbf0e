"""Heartbeat change events: a serving worker that announces its offers only when another
process serves the database (announce_offers 'auto') says it is there with a
'heartbeat' event every 15 s.

Downgrade deletes the heartbeats and restores the narrower check.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-12 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KINDS = "'adoption', 'customer', 'offer', 'outcome', 'catalogue', 'model'"


def _check(kinds: str) -> None:
    with op.batch_alter_table("change_events") as batch:
        batch.drop_constraint(op.f("ck_change_events_kind"), type_="check")
        batch.create_check_constraint(op.f("ck_change_events_kind"), sa.text(f"kind IN ({kinds})"))


def upgrade() -> None:
    _check(f"{KINDS}, 'heartbeat'")


def downgrade() -> None:
    op.execute("DELETE FROM change_events WHERE kind = 'heartbeat'")
    _check(KINDS)
