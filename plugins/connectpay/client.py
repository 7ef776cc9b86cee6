"""Outbound HTTP toward one ConnectPay host: pacing, X-Request-ID, safe logs, and the transport-level error rules.

Every call goes through a session from ``services.http_session`` (origins limited, no redirects). This module turns
transport failures, ``429`` and ``5xx`` into :class:`~connector.types.TemporaryError` (connectpay.md §7.2) and hands
every other answer back as a :class:`Reply` for the caller to classify, because what a ``401`` or ``404`` means
depends on the call.

No in-call retry loop: the core's feed schedules retries from ``retry_after`` and a person in a journey gets a clear
"try again" page at once instead of a minute of waiting. (The one retry the spec asks for — a refresh after a
timeout — is done by the psd2 module.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urljoin

import aiohttp

from connector.outbound import origin, parse_retry_after
from plugins.connectpay import errors
from plugins.connectpay.mapping import MappingError, parse_error

log = logging.getLogger("plugins.connectpay.http")


class Pacer:
    """Client-side limiter per host: ``rate`` request starts per second and at most ``concurrency`` in flight
    (OP-25), so a feed burst never earns a 429."""

    def __init__(self, rate: float, concurrency: int) -> None:
        self._interval = 1.0 / rate
        self._semaphore = asyncio.Semaphore(concurrency)
        self._next = 0.0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._semaphore:
            now = asyncio.get_running_loop().time()
            start = max(now, self._next)
            self._next = start + self._interval  # reserved before sleeping, so waiters queue in order
            if start > now:
                await asyncio.sleep(start - now)
            yield


@dataclass(slots=True)
class Reply:
    """A ConnectPay answer the transport layer let through (not 429/5xx)."""

    status: int
    body: bytes
    headers: Mapping[str, str]
    request_id: str
    template: str
    _decoded: Any = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def json(self) -> Any:
        """The decoded body; malformed JSON is a :class:`MappingError` (schema drift, handled like one)."""
        if self._decoded is None:
            try:
                self._decoded = json.loads(self.body.decode("utf-8")) if self.body.strip() else {}
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise MappingError("$", "not valid JSON") from None
        return self._decoded

    def error(self) -> tuple[str | None, str | None]:
        """(code, message) of an error body, whatever its shape; (None, None) when unreadable."""
        try:
            return parse_error(self.json())
        except MappingError:
            return None, None

    def detail(self) -> str:
        code, message = self.error()
        return " — ".join(p for p in (f"HTTP {self.status}", code, message) if p)


class Endpoint:
    """One ConnectPay host (the mTLS host or the 1-way host), with its own session and pacer."""

    def __init__(
        self,
        base_url: str,
        session_factory: Callable[[], aiohttp.ClientSession],
        pacer: Pacer,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._factory = session_factory
        self._session: aiohttp.ClientSession | None = None
        self._pacer = pacer

    def _client(self) -> aiohttp.ClientSession:
        # Built on first use: an aiohttp session belongs to the running event loop.
        if self._session is None or self._session.closed:
            self._session = self._factory()
        return self._session

    def resolve(self, href: str) -> str | None:
        """A ``_links.next`` href made absolute against this host; ``None`` if it points anywhere else."""
        url = urljoin(self.base_url + "/", href)
        # Compared with default ports filled in: https://host:443/... is this host too.
        if origin(url) != origin(self.base_url):
            return None
        return url

    async def call(
        self,
        method: str,
        template: str,
        *,
        path_params: Mapping[str, str] | None = None,
        url: str | None = None,
        params: Mapping[str, str] | None = None,
        form: Mapping[str, str] | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """Send one request. ``template`` is the path template (what gets logged); ``url`` overrides the built URL
        (a followed ``next`` link)."""
        target = url or self.base_url + template.format(
            **{k: quote(v, safe="") for k, v in (path_params or {}).items()}
        )
        request_id = str(uuid.uuid4())
        sent = {"X-Request-ID": request_id, "Accept": "application/json", **(headers or {})}
        kwargs: dict[str, Any] = {"headers": sent, "params": params}
        if form is not None:
            kwargs["data"] = dict(form)
        elif json_body is not None:
            kwargs["json"] = json_body
        try:
            async with self._pacer.slot(), self._client().request(method, target, **kwargs) as response:
                body = await response.read()
                reply = Reply(response.status, body, dict(response.headers), request_id, template)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            log.warning("ConnectPay call timed out", extra={"path": template, "request_id": request_id})
            raise errors.timeout() from None
        except (aiohttp.ClientSSLError, ssl.SSLError):
            log.error("TLS with ConnectPay failed (client certificate?)",
                      extra={"path": template, "request_id": request_id})
            raise errors.tls_failed() from None
        except aiohttp.ClientError as exc:
            log.warning("ConnectPay unreachable", extra={"path": template, "request_id": request_id,
                                                         "error": type(exc).__name__})
            raise errors.unavailable(detail=type(exc).__name__) from None
        code, _ = reply.error() if not reply.ok else (None, None)
        log.info("ConnectPay call", extra={"path": template, "method": method, "status": reply.status,
                                           "request_id": request_id, "code": code})
        if reply.status == 429:
            raise errors.rate_limited(parse_retry_after(reply.headers.get("Retry-After")))
        if reply.status >= 500:
            raise errors.unavailable(reply.detail(), parse_retry_after(reply.headers.get("Retry-After")))
        if 300 <= reply.status < 400:  # the guarded session already refuses these; never followed
            raise errors.unavailable(reply.detail())
        return reply

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None
