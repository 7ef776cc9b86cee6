"""The Sage Provider API client (spec 3.1–3.7, Decisions (proposed) 7.19–7.30).

One :class:`SageClient` per process. It owns the Sage ID client-credentials token (memory only, single-flight
refresh) and sends every Provider API call through the shared :class:`~connector.sage.ratelimit.RateLimiter`.
Retries follow spec 3.3:

- 401: drop the token, fetch a new one, replay once; a second 401 is :class:`SageError` ``unauthorized``;
- 429: pause the whole client (``Retry-After`` in seconds or as an HTTP date, else jittered backoff), then repeat the
  request unchanged;
- 5xx, timeouts, connection errors: retry with backoff, resending identical bytes;
- anything else: no retry.

Interactive calls (the PATCH a person waits for) get their own budget: at most 3 attempts within 15 s, a
``Retry-After`` honoured only up to 5 s, and priority in the limiter.

Nothing here logs or raises a token, the client secret, the API key or a request body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from multidict import CIMultiDict

from connector.outbound import parse_retry_after
from connector.sage.ratelimit import Backoff, Clock, RateLimiter

log = logging.getLogger("connector.sage")

#: Spec 3.2: the token is refreshed this long before ``expires_in`` runs out …
TOKEN_REFRESH_MARGIN = 300.0
#: … and kept this long when Sage ID sends no ``expires_in`` (475 minutes).
TOKEN_DEFAULT_LIFETIME = 475 * 60.0
#: Sage's error text is kept for logs and operators, but short and on one line.
DETAIL_LIMIT = 300

_SUCCESS_PATCH = frozenset({200, 201, 204})
_TOKEN_CONFIG_ERRORS = frozenset({400, 401, 403})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


class SageError(Exception):
    """A Provider API call that did not succeed.

    ``reason`` is a stable code for feed states, metrics and error pages:

    - ``unauthorized``: a second 401 after a fresh token (wrong API key or credentials);
    - ``token_rejected``: Sage ID refused our client credentials or audience (a configuration error);
    - ``rejected``: Sage refused the request (a 4xx other than 401/429; see ``status``);
    - ``throttled``: still 429 when the retry budget ran out, or a ``Retry-After`` beyond an interactive budget;
    - ``unavailable``: 5xx, timeouts or connection errors until the retry budget ran out;
    - ``unexpected_response``: a 2xx whose body is not what the contract says (e.g. no ``data._id``);
    - ``refused_origin``: the guarded session refused the call (an origin outside config, or a redirect).

    ``detail`` is Sage's error text, sanitised and truncated; it never holds a secret.
    """

    def __init__(self, reason: str, *, status: int | None = None, detail: str | None = None) -> None:
        self.reason = reason
        self.status = status
        self.detail = detail
        text = reason if status is None else f"{reason} (HTTP {status})"
        super().__init__(f"{text}: {detail}" if detail else text)


@dataclass
class ClientStats:
    """Counters for metrics and benchmarks."""

    requests: int = 0  # Provider API requests sent (each attempt counts)
    throttled: int = 0  # 429 answers
    retries: int = 0  # attempts repeated after a 429, 5xx, timeout or connection error
    timeouts: int = 0
    token_fetches: int = 0  # requests to the Sage ID token endpoint
    unauthorized: int = 0  # Provider API 401 answers


@dataclass(frozen=True)
class _Token:
    header: str  # "<token_type> <access_token>"; never logged
    refresh_at: float


@dataclass(frozen=True)
class _Response:
    status: int
    headers: Mapping[str, str]  # case-insensitive: HTTP/2 proxies lowercase names (retry-after)
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


@dataclass(frozen=True)
class _Policy:
    """How hard one kind of call tries."""

    max_attempts: int
    read_timeout: float
    priority: bool = False
    budget: float | None = None  # seconds for the whole call, retries included
    max_retry_after: float | None = None  # a longer Retry-After ends the call at once
    delays: Sequence[float] = ()  # fixed pauses between attempts (jittered); else exponential backoff


class _Retryable(Exception):
    """One failed attempt worth repeating (429, 5xx, timeout, connection error)."""

    def __init__(self, reason: str, *, status: int | None = None, detail: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.detail = detail


class SageClient:
    """The Provider API as the connector uses it.

    ``session`` belongs to the caller (build it with :func:`connector.outbound.guarded_session` for the token URL and
    the API URL) and is not closed here. ``limiter`` is the one limiter of the process.
    """

    @classmethod
    def from_settings(cls, session: aiohttp.ClientSession, sage: Mapping[str, Any], limiter: RateLimiter) -> SageClient:
        """The client for the config's ``[sage]`` table (``Settings.sage``), with the default timeouts and retries."""
        return cls(session, token_url=sage["token_url"], client_id=sage["client_id"],
                   client_secret=sage["client_secret"], token_audience=sage["token_audience"],
                   api_url=sage["provider_api_url"], api_key=sage["api_key"], limiter=limiter)

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        token_url: str,
        client_id: str,
        client_secret: str,
        token_audience: str,
        api_url: str,
        api_key: str,
        limiter: RateLimiter,
        connect_timeout: float = 5,
        read_timeout: float = 30,
        interactive_read_timeout: float = 10,
        max_attempts: int = 5,
        interactive_attempts: int = 3,
        interactive_budget: float = 15.0,
        interactive_max_retry_after: float = 5.0,
        interactive_delays: Sequence[float] = (0.5, 1.5),
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        clock: Clock = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if max_attempts < 1 or interactive_attempts < 1:
            raise ValueError("attempts must be at least 1")
        self._session = session
        self._token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._audience = token_audience
        self._api_url = api_url.rstrip("/")
        self._api_key = api_key
        self._limiter = limiter
        self._connect_timeout = connect_timeout
        self._clock = clock
        self._rng = rng
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._background = _Policy(max_attempts=max_attempts, read_timeout=read_timeout)
        self._interactive = _Policy(
            max_attempts=interactive_attempts,
            read_timeout=interactive_read_timeout,
            priority=True,
            budget=interactive_budget,
            max_retry_after=interactive_max_retry_after,
            delays=tuple(interactive_delays),
        )
        self._token: _Token | None = None
        self._token_lock = asyncio.Lock()
        # Spec 3.2: a refused token request is a configuration error, retried with backoff up to 5 minutes apart;
        # in between, calls fail fast instead of hammering Sage ID.
        self._token_backoff = Backoff(backoff_base, 300.0, rng=rng)
        self._token_blocked_until = float("-inf")
        self.stats = ClientStats()

    # -- Provider API ------------------------------------------------------------------------------------------

    async def patch_authorisation(self, authorisation_id: str, bank_accounts: list[dict] | None) -> None:
        """Report a successful onboarding (``bank_accounts``: every account of the consent) or re-authorisation
        (``None``: the body carries no ``bankAccounts`` key, product Decision 4). Spec 3.4, 7.21.
        """
        data: dict[str, Any] = {"status": "success"}
        if bank_accounts is not None:
            data["bankAccounts"] = bank_accounts
        path = f"/v1/authorisations/{quote(authorisation_id, safe='')}"
        # The authorisation id guards /auth, so logs name the endpoint, not the path.
        response = await self._call("PATCH authorisation", "PATCH", path, _dumps({"data": data}), self._interactive)
        if 200 <= response.status < 300 and response.status not in _SUCCESS_PATCH:
            raise SageError("unexpected_response", status=response.status, detail="not 200, 201 or 204")
        if response.status not in _SUCCESS_PATCH:
            raise self._refusal(response)

    async def post_statement(self, body: bytes) -> str:
        """Send one statement exactly as given (the feed persisted these bytes first) and return ``data._id``.

        5xx and timeouts are resent with the same bytes (Sage says this is safe, spec 3.5.7). A 2xx without a
        string ``data._id`` is ``unexpected_response`` and is not resent (7.22).
        """
        response = await self._call("POST statement", "POST", "/v1/statements", body, self._background)
        if not 200 <= response.status < 300:
            raise self._refusal(response)
        statement_id = _dig(response.json(), "data", "_id")
        if not isinstance(statement_id, str) or not statement_id:
            raise SageError("unexpected_response", status=response.status, detail="no data._id in the answer")
        return statement_id

    async def get_statement(self, statement_id: str) -> dict[str, Any]:
        """A statement's progress: ``data`` (``_id``, ``status``, ``errors``). 404 is ``{"status": "unknown"}``,
        which the feed treats as still processing (7.19).
        """
        path = f"/v1/statements/{quote(statement_id, safe='')}"
        response = await self._call("GET statement", "GET", path, None, self._background)
        if response.status == 404:
            return {"status": "unknown"}
        if not 200 <= response.status < 300:
            raise self._refusal(response)
        data = _dig(response.json(), "data")
        if not isinstance(data, dict):
            raise SageError("unexpected_response", status=response.status, detail="no data object in the answer")
        return data

    async def post_banks(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create or update banks (spec 3.7). Returns Sage's whole JSON answer; its shape is not documented."""
        response = await self._call("POST banks", "POST", "/v1/banks", _dumps(body), self._background)
        if not 200 <= response.status < 300:
            raise self._refusal(response)
        answer = response.json()
        if not isinstance(answer, dict):
            raise SageError("unexpected_response", status=response.status, detail="the answer is not a JSON object")
        return answer

    # -- the retry loop ----------------------------------------------------------------------------------------

    async def _call(self, label: str, method: str, path: str, body: bytes | None, policy: _Policy) -> _Response:
        """Send until a final answer (anything but 401-once, 429, 5xx) arrives, within ``policy``."""
        if policy.budget is None:
            return await self._attempts(label, method, path, body, policy, deadline=None)
        deadline = self._clock() + policy.budget
        try:
            async with asyncio.timeout(policy.budget):
                return await self._attempts(label, method, path, body, policy, deadline=deadline)
        except TimeoutError:
            log.warning("sage call gave up: interactive budget spent", extra={"endpoint": label})
            raise SageError("unavailable", detail=f"no answer within {policy.budget:g} s") from None

    async def _attempts(
        self, label: str, method: str, path: str, body: bytes | None, policy: _Policy, *, deadline: float | None
    ) -> _Response:
        backoff = Backoff(self._backoff_base, self._backoff_cap, rng=self._rng)
        replayed = False
        attempt = 0
        while True:
            attempt += 1
            try:
                token = await self._current_token()
                if deadline is not None and not self._can_wait(self._limiter.pause_remaining(), policy, deadline):
                    # The client is paused after a 429 for longer than the person can wait.
                    raise SageError("throttled", detail="the client is paused after a 429")
                await self._limiter.acquire(priority=policy.priority)
                response = await self._send(method, path, body, token, policy, deadline)
                if response.status == 401:
                    self.stats.unauthorized += 1
                    self._discard(token)
                    if replayed:
                        raise SageError("unauthorized", status=401, detail=self._detail(response))
                    # A replay after a fresh token is not a retry of the attempt budget (spec 3.2).
                    replayed = True
                    attempt -= 1
                    continue
                if response.status == 429:
                    self._on_429(response, policy, deadline)
                    raise _Retryable("throttled", status=429)
                if response.status >= 500:
                    raise _Retryable("unavailable", status=response.status, detail=self._detail(response))
                self._limiter.recovered()
                return response
            except _Retryable as failure:
                if attempt >= policy.max_attempts:
                    log.warning(
                        "sage call failed after %d attempts", attempt,
                        extra={"endpoint": label, "status": failure.status, "reason": failure.reason},
                    )
                    raise SageError(failure.reason, status=failure.status, detail=failure.detail) from None
                delay = 0.0 if failure.status == 429 else self._retry_delay(policy, attempt, backoff)
                if deadline is not None and self._clock() + delay + self._limiter.pause_remaining() > deadline:
                    raise SageError(failure.reason, status=failure.status, detail=failure.detail) from None
                self.stats.retries += 1
                log.info(
                    "sage call retried", extra={"endpoint": label, "status": failure.status, "attempt": attempt}
                )
                # After a 429 the limiter holds this request (and every other) until the pause ends.
                if delay > 0:
                    await asyncio.sleep(delay)

    async def _send(
        self, method: str, path: str, body: bytes | None, token: _Token, policy: _Policy, deadline: float | None
    ) -> _Response:
        headers = {
            "x-api-key": self._api_key,
            "Authorization": token.header,
            "Accept": "application/json",
        }
        if body is not None:
            headers["Content-Type"] = "application/json"
        total = self._connect_timeout + policy.read_timeout
        if deadline is not None:
            total = max(0.001, min(total, deadline - self._clock()))
        timeout = aiohttp.ClientTimeout(total=total, sock_connect=self._connect_timeout, sock_read=policy.read_timeout)
        self.stats.requests += 1
        try:
            async with self._session.request(
                method, self._api_url + path, data=body, headers=headers, timeout=timeout, allow_redirects=False
            ) as resp:
                return _Response(resp.status, CIMultiDict(resp.headers), await resp.read())
        except TimeoutError:
            self.stats.timeouts += 1
            raise _Retryable("unavailable", detail="timed out") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise _Retryable("unavailable", detail=type(exc).__name__) from None
        except aiohttp.ClientError as exc:
            # ForbiddenOrigin and friends: a configuration problem or a redirect; repeating cannot help.
            raise SageError("refused_origin", detail=_sanitise(str(exc), self._secrets())) from None

    def _on_429(self, response: _Response, policy: _Policy, deadline: float | None) -> None:
        """Pause the whole client; end an interactive call whose wait would not fit its budget."""
        self.stats.throttled += 1
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        pause = self._limiter.throttled(retry_after)
        if deadline is not None and not self._can_wait(pause, policy, deadline):
            raise SageError("throttled", status=429, detail=f"Sage asked us to wait {pause:.3g} s")

    def _can_wait(self, pause: float, policy: _Policy, deadline: float) -> bool:
        """Whether an interactive call may sit out a pause: at most ``max_retry_after`` and within its budget."""
        within_limit = policy.max_retry_after is None or pause <= policy.max_retry_after
        return within_limit and self._clock() + pause <= deadline

    def _retry_delay(self, policy: _Policy, attempt: int, backoff: Backoff) -> float:
        if policy.delays:
            base = policy.delays[min(attempt, len(policy.delays)) - 1]
            return base * (0.8 + 0.4 * self._rng())  # "about 0.5 s, then 1.5 s" (7.21), jittered ±20 %
        return backoff.next()

    # -- Sage ID token -----------------------------------------------------------------------------------------

    async def _current_token(self) -> _Token:
        token = self._token
        if token is not None and self._clock() < token.refresh_at:
            return token
        async with self._token_lock:  # single flight: concurrent callers wait for one fetch
            token = self._token
            if token is not None and self._clock() < token.refresh_at:
                return token
            self._token = await self._fetch_token()
            return self._token

    def _discard(self, token: _Token) -> None:
        # Only the token that got the 401: a newer one fetched meanwhile by another call stays.
        if self._token is token:
            self._token = None

    async def _fetch_token(self) -> _Token:
        if self._clock() < self._token_blocked_until:
            raise SageError("token_rejected", detail="Sage ID refused our credentials; waiting before asking again")
        form = {
            "grant_type": "client_credentials",
            "client_id": self._client_id,
            "client_secret": self._client_secret,
            "audience": self._audience,
        }
        timeout = aiohttp.ClientTimeout(
            total=self._connect_timeout + self._background.read_timeout,
            sock_connect=self._connect_timeout,
            sock_read=self._background.read_timeout,
        )
        self.stats.token_fetches += 1
        started = self._clock()
        try:
            async with self._session.post(
                self._token_url, data=form, headers={"Accept": "application/json"}, timeout=timeout,
                allow_redirects=False,
            ) as resp:
                response = _Response(resp.status, CIMultiDict(resp.headers), await resp.read())
        except TimeoutError:
            raise _Retryable("unavailable", detail="token endpoint timed out") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise _Retryable("unavailable", detail=f"token endpoint: {type(exc).__name__}") from None
        except aiohttp.ClientError as exc:
            raise SageError("refused_origin", detail=_sanitise(str(exc), self._secrets())) from None

        if response.status in _TOKEN_CONFIG_ERRORS:
            self._token_blocked_until = self._clock() + self._token_backoff.next()
            log.error("Sage ID refused the client credentials", extra={"status": response.status})
            raise SageError("token_rejected", status=response.status, detail=self._detail(response))
        if response.status == 429 or response.status >= 500:
            raise _Retryable("unavailable", status=response.status, detail="token endpoint unavailable")
        answer = response.json()
        access_token = _dig(answer, "access_token")
        if not 200 <= response.status < 300 or not isinstance(access_token, str) or not access_token:
            raise SageError("unexpected_response", status=response.status, detail="no access_token from Sage ID")
        token_type = answer.get("token_type")
        if not isinstance(token_type, str) or not token_type.strip():
            token_type = "Bearer"
        self._token_backoff.reset()
        self._token_blocked_until = float("-inf")
        return _Token(f"{token_type.strip()} {access_token}", started + _lifetime(answer.get("expires_in")))

    # -- error text --------------------------------------------------------------------------------------------

    def _secrets(self) -> list[str]:
        secrets = [self._client_secret, self._api_key]
        if self._token is not None:
            secrets.append(self._token.header.split(" ", 1)[-1])
        return secrets

    def _detail(self, response: _Response) -> str | None:
        return _error_text(response.body, self._secrets())

    def _refusal(self, response: _Response) -> SageError:
        detail = self._detail(response)
        log.warning("sage refused the request", extra={"status": response.status, "detail": detail})
        return SageError("rejected", status=response.status, detail=detail)


# -- helpers -------------------------------------------------------------------------------------------------------


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _dig(value: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _lifetime(expires_in: Any) -> float:
    """How long to keep a token: 5 minutes short of ``expires_in`` (spec 3.2).

    A lifetime shorter than twice the margin (only seen in tests and odd set-ups) is halved instead, so a short-lived
    token is still reused rather than refetched on every call.
    """
    if isinstance(expires_in, str) and expires_in.strip().isdigit():
        expires_in = int(expires_in)
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
        return TOKEN_DEFAULT_LIFETIME
    return max(expires_in - TOKEN_REFRESH_MARGIN, expires_in / 2)


def _error_text(body: bytes, secrets: Sequence[str]) -> str | None:
    """Sage's error text for logs: the known JSON shapes, else the raw text; one line, short, no secrets."""
    if not body:
        return None
    try:
        answer = json.loads(body)
    except ValueError:
        return _sanitise(body.decode("utf-8", "replace"), secrets)
    parts: list[str] = []
    if isinstance(answer, dict):
        errors = answer.get("errors", _dig(answer, "data", "errors"))
        for key in ("error", "code", "message", "error_description", "detail"):
            if isinstance(answer.get(key), str):
                parts.append(answer[key])
        if isinstance(errors, list):
            for error in errors[:5]:
                if isinstance(error, dict):
                    parts.extend(str(error[k]) for k in ("code", "message") if isinstance(error.get(k), str | int))
                elif isinstance(error, str):
                    parts.append(error)
    text = ": ".join(parts) if parts else json.dumps(answer, ensure_ascii=False)
    return _sanitise(text, secrets)


def _sanitise(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    text = " ".join(_CONTROL.sub(" ", text).split())
    return text if len(text) <= DETAIL_LIMIT else text[: DETAIL_LIMIT - 1] + "…"
