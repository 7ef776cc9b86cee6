"""One rate limiter for every Provider API call (spec 3.3, Decision (proposed) 7.28).

Sage throttles at a pre-agreed rate (10 requests per second by default). Every PATCH, statement POST and GET, and
bank sync goes through one :class:`RateLimiter`, so the sum of all our traffic stays under that rate:

- a smooth token bucket (burst 1 by default) spaces requests evenly, so Sage never sees more than ``rate`` requests
  in any one-second window;
- interactive calls (the PATCH a person is waiting for) jump the queue with ``acquire(priority=True)``;
- a 429 pauses the whole client, not just the request that got it (:meth:`RateLimiter.throttled`).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]

# Requests leave a little after their token is granted and reach Sage with a little jitter. Without headroom, two
# requests granted exactly 1 s apart can land 0.99 s apart and trip a strict one-second window. 3 % keeps the feed
# at 97 % of the agreed rate (the bar is 95 %) with about 30 ms of slack at 10 rps.
DEFAULT_HEADROOM = 0.03
_EPSILON = 1e-9  # float noise: a token refilled to 0.9999999999 is a whole token


class Backoff:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**n)); :meth:`reset` after a success.

    With the defaults the ceilings run 1 s, 2 s, 4 s … and stop at 60 s (spec 3.3). Full jitter spreads clients that
    failed together so they do not come back together.
    """

    def __init__(self, base: float = 1.0, cap: float = 60.0, *, rng: Callable[[], float] = random.random) -> None:
        if base <= 0 or cap < base:
            raise ValueError("backoff needs 0 < base <= cap")
        self.base = base
        self.cap = cap
        self._rng = rng
        self.failures = 0

    def ceiling(self) -> float:
        """The upper bound of the next delay (before jitter)."""
        # min() before the power would overflow after ~1000 failures; the exponent is bounded instead.
        return min(self.cap, self.base * 2 ** min(self.failures, 64))

    def next(self) -> float:
        delay = self._rng() * self.ceiling()
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


class _Waiter:
    __slots__ = ("turn",)

    def __init__(self) -> None:
        # Set when this waiter may have become the head of the queue; the head re-checks the bucket itself.
        self.turn = asyncio.Event()


class RateLimiter:
    """An async token bucket shared by all Provider API calls.

    ``rate`` is the agreed requests per second; the bucket refills at ``rate * (1 - headroom)``. ``burst`` is the
    bucket size (default 1: requests are evenly spaced and never bunch up after an idle spell). ``clock`` and
    ``sleep`` are injectable so tests can run on a fake clock.
    """

    def __init__(
        self,
        rate: float,
        burst: int | None = None,
        clock: Clock = time.monotonic,
        *,
        sleep: Sleep = asyncio.sleep,
        headroom: float = DEFAULT_HEADROOM,
        backoff: Backoff | None = None,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if burst is not None and burst < 1:
            raise ValueError("burst must be at least 1")
        if not 0 <= headroom < 0.5:
            raise ValueError("headroom must be in [0, 0.5)")
        self.rate = float(rate)
        self.burst = burst or 1
        self.fill_rate = self.rate * (1 - headroom)
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(self.burst)
        self._refilled_at = clock()
        self._paused_until = float("-inf")
        self._priority: deque[_Waiter] = deque()
        self._normal: deque[_Waiter] = deque()
        #: client-wide 429 backoff (used when Sage sends no Retry-After); reset by :meth:`recovered`.
        self.backoff = backoff or Backoff()
        self.granted = 0
        self.pauses = 0

    # -- acquiring ---------------------------------------------------------------------------------------------

    async def acquire(self, priority: bool = False) -> None:
        """Wait for a token. Priority waiters are served before all others; each class is served first come first.

        Only the head of the queue sleeps on the clock; the others wait for their turn, so a thousand waiting
        requests cost one timer. Cancelling a waiter (e.g. an interactive budget running out) leaves the queue intact.
        """
        waiter = _Waiter()
        queue = self._priority if priority else self._normal
        queue.append(waiter)
        try:
            while True:
                if self._head() is waiter:
                    delay = self._delay()
                    if delay <= 0:
                        self._tokens -= 1
                        queue.popleft()
                        self.granted += 1
                        self._wake_head()
                        return
                    await self._sleep(delay)
                else:
                    # No await between the head check and clear(): a wake-up cannot be lost.
                    waiter.turn.clear()
                    await waiter.turn.wait()
        except BaseException:
            if waiter in queue:
                queue.remove(waiter)
                self._wake_head()
            raise

    def _head(self) -> _Waiter | None:
        if self._priority:
            return self._priority[0]
        return self._normal[0] if self._normal else None

    def _wake_head(self) -> None:
        head = self._head()
        if head is not None:
            head.turn.set()

    def _delay(self) -> float:
        """Seconds until a token may be granted (<= 0: now). Refills the bucket as a side effect."""
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._refilled_at) * self.fill_rate)
        self._refilled_at = now
        token_wait = 0.0 if self._tokens >= 1 - _EPSILON else (1 - self._tokens) / self.fill_rate
        return max(token_wait, self._paused_until - now)

    # -- pausing after a 429 -----------------------------------------------------------------------------------

    def pause_for(self, seconds: float) -> None:
        """Hold every waiter until ``seconds`` from now (a pause never shortens one already running)."""
        if seconds <= 0:
            return
        self._paused_until = max(self._paused_until, self._clock() + seconds)
        self.pauses += 1

    def pause_remaining(self) -> float:
        return max(0.0, self._paused_until - self._clock())

    def throttled(self, retry_after: float | None) -> float:
        """Sage answered 429: pause the whole client for ``retry_after``, else for the next jittered backoff.

        Returns the pause length. Without ``Retry-After``, a 429 that arrives while a pause is already running does
        not escalate the backoff: it was sent before the pause began, so it tells us nothing new.
        """
        if retry_after is None and self.pause_remaining() > 0:
            return self.pause_remaining()
        pause = retry_after if retry_after is not None else self.backoff.next()
        self.pause_for(pause)
        return pause

    def recovered(self) -> None:
        """A request got through without a 429: the next 429 starts its backoff from 1 s again."""
        self.backoff.reset()
