"""``redirect_uri`` checks and the redirect back to Sage (product Decision 1, spec 2.7).

The URI is refused unless it is absolute https (plain http only for loopback hosts when config allows it) and its
host matches ``security.redirect_hosts``. ``state`` is appended; everything else stays byte for byte.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from urllib.parse import quote, urlsplit

_LOOPBACK = {"localhost", "127.0.0.1", "[::1]", "::1"}
# A host as browsers would read it: labels of letters, digits and dashes (no userinfo, no backslash, no dot at end).
_HOST = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
_STATE = re.compile(r"^[A-Za-z0-9\-._~]{1,512}$")


def redirect_allowed(uri: str, hosts: Sequence[str], *, allow_loopback: bool = False) -> bool:
    if not uri or len(uri) > 2048 or any(c in uri for c in "\\ ") or not uri.isascii() \
            or any(ord(c) < 0x20 or c == "\x7f" for c in uri):  # control characters (NUL, CR, LF, tab, ...)
        return False
    try:
        parts = urlsplit(uri)
        port = parts.port  # raises on a malformed port
    except ValueError:
        return False
    netloc = parts.netloc
    if "@" in netloc or not parts.hostname:
        return False
    host = parts.hostname
    if parts.scheme == "http":
        return allow_loopback and host in _LOOPBACK
    if parts.scheme != "https":
        return False
    if allow_loopback and host in _LOOPBACK:
        return True
    del port
    if not _HOST.match(host) or host.startswith("xn--") or ".xn--" in host:
        return False  # punycode look-alikes are refused rather than decoded
    return any(_host_matches(host, pattern.lower()) for pattern in hosts)


def _host_matches(host: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        # "*.sage.com" covers sub-domains of sage.com at any depth, never sage.com.evil.example.
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return fnmatch.fnmatchcase(host, pattern)


def state_valid(state: str) -> bool:
    return bool(_STATE.match(state))


def compose_redirect(uri: str, state: str) -> str:
    """``uri`` with ``state=<state>`` appended before any fragment (spec 2.7)."""
    base, hash_, fragment = uri.partition("#")
    if base.endswith(("?", "&")):
        sep = ""
    elif "?" in base:
        sep = "&"
    else:
        sep = "?"
    return f"{base}{sep}state={quote(state, safe='-._~')}{hash_}{fragment}"
