"""Persistence: Tortoise models (``models.py``) and database start-up."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tortoise import Tortoise
from tortoise.backends.base.client import BaseDBAsyncClient

MODELS = ["connector.storage.models"]
MIGRATIONS = "connector.storage.migrations"


def tortoise_config(url: str) -> dict:
    return {
        "connections": {"default": url},
        "apps": {"models": {"models": MODELS, "default_connection": "default", "migrations": MIGRATIONS}},
        "use_tz": True,
        "timezone": "UTC",
    }


#: For Tortoise's own command line (``python -m tortoise -c connector.storage.TORTOISE_ORM makemigrations``),
#: which writes a new migration into ``connector/storage/migrations`` after a model change.
TORTOISE_ORM = tortoise_config("sqlite://:memory:")


#: Any constant: instances starting together on one PostgreSQL database take turns applying migrations.
MIGRATION_LOCK = 0x5A6E_C0DE


def storable(value: str) -> bool:
    """Whether a text value can be stored or looked up on every database: PostgreSQL text and JSON cannot hold U+0000
    (the query fails), so a value carrying it is refused or treated as unknown before it reaches the database."""
    return "\x00" not in value


async def insert_rows(connection: BaseDBAsyncClient, table: str, columns: Sequence[str],
                      rows: Sequence[Sequence[Any]], *, skip_conflicts_on: str | None = None,
                      returning: Sequence[str] = ()) -> list[Sequence[Any]]:
    """Insert many rows with one statement; return the ``returning`` columns of the rows inserted.

    For the hot path (``POST /notification``), where building a model object per row costs more than the database
    does. ``skip_conflicts_on`` names a unique column: a row whose value is already stored (or is being stored by
    another instance's open transaction, which this waits for) is left out, not an error. ``table`` and ``columns``
    are the caller's constants, never request data; values are always bound parameters. Values must already be what
    the column stores: timezone-aware datetimes, JSON as text.
    """
    if not rows:
        return []
    if connection.capabilities.dialect == "postgres":
        width, counter = len(columns), iter(range(1, len(rows) * len(columns) + 1))
        values = ", ".join("(" + ", ".join(f"${next(counter)}" for _ in range(width)) + ")" for _ in rows)
    else:
        values = ", ".join(["(" + ", ".join("?" * len(columns)) + ")"] * len(rows))
    sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES {values}"
    if skip_conflicts_on:
        sql += f" ON CONFLICT ({skip_conflicts_on}) DO NOTHING"
    if returning:
        sql += f" RETURNING {', '.join(returning)}"
    params = [value for row in rows for value in row]
    if not returning:
        await connection.execute_query(sql, params)
        return []
    if connection.capabilities.dialect == "postgres":
        # Tortoise's asyncpg client drops the rows of a statement that starts with INSERT; a CTE keeps them.
        sql = f"WITH inserted AS ({sql}) SELECT * FROM inserted"
    return list((await connection.execute_query(sql, params))[1])


async def open_database(url: str, *, migrate: bool = True) -> None:
    """Connect Tortoise (on SQLite, create the file's folder) and, unless told not to, apply pending migrations."""
    if url.startswith("sqlite://") and not url.startswith("sqlite://:memory:"):
        Path(url.removeprefix("sqlite://").split("?")[0]).parent.mkdir(parents=True, exist_ok=True)
    # Requests run in other tasks than the start-up listener, so the context must be the global fallback.
    await Tortoise.init(config=tortoise_config(url), _enable_global_fallback=True)
    if migrate:
        await apply_migrations(url)


async def apply_migrations(url: str) -> list[str]:
    """Bring the connected database to the newest migration; return the names of those applied."""
    from tortoise.migrations.executor import MigrationExecutor

    connection = Tortoise.get_connection("default")
    executor = MigrationExecutor(connection, tortoise_config(url)["apps"])
    applied: list[str] = []

    def progress(event: str, app: str, name: str) -> None:
        if event == "apply_done":
            applied.append(f"{app}.{name}")

    if not url.startswith(("postgres://", "postgresql://", "asyncpg://")):
        await executor.migrate(progress=progress)
        return applied
    if getattr(connection, "pool_maxsize", 2) < 2:
        raise ValueError("database.url: maxsize must be at least 2 (one connection holds the migration lock)")
    # The lock lives on one connection held for the whole migration: a connection going back to asyncpg's pool is
    # reset, which releases its advisory locks, so taking the lock through execute_query would release it at once.
    async with connection.acquire_connection() as holder:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
        try:
            await executor.migrate(progress=progress)
        finally:
            await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return applied


async def close_database() -> None:
    await Tortoise.close_connections()
