"""Building the feed outside ``connector serve``: ``connector feed run``, ``feed status`` and the benchmark."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from connector.config import Settings
from connector.feed.engine import Feed
from connector.outbound import guarded_session
from connector.plugins import Plugins
from connector.sage.client import SageClient
from connector.sage.ratelimit import RateLimiter
from connector.security.crypto import SecretBox
from connector.storage import close_database, open_database

log = logging.getLogger("connector.feed")


@asynccontextmanager
async def sage_client(settings: Settings) -> AsyncIterator[SageClient]:
    """A Provider API client with its own guarded session and rate limiter (one per process)."""
    sage = settings.sage
    async with guarded_session([sage["token_url"], sage["provider_api_url"]]) as http:
        yield SageClient.from_settings(http, sage, RateLimiter(sage["requests_per_second"]))


@asynccontextmanager
async def feed_runtime(settings: Settings, plugins: Plugins) -> AsyncIterator[Feed]:
    """Open the database, build the providers and the Sage client, and hand back a :class:`Feed`."""
    await open_database(settings.database["url"])
    providers = plugins.instances(settings)
    try:
        async with sage_client(settings) as client:
            yield Feed(settings, providers, SecretBox(settings.encryption_keys), client)
    finally:
        for provider in providers.values():
            try:
                await provider.close()
            except Exception:
                log.warning("provider close failed", exc_info=True)
        await close_database()
