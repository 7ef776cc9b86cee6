"""Building the feed outside ``connector serve``: ``connector feed run``, ``feed status`` and the benchmark."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from connector.config import Settings
from connector.feed.engine import Feed, FeedOptions
from connector.hookspecs import Provider
from connector.outbound import CoreServices, guarded_session
from connector.plugins import Plugins
from connector.sage.client import SageClient
from connector.sage.ratelimit import RateLimiter
from connector.security.crypto import SecretBox
from connector.storage import close_database, open_database

log = logging.getLogger("connector.feed")


def build_providers(settings: Settings, plugins: Plugins) -> dict[str, Provider]:
    """One instance per enabled provider, configured exactly as ``connector serve`` configures it."""
    available = plugins.providers()
    return {
        name: available[name].cls({k: v for k, v in settings.providers[name].items() if k != "enabled"},
                                  CoreServices(settings.public_url, name))
        for name in settings.enabled_providers() if name in available
    }


@asynccontextmanager
async def sage_client(settings: Settings, **overrides: Any) -> AsyncIterator[SageClient]:
    """A Provider API client with its own guarded session and rate limiter (one per process)."""
    sage = settings.sage
    async with guarded_session([sage["token_url"], sage["provider_api_url"]]) as http:
        yield SageClient(
            http, token_url=sage["token_url"], client_id=sage["client_id"], client_secret=sage["client_secret"],
            token_audience=sage["token_audience"], api_url=sage["provider_api_url"], api_key=sage["api_key"],
            limiter=RateLimiter(sage["requests_per_second"]), **overrides)


@asynccontextmanager
async def feed_runtime(
    settings: Settings,
    plugins: Plugins,
    *,
    options: FeedOptions | None = None,
    client_overrides: Mapping[str, Any] | None = None,
) -> AsyncIterator[Feed]:
    """Open the database, build the providers and the Sage client, and hand back a :class:`Feed`."""
    await open_database(settings.database["url"])
    providers = build_providers(settings, plugins)
    try:
        async with sage_client(settings, **dict(client_overrides or {})) as client:
            yield Feed(settings, providers, SecretBox(settings.encryption_keys), client, options=options)
    finally:
        for provider in providers.values():
            try:
                await provider.close()
            except Exception:
                log.warning("provider close failed", exc_info=True)
        await close_database()
