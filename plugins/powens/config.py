"""The ``[providers.powens]`` table and the Powens options of a ``[[banks]]`` entry (powens.md §1.5).

Both are checked here, key by key, so ``connector check-config`` can name the key that holds each problem; unknown
keys are problems too, because a typo must not silently change behaviour (product: unknown keys are errors).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from connector.hookspecs import BankInfo

DOMAIN_RE = re.compile(r"[a-z\d]+(-[a-z\d]+)*")
CLIENT_ID_RE = re.compile(r"\d+")
# A Powens connector uuid; the deprecated numeric id is still accepted by GET /connectors/{id} (§2.1).
CONNECTOR_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|\d+")
SOURCE_NAME_RE = re.compile(r"[a-z]+")

DEFAULTS: dict[str, Any] = {
    "requests_per_minute": 30,
    "sync_timeout_seconds": 180.0,
    "timeout_seconds": 30.0,
    "poll_interval_minutes": 360,
}
# key -> (minimum, maximum) for the numeric keys.
NUMERIC_BOUNDS: dict[str, tuple[float, float]] = {
    "requests_per_minute": (1, 1_000_000),
    "sync_timeout_seconds": (0.01, 900),
    "timeout_seconds": (0.01, 300),
    "poll_interval_minutes": (1, 10_080),
}
STRING_KEYS = ("domain", "base_url", "client_id", "client_secret", "webhook_secret")
KNOWN_KEYS = frozenset(STRING_KEYS) | frozenset(NUMERIC_BOUNDS)
BANK_OPTION_KEYS = frozenset({"sources", "account_types", "offer_more_sources"})


@dataclass(frozen=True, slots=True)
class Settings:
    """The checked config, with defaults applied."""

    base_url: str
    client_id: str
    client_secret: str
    webhook_secret: str | None
    requests_per_minute: int
    sync_timeout_seconds: float
    timeout_seconds: float
    poll_interval_minutes: int


@dataclass(frozen=True, slots=True)
class BankOptions:
    """``[[banks]].options`` for a Powens bank.

    :ivar sources: source names allowed for this bank (empty: all enabled sources).
    :ivar account_types: Powens account types to offer (empty: all), e.g. ``["checking", "card"]``.
    :ivar offer_more_sources: offer "Add more accounts" when another source remains.
    """

    sources: tuple[str, ...] = ()
    account_types: tuple[str, ...] = ()
    offer_more_sources: bool = True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_problem(value: str) -> str | None:
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "must be an http(s) URL such as https://acme-sandbox.biapi.pro/2.0"
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        return "must use https (plain http is only allowed for loopback test servers)"
    if parts.query or parts.fragment:
        return "must not carry a query string or fragment"
    return None


def check_config(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for key in sorted(set(config) - KNOWN_KEYS):
        problems.append((key, "unknown key for the powens provider"))
    for key in STRING_KEYS:
        if key in config and not isinstance(config[key], str):
            problems.append((key, "must be a string"))
    for key, (low, high) in NUMERIC_BOUNDS.items():
        if key not in config:
            continue
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append((key, "must be a number"))
        elif not low <= value <= high:
            problems.append((key, f"must be between {low:g} and {high:g}"))
    for key in ("requests_per_minute", "poll_interval_minutes"):
        if isinstance(config.get(key), float):
            problems.append((key, "must be a whole number"))

    domain, base_url = config.get("domain"), config.get("base_url")
    if isinstance(domain, str) and not DOMAIN_RE.fullmatch(domain):
        problems.append(("domain", "must look like acme-sandbox (lower-case letters, digits and single dashes)"))
    if isinstance(base_url, str):
        if problem := _url_problem(base_url):
            problems.append(("base_url", problem))
    if not domain and not base_url:
        problems.append(("domain", "is required (or set base_url)"))
    client_id = config.get("client_id")
    if not client_id:
        problems.append(("client_id", "is required"))
    elif isinstance(client_id, str) and not CLIENT_ID_RE.fullmatch(client_id):
        problems.append(("client_id", "must be digits only"))
    if not config.get("client_secret"):
        problems.append(("client_secret", "is required"))
    if "webhook_secret" in config and config["webhook_secret"] == "":
        problems.append(("webhook_secret", "must not be empty (leave it out to receive no webhooks)"))
    return problems


def settings_from(config: Mapping[str, Any]) -> Settings:
    """Build :class:`Settings` from a table that :func:`check_config` accepted."""
    merged = {**DEFAULTS, **config}
    base_url = merged.get("base_url") or f"https://{merged['domain']}.biapi.pro/2.0"
    return Settings(
        base_url=str(base_url).rstrip("/"),
        client_id=str(merged["client_id"]),
        client_secret=str(merged["client_secret"]),
        webhook_secret=merged.get("webhook_secret") or None,
        requests_per_minute=int(merged["requests_per_minute"]),
        sync_timeout_seconds=float(merged["sync_timeout_seconds"]),
        timeout_seconds=float(merged["timeout_seconds"]),
        poll_interval_minutes=int(merged["poll_interval_minutes"]),
    )


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def check_bank(bank: BankInfo) -> Iterable[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if not bank.provider_bank:
        problems.append(("provider_bank", "is required: the Powens connector uuid of this bank"))
    elif not CONNECTOR_RE.fullmatch(bank.provider_bank):
        problems.append(("provider_bank", "must be a Powens connector uuid"))
    options = bank.options or {}
    for key in sorted(set(options) - BANK_OPTION_KEYS):
        problems.append((f"options.{key}", "unknown option for a Powens bank"))
    if "sources" in options:
        if not _str_list(options["sources"]) or not all(SOURCE_NAME_RE.fullmatch(s) for s in options["sources"]):
            problems.append(("options.sources", "must be a list of source names such as [\"directaccess\"]"))
    if "account_types" in options and not _str_list(options["account_types"]):
        problems.append(("options.account_types", "must be a list of Powens account types such as [\"checking\"]"))
    if "offer_more_sources" in options and not isinstance(options["offer_more_sources"], bool):
        problems.append(("options.offer_more_sources", "must be true or false"))
    return problems


def bank_options(bank: BankInfo) -> BankOptions:
    options = bank.options or {}
    return BankOptions(
        sources=tuple(options.get("sources", ())),
        account_types=tuple(t.casefold() for t in options.get("account_types", ())),
        offer_more_sources=bool(options.get("offer_more_sources", True)),
    )
