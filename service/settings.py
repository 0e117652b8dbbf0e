"""Configuration: the one place that reads the environment.

Every field can be set as ``NBO_<FIELD>`` (for example ``NBO_DATABASE_URL``)
or in a ``.env`` file in the working directory.
"""

from __future__ import annotations

from pathlib import Path

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
