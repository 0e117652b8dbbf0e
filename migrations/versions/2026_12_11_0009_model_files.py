"""Model bundles in the database: every file of a version's bundle in model_files, so
every replica that reaches the database can load the version. model_versions.path
becomes the location in that store, 'db:<version>', instead of a folder of one machine.

Upgrade moves each bundle whose folder (an absolute path) is on the migrating machine
into the table and rewrites its path; a row whose folder is missing keeps its path and
loads from it as before. Downgrade writes each stored bundle back to a folder under
the configured data directory (NBO_DATA_DIR/models/<version>, as registration did
before), restores that absolute path, and drops the table.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-11 09:00:00
"""

import hashlib
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STORE_PREFIX = "db:"

versions = sa.table(
    "model_versions",
    sa.column("version", sa.String()),
    sa.column("path", sa.Text()),
)
files = sa.table(
    "model_files",
    sa.column("version", sa.String()),
    sa.column("name", sa.String()),
    sa.column("sha256", sa.String()),
    sa.column("size", sa.BigInteger()),
    sa.column("content", sa.LargeBinary()),
)


def upgrade() -> None:
    op.create_table(
        "model_files",
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["version"],
            ["model_versions.version"],
            name=op.f("fk_model_files_version_model_versions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("version", "name", name=op.f("pk_model_files")),
    )
    bind = op.get_bind()
    for version, path in bind.execute(sa.select(versions.c.version, versions.c.path)).all():
        folder = Path(path)
        # Only a bundle on this machine can be moved; the others keep loading from their path.
        if not folder.is_absolute() or not (folder / "manifest.json").is_file():
            continue
        rows = []
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                content = file.read_bytes()
                rows.append(
                    {
                        "version": version,
                        "name": file.relative_to(folder).as_posix(),
                        "sha256": hashlib.sha256(content).hexdigest(),
                        "size": len(content),
                        "content": content,
                    }
                )
        bind.execute(files.insert(), rows)
        bind.execute(
            versions.update()
            .where(versions.c.version == version)
            .values(path=STORE_PREFIX + version)
        )


def downgrade() -> None:
    bind = op.get_bind()
    stored = bind.execute(
        sa.select(versions.c.version).where(versions.c.path.like(STORE_PREFIX + "%"))
    ).all()
    if stored:
        # Imported only when there is something to write back: the folder registration
        # used before bundles were stored in the database.
        from service.settings import Settings

        artifacts = Settings().artifacts_dir.resolve()
        for (version,) in stored:
            target = _write_back(bind, artifacts, version)
            bind.execute(
                versions.update().where(versions.c.version == version).values(path=str(target))
            )
    op.drop_table("model_files")


def _write_back(bind: sa.Connection, artifacts: Path, version: str) -> Path:
    """Write ``version``'s stored files to ``artifacts/<version>`` (replacing a cached copy)."""
    target = artifacts / version
    temporary = artifacts / f".{version}.{uuid.uuid4().hex[:12]}.tmp"
    temporary.mkdir(parents=True)
    try:
        for name, content in bind.execute(
            sa.select(files.c.name, files.c.content).where(files.c.version == version)
        ).all():
            file = temporary / name
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(bytes(content))
        if target.exists():
            shutil.rmtree(target)
        os.rename(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return target
