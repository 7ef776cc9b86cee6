"""The Sage Provider API client: Sage ID token, one shared rate limiter, retries (spec section 3)."""

from connector.sage.client import ClientStats, SageClient, SageError, parse_retry_after
from connector.sage.ratelimit import Backoff, RateLimiter

__all__ = ["Backoff", "ClientStats", "RateLimiter", "SageClient", "SageError", "parse_retry_after"]
