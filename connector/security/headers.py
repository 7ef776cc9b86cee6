"""Security headers on every response (security.md P3, P5, P7).

Pages a person sees may be framed only by ``security.frame_ancestors``; everything else (JSON endpoints, unknown
paths) carries ``frame-ancestors 'none'``. No ``X-Frame-Options``: it cannot express a list, and CSP supersedes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class SecurityHeaders:
    def __init__(self, public_url: str, frame_ancestors: Sequence[str], redirect_hosts: Sequence[str],
                 allow_loopback: bool) -> None:
        # Browsers may check form-action on the redirect that ends a post, so Sage's hosts are listed too.
        targets = [f"https://{h}" for h in redirect_hosts]
        if allow_loopback:
            targets += ["http://127.0.0.1:*", "http://localhost:*"]
        ancestors = " ".join(frame_ancestors) or "'none'"
        common = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; " \
                 "object-src 'none'; base-uri 'none'"
        self.page_csp = (f"{common}; form-action 'self' {_origin(public_url)} {' '.join(targets)}; "
                         f"frame-ancestors {ancestors}")
        self.other_csp = f"{common}; form-action 'none'; frame-ancestors 'none'"
        self.https = public_url.startswith("https://")

    def apply(self, headers: dict | object, *, page: bool) -> None:
        h = headers  # sanic's Header is a multidict with item assignment
        h["Content-Security-Policy"] = self.page_csp if page else self.other_csp  # type: ignore[index]
        h["X-Content-Type-Options"] = "nosniff"  # type: ignore[index]
        h["Referrer-Policy"] = "no-referrer"  # type: ignore[index]
        h["Cache-Control"] = "no-store"  # type: ignore[index]
        if self.https:
            h["Strict-Transport-Security"] = "max-age=31536000"  # type: ignore[index]
        for name in ("X-Frame-Options", "Access-Control-Allow-Origin"):
            if name in h:  # type: ignore[operator]
                del h[name]  # type: ignore[attr-defined]
