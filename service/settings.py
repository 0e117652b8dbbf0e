"""Configuration: the one place that reads the environment.

Every field can be set as ``NBO_<FIELD>`` (for example ``NBO_DATABASE_URL``)
or in a ``.env`` file in the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATA_DIR = Path("data")


class Settings(BaseSettings):
    """nbo's settings, read from ``NBO_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="NBO_", env_file=".env", extra="ignore")

    data_dir: Path = Field(
        default=DEFAULT_DATA_DIR,
        description="Local folder for the default SQLite database, model artifacts and reports.",
    )
    database_url: str | None = Field(
        default=None,
        description=(
            "SQLAlchemy URL of the database, e.g. postgresql+psycopg://user@host/db. "
            "Unset: a SQLite file nbo.sqlite3 under data_dir."
        ),
    )
    import_chunk_rows: int = Field(
        default=100_000,
        gt=0,
        description="Rows read and validated per chunk when importing a file (bounds memory).",
    )
    import_bulk_rows: int = Field(
        default=200_000,
        ge=0,
        description=(
            "Adoption files of at least this many rows are loaded on PostgreSQL with the "
            "foreign keys checked once after the insert instead of per row (about twice as "
            "fast; the adoptions table is locked against readers until the import commits). "
            "0 turns it off."
        ),
    )
    import_max_errors: int = Field(
        default=20,
        gt=0,
        description="An import stops collecting problems after this many and reports them.",
    )

    promotion_tolerance: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description=(
            "A new model version becomes active only if its holdout MAP@3 is at least the "
            "active version's times (1 - tolerance)."
        ),
    )

    forced_sales: Literal["keep", "drop"] = Field(
        default="keep",
        description=(
            "Training labels of accepted offers: keep them as positives (they are what the "
            "model is served to predict), or drop them (a push, not the customer's own "
            "propensity; for banks whose sales push products). See TrainConfig.forced_sales."
        ),
    )

    # ------------------------------------------------------------------ decisioning
    control_share: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description=(
            "Share of customers in the control group (no model offers, flagged), chosen "
            "deterministically by a hash of the customer id and control_salt."
        ),
    )
    control_salt: str = Field(
        default="nbo-control-v1",
        description="Salt of the control-group hash; changing it reshuffles the groups.",
    )
    min_propensity: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description=(
            "A product whose propensity is below this is never offered: an empty answer "
            "is better than a bad offer."
        ),
    )
    decline_cooldown_days: int = Field(
        default=30,
        ge=0,
        description="After a decline, the product is not offered to that customer for this many days.",
    )
    frequency_cap: int = Field(
        default=3,
        ge=1,
        description="At most this many offers of one product to one customer per frequency window.",
    )
    frequency_window_days: int = Field(
        default=30, ge=1, description="The window of frequency_cap, in days."
    )
    max_offers_per_contact: int = Field(
        default=5,
        ge=1,
        le=10,
        description="Overall cap on offers in one answer, whatever the caller asks for.",
    )
    cold_start: bool = Field(
        default=False,
        description=(
            "Unknown customers get the most popular products of their segment (flagged "
            "cold_start) instead of a 404."
        ),
    )
    detractor_suppress_days: int = Field(
        default=30,
        ge=0,
        description="After an NPS detractor answer (0-6) following an offer, no offers for this many days.",
    )
    figures_interval_seconds: float = Field(
        default=300.0,
        ge=0.0,
        description=(
            "How often each worker recomputes the rolling 7-day conversion and NPS gauges "
            "from the database (a query over a week of offers); 0 turns them off."
        ),
    )
    audit_commit_lanes: int = Field(
        default=2,
        ge=1,
        le=8,
        description=(
            "PostgreSQL: group commits of audit records in flight at once per worker, each "
            "on its own connection (more lanes: less waiting for a commit, more connections)."
        ),
    )
    poll_interval_seconds: float = Field(
        default=0.5,
        gt=0.0,
        description=(
            "How often each worker applies changes made through other workers (adoptions, "
            "outcomes, offers, catalogue, model activation)."
        ),
    )
    scoring_date: str | None = Field(
        default=None,
        description=(
            "The day the service scores as of (YYYY-MM-DD). Unset: the later of the active "
            "model's as-of day and the day after the last recorded adoption (for a live "
            "bank, today; for a replayed or synthetic history, the end of that history)."
        ),
    )
    api_key_ttl_seconds: float = Field(
        default=30.0,
        gt=0.0,
        description="How long a worker trusts a verified API key before re-reading it (revocation delay).",
    )

    workers: int = Field(
        default=1,
        ge=1,
        description=(
            "Worker processes serving (set by `nbo serve --workers`). With one worker, "
            "offers need not be announced to other workers through change_events."
        ),
    )

    @property
    def resolved_database_url(self) -> str:
        """The database URL in force: the configured one, or the SQLite default."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'nbo.sqlite3').resolve()}"

    @property
    def artifacts_dir(self) -> Path:
        """Where model versions are stored."""
        return self.data_dir / "models"


def export_workers(workers: int) -> None:
    """Tell the worker processes uvicorn is about to start how many of them there are."""
    os.environ["NBO_WORKERS"] = str(workers)
