"""The product catalogue: reading products and writing one as an analyst defines it.

A write appends a ``catalogue`` change event in the caller's transaction, so every
worker reloads its catalogue once the write commits.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.data.events import record_event
from service.data.tables import Product
from service.errors import Invalid, NotFound
from service.schemas import ProductRequest


def list_products(session: Session) -> list[Product]:
    """Every product, by code."""
    return list(session.scalars(select(Product).order_by(Product.code)))


def get_product(session: Session, *, code: str) -> Product:
    """The product ``code``; :class:`NotFound` if there is none."""
    row = session.scalar(select(Product).where(Product.code == code))
    if row is None:
        raise NotFound(f"product '{code}' does not exist")
    return row


def put_product(
    session: Session, *, code: str, body: ProductRequest, origin: str
) -> tuple[Product, bool]:
    """Create or replace the product ``code`` with ``body``; return it and whether it is new.

    Every product ``body`` requires or excludes must be known (or be ``code`` itself),
    and ``min_age`` may not exceed ``max_age``; otherwise :class:`Invalid` names the
    field and nothing is written.
    """
    known = set(session.scalars(select(Product.code)))
    for field in ("requires", "excludes"):
        unknown = sorted(set(getattr(body, field)) - known - {code})
        if unknown:
            raise Invalid(
                f"body.{field}: unknown product(s) {', '.join(unknown)}",
                errors=[{"field": f"body.{field}", "message": "unknown product"}],
            )
    if body.min_age is not None and body.max_age is not None and body.min_age > body.max_age:
        raise Invalid(
            "body.min_age: greater than max_age",
            errors=[{"field": "body.min_age", "message": "greater than max_age"}],
        )
    row = session.scalar(select(Product).where(Product.code == code))
    created = row is None
    if row is None:
        row = Product(code=code)
        session.add(row)
    for name, value in body.model_dump().items():
        setattr(row, name, value)
    session.flush()
    record_event(session.connection(), kind="catalogue", origin=origin, product=code)
    return row, created
