"""``connector banks sync``: register or update the configured banks with Sage (spec 1.4.0, 3.7, 7.29, 7.30).

- banks with a ``sage_bank_id`` go in ``toUpdate`` (identified by ``principalId`` + ``externalRef``);
- banks without one go in ``toCreate``; Sage answers each with its ``principalId``, which the admin writes into
  ``[[banks]].sage_bank_id``;
- ``toRemove`` is never sent (sandbox only anyway);
- ``externalRef`` is ``sage.aggregator_id`` for every bank; ``supportiframe`` is ``true`` (7.42);
- ``data`` is an object (7.29).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from connector.config import Bank, Settings


class BankSyncError(Exception):
    """The config cannot produce a valid sync (no aggregator id, no banks)."""


def callback_urls(public_url: str) -> dict[str, str]:
    base = public_url.rstrip("/")
    return {
        "notification": f"{base}/notification",
        "availableAccounts": f"{base}/availableaccounts",
        "auth": f"{base}/auth",
        "reAuth": f"{base}/authrefresh",
    }


def bank_entry(bank: Bank, aggregator_id: str, public_url: str) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    if bank.sage_bank_id:
        entry["principalId"] = bank.sage_bank_id
    entry.update({
        "externalRef": aggregator_id,
        "name": bank.name,
        "countryCode": bank.country_code,
        "url": bank.url,
        "supportiframe": True,
        "callbackURLs": callback_urls(public_url),
    })
    return entry


def sync_body(settings: Settings) -> dict[str, Any]:
    """The ``POST /v1/banks`` body for every configured bank."""
    aggregator_id = str(settings.sage.get("aggregator_id") or "")
    if not aggregator_id:
        raise BankSyncError("sage.aggregator_id is not set: generate a UUID once (python -c 'import uuid; "
                            "print(uuid.uuid4())') and keep it for the life of the registration")
    if not settings.banks:
        raise BankSyncError("no [[banks]] in the config")
    to_create = [bank_entry(b, aggregator_id, settings.public_url) for b in settings.banks if not b.sage_bank_id]
    to_update = [bank_entry(b, aggregator_id, settings.public_url) for b in settings.banks if b.sage_bank_id]
    data: dict[str, Any] = {}
    if to_create:
        data["toCreate"] = to_create
    if to_update:
        data["toUpdate"] = to_update
    return {"data": data}


@dataclass(frozen=True)
class SyncedBank:
    name: str
    principal_id: str
    created: bool


def read_answer(body: Mapping[str, Any], answer: Mapping[str, Any]) -> list[SyncedBank]:
    """Match Sage's answer to what was sent. Its shape is not documented: ``data.created`` / ``data.updated``
    lists (as the emulator answers) are read when present; created banks are matched by name, then by position."""
    data = answer.get("data")
    if isinstance(data, list) and data and isinstance(data[0], Mapping):
        data = data[0]
    data = data if isinstance(data, Mapping) else {}
    out: list[SyncedBank] = []
    for key, sent_key, created in (("created", "toCreate", True), ("updated", "toUpdate", False)):
        sent: Sequence[Mapping[str, Any]] = body["data"].get(sent_key, [])
        got = [b for b in data.get(key, []) if isinstance(b, Mapping)] if isinstance(data.get(key), list) else []
        by_name = {str(b.get("name")): b for b in got}
        for index, bank in enumerate(sent):
            match = by_name.get(bank["name"]) or (got[index] if index < len(got) else None)
            principal = str(match.get("principalId", "")) if match else ""
            out.append(SyncedBank(bank["name"], principal or str(bank.get("principalId", "")), created))
    return out
