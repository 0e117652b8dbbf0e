"""Configuration: the one place that reads the environment.

Every field can be set as ``NBO_<FIELD>`` (for example ``NBO_DATABASE_URL``)
or in a ``.env`` file in the working directory.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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
            "Adoption and customer files of at least this many rows are loaded on "
            "PostgreSQL with the keys checked once after the insert instead of per row "
            "(about twice as fast; the table is locked against readers until the import "
            "commits). 0 turns it off."
        ),
    )
    import_max_errors: int = Field(
        default=20,
        gt=0,
        description="An import stops collecting problems after this many and reports them.",
    )
    max_attributes: int = Field(
        default=500,
        ge=1,
        le=1500,
        description=(
            "At most this many customer attributes (distinct names) may be defined, through "
            "PUT /v1/customers or `nbo import customers`: each is a column of the loaded "
            "bank and a value held per customer in every worker."
        ),
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
            "How often one worker of each machine recomputes the rolling 7-day conversion, "
            "NPS and uplift gauges from the database (queries over a week of contacts); 0 "
            "turns them off."
        ),
    )
    lock_serving_store: bool = Field(
        default=True,
        description=(
            "Lock each worker's serving store in memory (mlock) when it loads, so that "
            "the kernel never pages it out and a decision never waits for a disk read; "
            "needs a locked-memory limit (ulimit -l, or CAP_IPC_LOCK) above the store's "
            "size, else a warning and the pages are only brought in. false: only "
            "brought in."
        ),
    )
    audit_commit_lanes: int = Field(
        default=1,
        ge=1,
        le=8,
        description=(
            "PostgreSQL: group commits of audit records in flight at once per worker, each "
            "on its own connection (more lanes: a commit starts without waiting for the one "
            "in flight, but groups are smaller and the database does more commits). With "
            "the database on the same machine, one lane answered more decisions at a lower "
            "p99 than two at every load measured (see README, Benchmarks)."
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
    db_connect_timeout_seconds: float = Field(
        default=5.0,
        gt=0.0,
        description=(
            "PostgreSQL: how long opening a database connection may take before it fails "
            "(whole seconds, at least 2). Without it a server that stops answering holds "
            "each request for minutes."
        ),
    )
    db_statement_timeout_seconds: float = Field(
        default=30.0,
        ge=0.0,
        description=(
            "PostgreSQL: the longest any one statement of the serving app may run before "
            "the server cancels it (answered 503); 0 for no limit. Imports and training "
            "(the CLI) are not limited."
        ),
    )
    db_lock_timeout_seconds: float = Field(
        default=10.0,
        ge=0.0,
        description=(
            "PostgreSQL: the longest a statement of the serving app waits for a lock before "
            "giving up (answered 503), e.g. behind a bulk import; 0 for no limit."
        ),
    )
    db_pool_timeout_seconds: float = Field(
        default=10.0,
        gt=0.0,
        description="How long a request waits for a free pooled database connection (then 503).",
    )
    max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description=(
            "Largest request body accepted on any route, refused with 413 before the key "
            "is checked or the body read (decisions have their own, smaller limit)."
        ),
    )
    ops_endpoints: Literal["key", "open"] = Field(
        default="key",
        description=(
            "Who may read /metrics, /docs, /redoc, /openapi.json and the figures of "
            "/health/ready: 'key' (the default), a key with scope 'ops' (or 'admin'), "
            "since metrics show conversion by product and NPS by branch and the spec maps "
            "the attack surface; 'open', anyone who can reach the port (only behind a "
            "network that lets nothing else in). /health/live and the readiness status "
            "stay open for orchestrators either way."
        ),
    )
    dashboard_session_hours: float = Field(
        default=8.0,
        gt=0.0,
        le=24.0 * 7,
        description=(
            "How long a dashboard sign-in lasts (a working day by default). The browser's "
            "cookie holds a random session id, never the API key; the session also ends "
            "when its key is revoked or the browser signs out."
        ),
    )
    forwarded_allow_ips: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Addresses of the reverse proxies whose X-Forwarded-Proto and X-Forwarded-For "
            "headers `nbo serve` trusts, comma-separated IPs or networks (e.g. "
            "'127.0.0.1' or '10.0.0.0/8'; '*' trusts every client, only when nothing but "
            "the proxy can reach nbo). Empty (the default): proxy headers are ignored, so "
            "no client can pretend to have come over HTTPS. Behind a TLS-terminating proxy "
            "set it, so that nbo sees https and marks the dashboard cookie Secure; the "
            "proxy must also pass the Host header on unchanged."
        ),
    )
    known_branches: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Branch ids that label the nbo_nps_score gauge, comma-separated. NPS of any "
            "other branch is reported under 'other', so callers cannot grow the metric "
            "series. Empty (the default): the metric_branch_limit branches with most "
            "customers in the database."
        ),
    )
    metric_branch_limit: int = Field(
        default=200,
        ge=0,
        le=10_000,
        description=(
            "Most branches labelling the nbo_nps_score gauge when known_branches is empty "
            "(the branches with most customers); the rest are reported under 'other'."
        ),
    )

    @field_validator("forwarded_allow_ips", "known_branches", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        # NBO_FORWARDED_ALLOW_IPS=10.0.0.1,10.0.0.2 rather than a JSON list.
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        # Refused at start-up, parsed as uvicorn parses them: uvicorn takes anything else
        # (a typo, "10.0.0.1/8") as a literal that never matches, silently.
        if "*" in value and value != ["*"]:
            raise ValueError("'*' trusts every client: give it alone or not at all")
        for item in value:
            try:
                if "/" in item:
                    ipaddress.ip_network(item)
                elif item != "*":
                    ipaddress.ip_address(item)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
        return value

    log_format: Literal["auto", "json", "text"] = Field(
        default="auto",
        description=(
            "How `nbo serve` writes its log: 'json', one JSON object per line (for a log "
            "collector); 'text', human-readable; 'auto' (the default), text when standard "
            "error is a terminal and JSON otherwise."
        ),
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info",
        description="The least severe log level `nbo serve` writes.",
    )
    access_log_sample: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description=(
            "Share of decision requests (the fast lane) that get an access log line, "
            "0 (the default: none, they are the bulk of the traffic and each decision "
            "already has its audit row) to 1 (all). Every other request gets one."
        ),
    )
    shutdown_timeout_seconds: float = Field(
        default=20.0,
        gt=0.0,
        le=600.0,
        description=(
            "On SIGTERM, how long `nbo serve` waits for in-flight requests to be answered "
            "and the audit writer to flush before it exits regardless. Keep it below the "
            "orchestrator's grace period (Kubernetes: terminationGracePeriodSeconds, 30 s "
            "by default)."
        ),
    )
    build_commit: str | None = Field(
        default=None,
        description=(
            "The source revision this build was made from (set by the Docker build), "
            "reported by the nbo_build_info metric."
        ),
    )
    prometheus_multiproc_dir: Path | None = Field(
        default=None,
        validation_alias="PROMETHEUS_MULTIPROC_DIR",
        description=(
            "prometheus_client's multiprocess folder (its own variable, without the NBO_ "
            "prefix), set by `nbo serve --workers N` for its workers; each worker also "
            "keeps its per-worker metric state there. Not to be set by hand."
        ),
    )
    otlp_endpoint: str | None = Field(
        default=None,
        description=(
            "OTLP/HTTP traces endpoint, e.g. http://collector:4318/v1/traces: each decision "
            "is then traced (spans decision, key check, ranking, audit commit; no customer "
            "id, no key). Unset = no tracing, and OpenTelemetry is not loaded. The service "
            'name is OTEL_SERVICE_NAME, "nbo" by default.'
        ),
    )
    announce_offers: Literal["auto", "always", "never"] = Field(
        default="auto",
        description=(
            "Whether every offer made is written to change_events, so that every other "
            "process serving the database (replicas, and workers of `nbo serve --workers`) "
            "counts it against the frequency cap within its poll interval. 'auto' (the "
            "default): whenever another process serves the database, which each worker "
            "learns from the others' heartbeat events (one every 15 s) within a poll or "
            "two; a lone process saves the row per offer (on PostgreSQL it raised the p99 "
            "of a decision under load). 'always' or 'never' decide it once. With more than "
            "one worker offers are always announced."
        ),
    )

    @field_validator("announce_offers", mode="before")
    @classmethod
    def _announce_flag(cls, value: object) -> object:
        # NBO_ANNOUNCE_OFFERS=true|false as well as the three words.
        if isinstance(value, bool):
            return "always" if value else "never"
        if isinstance(value, str) and value.strip().lower() in {"true", "1", "yes", "on"}:
            return "always"
        if isinstance(value, str) and value.strip().lower() in {"false", "0", "no", "off"}:
            return "never"
        return value

    workers: int = Field(
        default=1,
        ge=1,
        description=(
            "Worker processes serving (set by `nbo serve --workers`). With more than one, "
            "offers are announced whatever announce_offers says."
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
