"""Persistence: Tortoise models (``models.py``) and database start-up."""

from __future__ import annotations

from pathlib import Path

from tortoise import Tortoise

MODELS = ["connector.storage.models"]


def tortoise_config(url: str) -> dict:
    return {
        "connections": {"default": url},
        "apps": {"models": {"models": MODELS, "default_connection": "default"}},
        "use_tz": True,
        "timezone": "UTC",
    }


async def open_database(url: str, *, create_schema: bool = True) -> None:
    """Connect Tortoise; on SQLite create the folder of the file. ``create_schema`` makes missing tables."""
    if url.startswith("sqlite://") and not url.startswith("sqlite://:memory:"):
        Path(url.removeprefix("sqlite://").split("?")[0]).parent.mkdir(parents=True, exist_ok=True)
    # Requests run in other tasks than the start-up listener, so the context must be the global fallback.
    await Tortoise.init(config=tortoise_config(url), _enable_global_fallback=True)
    if create_schema:
        await Tortoise.generate_schemas(safe=True)


async def close_database() -> None:
    await Tortoise.close_connections()
