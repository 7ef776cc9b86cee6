"""Outbound HTTP: every call leaves through a session that only reaches origins named in config.

A provider's answer (a ``next`` link, an error text holding a URL, a redirect) can never make us call another host:
the session refuses any origin outside its list and never follows redirects.

:func:`origin` and :func:`parse_retry_after` are public: provider plugins compare links and read ``Retry-After`` the
same way the core does.
"""

from __future__ import annotations

import email.utils
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aiohttp

log = logging.getLogger("connector.outbound")

#: A ``Retry-After`` beyond this is clamped: a typo at the far end must not stop the feed for days.
MAX_RETRY_AFTER = 600.0


class ForbiddenOrigin(aiohttp.ClientError):
    """A request aimed at an origin outside the session's configured list."""


def origin(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


def parse_retry_after(value: str | None, *, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> float | None:
    """``Retry-After`` as seconds to wait: delta-seconds or an HTTP date (RFC 9110 10.2.3); ``None`` if absent or
    unreadable. Clamped to ``[0, MAX_RETRY_AFTER]``. Fractions are accepted, as lenient parsing costs nothing.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - now()).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _origin_guard(allowed: frozenset[str]) -> aiohttp.ClientMiddlewareType:
    async def guard(request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
        target = origin(str(request.url))
        if target not in allowed:
            log.warning("outbound call refused", extra={"origin": target})
            raise ForbiddenOrigin(f"origin {target} is not configured for this client")
        started = time.monotonic()
        response = await handler(request)
        # One line per call, with the id of the request that caused it (logs.request_id): a page or notification
        # can be followed through its provider and Sage calls. No path or query: they can carry account numbers.
        log.debug("outbound call", extra={"kind": request.method, "origin": target, "status": response.status,
                                          "seconds": round(time.monotonic() - started, 3)})
        if 300 <= response.status < 400:
            # Never followed: a redirect could lead to a host we did not configure.
            response.release()
            raise ForbiddenOrigin(f"{target} answered {response.status} (redirects are not followed)")
        return response

    return guard


def guarded_session(
    base_urls: Sequence[str],
    *,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 30.0,
    connect_timeout: float = 5.0,
) -> aiohttp.ClientSession:
    """A session limited to ``base_urls``' origins that treats any redirect as an error."""
    allowed = frozenset(origin(u) for u in base_urls)
    connector = aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else True)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout),
        middlewares=(_origin_guard(allowed),),
        raise_for_status=False,
        trust_env=False,
    )


class CoreServices:
    """The :class:`connector.hookspecs.ProviderServices` the core hands each provider instance."""

    def __init__(self, public_url: str, provider_name: str) -> None:
        self.public_url = public_url.rstrip("/")
        self._name = provider_name

    def callback_url(self) -> str:
        return f"{self.public_url}/providers/{self._name}/callback"

    def http_session(
        self,
        base_urls: Sequence[str],
        *,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
    ) -> aiohttp.ClientSession:
        return guarded_session(base_urls, ssl_context=ssl_context, timeout=timeout)
