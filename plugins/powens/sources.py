"""Reading a connector's sources and a connection's sources (powens.md §2.5, §3.5): plain functions on Powens JSON
that say which sources to add, in which order, which one is failing and when consent lapses."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from . import mapping
from .config import BankOptions

MECHANISMS = ("credentials", "webauth")


def usable_sources(raw: list[dict[str, Any]], default: str, options: BankOptions) -> list[dict[str, Any]]:
    """Enabled sources with the ``bank`` capability (when stated), filtered by the bank's options, lowest
    ``priority`` first (§2.5). A source without a mechanism inherits the connector's [assumed]."""
    usable = []
    for source in raw:
        if source.get("disabled"):
            continue
        capabilities = source.get("capabilities")
        if isinstance(capabilities, list) and capabilities and "bank" not in capabilities:
            continue  # Sage bank feeds need bank accounts
        if options.sources and source["name"] not in options.sources:
            continue
        kinds = source.get("account_types")
        if options.account_types and isinstance(kinds, list) and kinds:
            if not {str(k).casefold() for k in kinds} & set(options.account_types):
                continue
        mechanism = source.get("auth_mechanism") or default
        if mechanism not in MECHANISMS:
            continue
        priority = source.get("priority")
        usable.append(
            {
                "name": source["name"],
                "mechanism": mechanism,
                "priority": priority if isinstance(priority, int) else 1 << 30,
            }
        )
    return sorted(usable, key=lambda s: s["priority"])


def failing_source(connection: Mapping[str, Any]) -> str | None:
    """The first source in a non-null state: the connection shows the error of any of its sources (§3.5)."""
    for source in connection.get("sources") or []:
        name = source.get("name") if isinstance(source, dict) else None
        if isinstance(name, str) and source.get("state"):
            return name
    return None


def expiry(connection: Mapping[str, Any]) -> datetime | None:
    """The earliest consent expiry of the connection's sources (``access_expire``, about 180 days)."""
    found = [
        mapping.parse_datetime(s.get("access_expire"))
        for s in connection.get("sources") or []
        if isinstance(s, dict)
    ]
    dates = [d for d in found if d is not None]
    return min(dates) if dates else None
