"""The Powens HTTP client: one guarded session, a client-side rate limiter, retries and error bodies (§10).

Every call goes through :meth:`PowensClient.request`, which says for each failure whether the outcome is known:

* :class:`PowensAPIError`: Powens answered with an error status (and, usually, an error body, §10.3);
* :class:`PowensUnreachable`: no answer (timeout, dropped connection), so a request may or may not have happened;
* :class:`PowensBadAnswer`: a 2xx body that is not the JSON we expect, or a refused redirect.

Nothing here logs a token, a query string (webauth field values travel there, §16 OP-8) or a request body.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import json
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

from connector.hookspecs import ProviderServices
from connector.outbound import origin, parse_retry_after

from .config import Settings

log = logging.getLogger("plugins.powens")

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]

# Money must never pass through float: every JSON number with a fraction becomes a Decimal.
loads = functools.partial(json.loads, parse_float=Decimal)

MAX_ATTEMPTS = 5
BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
LOCKED_RETRIES = 3  # connectionLocked: refused before any bank contact, so repeating is safe (§10.4)
LOCKED_WAIT = 2.0


class Retry(enum.Enum):
    """Which failures a call may be repeated after (§10.5)."""

    NEVER = "never"  # carries field values: repeating could lock the person out at their bank
    THROTTLE = "throttle"  # not idempotent, but a 429/503 means it was refused before any work
    IDEMPOTENT = "idempotent"  # GETs, DELETEs, the activation PUT: any 429/5xx/network failure


class PowensAPIError(Exception):
    """An error answer. ``code`` is Powens's error code (compare with :attr:`code_cf`, §16 OP-2)."""

    def __init__(
        self,
        status: int,
        code: str | None,
        *,
        description: str | None = None,
        message: str | None = None,
        request_id: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"Powens answered {status} {code or ''}".strip())
        self.status = status
        self.code = code
        self.description = description
        self.message = message
        self.request_id = request_id
        self.retry_after = retry_after

    @property
    def code_cf(self) -> str:
        return (self.code or "").casefold()

    @property
    def detail(self) -> str | None:
        """Powens's own text for :attr:`ProviderError.detail`: the bank's message, else the technical one."""
        return self.message or self.description


class PowensUnreachable(Exception):
    """No answer: the request may or may not have reached Powens."""


class PowensBadAnswer(Exception):
    """An answer we cannot use (not JSON, wrong shape, a redirect, a link to another origin)."""


class RateLimiter:
    """At most ``per_minute`` call starts in any 60-second window, shared by every call of the process."""

    def __init__(self, per_minute: int, *, clock: Clock, sleep: Sleep) -> None:
        self._per_minute = per_minute
        self._clock = clock
        self._sleep = sleep
        self._starts: deque[float] = deque()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = self._clock()
                while self._starts and now - self._starts[0] >= 60.0:
                    self._starts.popleft()
                if len(self._starts) < self._per_minute:
                    self._starts.append(now)
                    return
                await self._sleep(60.0 - (now - self._starts[0]))


def same_origin(url: str, base: str) -> bool:
    # Default ports filled in: a next link written https://host:443/... is Powens's own origin.
    return origin(url) == origin(base)


class PowensClient:
    def __init__(self, services: ProviderServices, settings: Settings, *, clock: Clock, sleep: Sleep) -> None:
        self._services = services
        self._settings = settings
        self._sleep = sleep
        self._session: aiohttp.ClientSession | None = None
        self.base_url = settings.base_url
        self.limiter = RateLimiter(settings.requests_per_minute, clock=clock, sleep=sleep)

    def _get_session(self) -> aiohttp.ClientSession:
        # Built lazily: the core may construct providers before its event loop runs.
        if self._session is None or self._session.closed:
            timeout = max(self._settings.sync_timeout_seconds, self._settings.timeout_seconds)
            self._session = self._services.http_session([self.base_url], timeout=timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    def absolute(self, path_or_url: str) -> str:
        """A path relative to the base URL, or a full URL (a ``_links.next`` href), as an absolute URL."""
        if path_or_url.startswith(("http://", "https://")):
            return path_or_url
        if path_or_url.startswith("/") and not path_or_url.startswith(urlsplit(self.base_url).path + "/"):
            return self.base_url + path_or_url
        return urljoin(self.base_url + "/", path_or_url)

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        params: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
        sync: bool = False,
        retry: Retry = Retry.IDEMPOTENT,
    ) -> Any:
        """One API call; returns the parsed JSON body (``None`` for an empty one).

        :param sync: the call may make Powens check with the bank, so it gets ``sync_timeout_seconds`` (§3.1).
        """
        url = self.absolute(path)
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        timeout = self._settings.sync_timeout_seconds if sync else self._settings.timeout_seconds
        attempt = 0
        locked = 0
        while True:
            attempt += 1
            try:
                return await self._once(method, url, headers, params, body, timeout)
            except PowensAPIError as exc:
                if exc.code_cf == "connectionlocked" and locked < LOCKED_RETRIES:
                    locked += 1
                    await self._sleep(LOCKED_WAIT)
                    continue
                throttled = exc.status in (429, 503)
                may = (throttled and retry is not Retry.NEVER) or (
                    exc.status >= 500 and retry is Retry.IDEMPOTENT
                )
                if not may or attempt >= MAX_ATTEMPTS:
                    raise
                await self._sleep(self._delay(attempt, exc.retry_after))
            except PowensUnreachable:
                if retry is not Retry.IDEMPOTENT or attempt >= MAX_ATTEMPTS:
                    raise
                await self._sleep(self._delay(attempt, None))

    @staticmethod
    def _delay(attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(BACKOFF_CAP, retry_after)
        # Full jitter, so many feeds retrying at once do not hit Powens in step.
        return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempt - 1)))

    async def _once(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        params: Mapping[str, str] | None,
        body: Mapping[str, Any] | None,
        timeout: float,
    ) -> Any:
        await self.limiter.acquire()
        session = self._get_session()
        path = urlsplit(url).path
        started = time.monotonic()
        try:
            async with session.request(
                method,
                url,
                params=dict(params) if params else None,
                json=dict(body) if body is not None else None,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                raw = await response.read()
                status = response.status
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            log.warning(
                "powens call got no answer", extra={"method": method, "path": path, "error": type(exc).__name__}
            )
            raise PowensUnreachable(type(exc).__name__) from None
        except aiohttp.ClientError as exc:
            # The guarded session refuses redirects and foreign origins: Powens never redirects an API call.
            log.warning("powens call refused", extra={"method": method, "path": path, "error": type(exc).__name__})
            raise PowensBadAnswer(type(exc).__name__) from None
        elapsed = round(time.monotonic() - started, 3)
        if 200 <= status < 300:
            if not raw.strip():
                return None
            try:
                return loads(raw)
            except (ValueError, UnicodeDecodeError):
                log.warning("powens answer is not JSON", extra={"method": method, "path": path, "status": status})
                raise PowensBadAnswer("not JSON") from None
        error = self._error(status, raw, retry_after)
        log.info(
            "powens call failed",
            extra={
                "method": method,
                "path": path,
                "status": status,
                "code": error.code,
                "request_id": error.request_id,
                "elapsed": elapsed,
            },
        )
        raise error

    @staticmethod
    def _error(status: int, raw: bytes, retry_after: float | None) -> PowensAPIError:
        try:
            data = loads(raw) if raw.strip() else {}
        except (ValueError, UnicodeDecodeError):
            data = {}
        if not isinstance(data, dict):
            data = {}

        def text(key: str) -> str | None:
            value = data.get(key)
            return value if isinstance(value, str) and value else None

        return PowensAPIError(
            status,
            text("code"),
            description=text("description"),
            message=text("message"),
            request_id=data.get("request_id"),
            retry_after=retry_after,
        )
