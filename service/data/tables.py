"""The database schema: one class per table, SQLAlchemy 2 declarative style.

Customers are identified outside nbo by ``customers.external_id`` (the bank's
id); inside, rows reference the integer primary key. Arbitrary bank-supplied
customer attributes live in ``customers.attributes`` (JSON), and
``attribute_definitions`` records each attribute's kind so models can treat
numeric and categorical columns correctly whatever columns the bank has.

The decision hot path reads a customer's attributes and adoptions with one
query over two indexed lookups: ``customers.external_id`` (unique) and
``adoptions(customer_id, product_id, adopted_at)``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
    true,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# JSONB on PostgreSQL (indexable, compares by value), JSON text elsewhere.
JSONType = JSON().with_variant(JSONB(), "postgresql")
# BIGINT on PostgreSQL; SQLite only auto-increments an INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

CHANNELS = ("branch", "contact_centre", "digital", "chatbot")
OUTCOMES = ("presented", "accepted", "declined", "not_now")
FINAL_OUTCOMES = ("accepted", "declined", "not_now")
"""The customer's answer to an offer: one per offer (``presented`` is a sighting, not an
answer, and may be recorded besides it)."""
MODEL_STATUSES = ("candidate", "active", "retired", "rejected")
_FINAL_SQL = "outcome IN ('accepted', 'declined', 'not_now')"


def utcnow() -> dt.datetime:
    """Timezone-aware now, for Python-side defaults."""
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Product(Base):
    """The bank's catalogue: one row per product that can be offered."""

    __tablename__ = "products"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    category: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float, doc="Business value of one adoption.")
    business_weight: Mapped[float] = mapped_column(Float, default=1.0, server_default="1")
    active: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    min_age: Mapped[int | None] = mapped_column(SmallInteger)
    max_age: Mapped[int | None] = mapped_column(SmallInteger)
    segments: Mapped[list[str] | None] = mapped_column(
        JSONType, doc="Segments allowed to hold the product; null means all."
    )
    requires: Mapped[list[str] | None] = mapped_column(
        JSONType, doc="Product codes that must all be held first."
    )
    excludes: Mapped[list[str] | None] = mapped_column(
        JSONType, doc="Product codes that rule this product out while held."
    )
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    updated_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )

    __table_args__ = (
        CheckConstraint("value >= 0", name="value_not_negative"),
        CheckConstraint("business_weight >= 0", name="weight_not_negative"),
    )


class AttributeDefinition(Base):
    """The kind of each bank-supplied customer attribute."""

    __tablename__ = "attribute_definitions"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))

    __table_args__ = (CheckConstraint("kind IN ('numeric', 'categorical')", name="kind"),)


class Customer(Base):
    """A bank customer; ``attributes`` holds whatever columns the bank supplies."""

    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    external_id: Mapped[str] = mapped_column(String(128), unique=True)
    segment: Mapped[str | None] = mapped_column(String(64))
    branch_id: Mapped[str | None] = mapped_column(String(64))
    joined_at: Mapped[dt.date | None] = mapped_column(Date)
    birth_date: Mapped[dt.date | None] = mapped_column(Date)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    updated_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )

    __table_args__ = (
        # A serving store's check reads max(updated_at) and the customers updated since
        # (service.decision.store): without it, two scans of the table (migration 0013).
        Index("ix_customers_updated_at", "updated_at"),
    )


class BankChanges(Base):
    """What the bank's tables cannot tell by their largest ids: deletions and closings.

    One row, kept by triggers (migration 0013): ``deleted`` grows with every statement
    that deletes customers or adoptions (``TRUNCATE`` too) or sets an adoption's
    customer, product or day; ``closed`` with every one that updates adoptions (nbo's
    own updates only change closing days, so each counts as a closing). A serving store
    records both when it reads the bank and compares them when mapped
    (:func:`service.decision.store.changes_since`): two numbers read where counting the
    customers and adoptions tables took half a second of a core at a million customers,
    at every worker start and activation. The triggers see every writer, nbo or not,
    that does not switch triggers off.
    """

    __tablename__ = "bank_changes"

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    deleted: Mapped[int] = mapped_column(BigInteger, server_default="0")
    closed: Mapped[int] = mapped_column(BigInteger, server_default="0")

    __table_args__ = (CheckConstraint("id = 1", name="one_row"),)


class AttributeChange(Base):
    """A change of one customer's attribute, segment or branch: the value it replaced.

    The values in force now live in ``customers`` (serving reads them there); this table
    keeps what they were before. A row says that from ``changed_on`` on ``name`` took a
    new value and that before that day it was ``previous`` (null: unknown). The value
    before a customer's first change of ``name`` counts as valid from the start of
    history, so a bank that imported one snapshot has no rows here and loses nothing.
    Written by the customer import and ``PUT /v1/customers/{id}`` through
    :mod:`service.data.history`; read by :func:`service.data.bank.load_bank`.
    """

    __tablename__ = "attribute_changes"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(
        String(128), doc="An attribute's name, or 'segment' or 'branch_id'."
    )
    changed_on: Mapped[dt.date] = mapped_column(Date, doc="First day of the new value.")
    previous: Mapped[Any] = mapped_column(
        JSONType, nullable=True, doc="The value before changed_on; null when unknown."
    )
    recorded_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )

    __table_args__ = (UniqueConstraint("customer_id", "name", "changed_on"),)


class Adoption(Base):
    """One product taken up by one customer; open while ``closed_at`` is null."""

    __tablename__ = "adoptions"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id", ondelete="CASCADE"))
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    adopted_at: Mapped[dt.date] = mapped_column(Date)
    closed_at: Mapped[dt.date | None] = mapped_column(Date)
    source: Mapped[str] = mapped_column(
        String(32),
        default="import",
        server_default="import",
        doc=(
            "import | snapshot | snapshot_initial (held at the first snapshot, true date "
            "unknown) | api | offer"
        ),
    )

    __table_args__ = (
        UniqueConstraint("customer_id", "product_id", "adopted_at"),
        CheckConstraint("closed_at IS NULL OR closed_at >= adopted_at", name="closed_after"),
    )


class ModelVersion(Base):
    """A trained model version's metadata; its bundle's files are in ``model_files``."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16), default="candidate")
    path: Mapped[str] = mapped_column(Text)
    checksum: Mapped[str] = mapped_column(String(64))
    as_of: Mapped[dt.date] = mapped_column(Date)
    horizon_days: Mapped[int] = mapped_column(Integer)
    params: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    activated_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint("status IN ('candidate', 'active', 'retired', 'rejected')", name="status"),
        # At most one active version, enforced by the database itself.
        Index(
            "uq_model_versions_one_active",
            "status",
            unique=True,
            sqlite_where=text("status = 'active'"),
            postgresql_where=text("status = 'active'"),
        ),
    )


class ModelFile(Base):
    """One file of a registered model bundle, stored with its version so that every
    replica that reaches the database can load the version (see
    :mod:`service.data.registry`). ``name`` is the file's path inside the bundle."""

    __tablename__ = "model_files"

    version: Mapped[str] = mapped_column(
        String(64),
        ForeignKey("model_versions.version", ondelete="CASCADE"),
        primary_key=True,
    )
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    content: Mapped[bytes] = mapped_column(LargeBinary)


class Decision(Base):
    """One answer to a teller or agent system: the audit record of a contact.

    Decisions and offers are the audit trail, written on the hot path, many a second,
    by one code path (:mod:`service.decision.audit`) that writes a decision and its offers in one
    statement. They carry no foreign keys: on PostgreSQL each key is a row lock per
    row written (on a customer, a product, the decision), which took a quarter of the
    database's work per decision. Customers and products are never deleted (products
    are deactivated), so the ids stay meaningful. The time indexes are BRIN on
    PostgreSQL: rows arrive in time order, and a BRIN index costs next to nothing to
    keep up while answering date ranges (reports, the contact history at start-up).
    """

    __tablename__ = "decisions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, doc="UUID, made by the server.")
    customer_id: Mapped[int | None] = mapped_column(BigId, doc="customers.id (no key: see above).")
    customer_external_id: Mapped[str] = mapped_column(String(128))
    channel: Mapped[str] = mapped_column(String(32))
    staff_id: Mapped[str | None] = mapped_column(String(64))
    branch_id: Mapped[str | None] = mapped_column(String(64))
    context: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    model_version: Mapped[str | None] = mapped_column(String(64))
    control: Mapped[bool] = mapped_column(Boolean, default=False)
    degraded: Mapped[bool] = mapped_column(Boolean, default=False)
    cold_start: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    api_key_prefix: Mapped[str | None] = mapped_column(
        String(16), doc="The API key that asked, when it sent an Idempotency-Key."
    )
    idempotency_key: Mapped[str | None] = mapped_column(
        String(128), doc="The request's Idempotency-Key: a retry finds this decision."
    )

    __table_args__ = (
        CheckConstraint(
            "channel IN ('branch', 'contact_centre', 'digital', 'chatbot')", name="channel"
        ),
        Index("ix_decisions_customer_id_created_at", "customer_id", "created_at"),
        Index("ix_decisions_created_at", "created_at", postgresql_using="brin"),
        # Partial: decisions without a key (most) cost the index nothing. Not unique:
        # a group commit must never fail on one row, so the first attempts of one key
        # on two workers at once may both be recorded (see service/api/decisions.py).
        Index(
            "ix_decisions_api_key_prefix_idempotency_key",
            "api_key_prefix",
            "idempotency_key",
            sqlite_where=text("idempotency_key IS NOT NULL"),
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
    )


UUID_SHAPE = "________-____-____-____-____________"
"""A LIKE pattern: 36 characters in a UUID's dashed layout."""


def unnamed_offers(alias: str = "offers") -> str:
    """SQL true of the offers a worker's bulk start-up read cannot name
    (:mod:`service.decision.window`): made for an unknown customer (no customer id), or
    with an id that is not a lowercase UUID. Few in any bank, they have a partial index
    of their own (``ix_offers_unnamed_created_at``) so that the row reader finds them
    without reading every offer of the policy windows again."""
    a = f"{alias}."
    return f"{a}customer_id IS NULL OR NOT ({a}id LIKE '{UUID_SHAPE}' AND {a}id = lower({a}id))"


class Offer(Base):
    """One ranked offer inside a decision (audit trail: no foreign keys, see :class:`Decision`)."""

    __tablename__ = "offers"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, doc="UUID, made by the server.")
    decision_id: Mapped[str] = mapped_column(String(36), doc="decisions.id")
    customer_id: Mapped[int | None] = mapped_column(BigId, doc="customers.id")
    product_id: Mapped[int] = mapped_column(Integer, doc="products.id")
    rank: Mapped[int] = mapped_column(SmallInteger)
    propensity: Mapped[float] = mapped_column(Float)
    expected_value: Mapped[float] = mapped_column(Float)
    score: Mapped[float] = mapped_column(Float)
    reasons: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        # No index of its own by customer: a customer's offers are found through
        # decisions (ix_decisions_customer_id_created_at), see migration 0005.
        Index("ix_offers_decision_id", "decision_id"),
        Index("ix_offers_created_at", "created_at", postgresql_using="brin"),
        # PostgreSQL only: the bulk read it serves is PostgreSQL's (migration 0011).
        Index(
            "ix_offers_unnamed_created_at",
            "created_at",
            postgresql_where=text(unnamed_offers()),
        ).ddl_if(dialect="postgresql"),
    )


class OfferOutcome(Base):
    """What the customer said to an offer; retries are counted once.

    An offer has at most one final outcome (:data:`FINAL_OUTCOMES`), enforced by a
    partial unique index so that two concurrent answers cannot both be recorded, and at
    most one ``presented``. Idempotency keys belong to the API key that sent them.
    """

    __tablename__ = "offer_outcomes"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    offer_id: Mapped[str] = mapped_column(ForeignKey("offers.id", ondelete="CASCADE"))
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    staff_id: Mapped[str | None] = mapped_column(String(64))
    api_key_prefix: Mapped[str | None] = mapped_column(
        String(16), doc="The API key that recorded it (null: recorded before migration 0006)."
    )
    idempotency_key: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        UniqueConstraint("offer_id", "outcome"),
        UniqueConstraint("api_key_prefix", "idempotency_key"),
        CheckConstraint(
            "outcome IN ('presented', 'accepted', 'declined', 'not_now')", name="outcome"
        ),
        Index(
            "uq_offer_outcomes_one_final",
            "offer_id",
            unique=True,
            sqlite_where=text(_FINAL_SQL),
            postgresql_where=text(_FINAL_SQL),
        ),
        # Recent outcomes: the rolling conversion gauges, the declines read at start-up.
        Index("ix_offer_outcomes_created_at", "created_at", postgresql_using="brin"),
    )


class Feedback(Base):
    """An NPS (0-10) or CSAT (1-5) answer from a customer after a contact."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))
    score: Mapped[int] = mapped_column(SmallInteger)
    decision_id: Mapped[str | None] = mapped_column(ForeignKey("decisions.id", ondelete="SET NULL"))
    customer_id: Mapped[int | None] = mapped_column(ForeignKey("customers.id", ondelete="SET NULL"))
    staff_id: Mapped[str | None] = mapped_column(String(64))
    branch_id: Mapped[str | None] = mapped_column(String(64))
    comment: Mapped[str | None] = mapped_column(Text)
    api_key_prefix: Mapped[str | None] = mapped_column(
        String(16), doc="The API key that recorded it (null: recorded before migration 0006)."
    )
    idempotency_key: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        # Idempotency keys belong to the API key that sent them.
        UniqueConstraint("api_key_prefix", "idempotency_key"),
        CheckConstraint(
            "(kind = 'nps' AND score BETWEEN 0 AND 10) OR (kind = 'csat' AND score BETWEEN 1 AND 5)",
            name="score_range",
        ),
        Index("ix_feedback_created_at", "created_at"),
        Index("ix_feedback_customer_id_created_at", "customer_id", "created_at"),
    )


class ApiKey(Base):
    """An API key: only a salted hash of the secret is stored, found by its prefix."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(128))
    scopes: Mapped[list[str]] = mapped_column(JSONType)
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


CUSTOMER_EVENTS = "kind IN ('adoption', 'customer', 'outcome')"
"""SQL true of the change events that change a customer's state (the others: offers,
the catalogue, model activations, heartbeats)."""


class ChangeEvent(Base):
    """A change every serving worker must apply: appended in the transaction of the change.

    Each worker holds customers' scores and contact history in memory and polls this log
    (``id`` greater than the last it saw), so an adoption, an outcome or an offer made
    through one worker reaches every other worker within the poll interval.
    """

    __tablename__ = "change_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    customer_external_id: Mapped[str | None] = mapped_column(String(128))
    product_code: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(String(64))
    origin: Mapped[str | None] = mapped_column(String(64), doc="The worker that made it.")
    occurred_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        CheckConstraint(
            "kind IN ('adoption', 'customer', 'offer', 'outcome', 'catalogue', 'model', "
            "'heartbeat')",
            name="kind",
        ),
        # The customers changed since a serving store was built are looked for among
        # these few; with several workers nearly every event is an offer's (a million an
        # hour at full load, kept a day), and reading them all took 0.45 s of each load.
        Index(
            "ix_change_events_customer_id",
            "id",
            sqlite_where=text(CUSTOMER_EVENTS),
            postgresql_where=text(CUSTOMER_EVENTS),
        ),
    )


class DashboardSession(Base):
    """A browser signed in to the dashboard (see :mod:`service.reports.sessions`).

    The browser's cookie holds a random session id; only its SHA-256 is stored, so a
    copy of this table opens no session. A session dies at ``expires_at``, when its
    API key is revoked, or when it signs out.
    """

    __tablename__ = "dashboard_sessions"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    api_key_id: Mapped[int] = mapped_column(
        ForeignKey("api_keys.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
