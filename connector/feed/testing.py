"""Helpers for feed tests and ``bench/feed.py``: linked accounts seeded straight into the database (for benchmarks
that need a thousand accounts without a thousand journeys), and a running connector's settings as a config for
``connector feed run`` in a subprocess."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from typing import Any

from tortoise.transactions import in_transaction

from connector.journey.consents import identifier_aad, secrets_aad
from connector.security.crypto import SecretBox
from connector.storage import models


async def seed_linked_accounts(
    box: SecretBox,
    *,
    provider: str,
    sage_bank_id: str,
    users: Sequence[str],
    accounts_per_user: Sequence[str],
    requested_start: date,
) -> list[str]:
    """Store one active consent per user, with the given provider account ids (``{user}-{suffix}``), each linked to a
    new bankAccountId; return the bankAccountIds. Secrets are ``{"user": user}`` (what Demo Bank expects)."""
    ids: list[str] = []
    now = datetime.now(UTC)
    async with in_transaction():
        for user in users:
            consent_id = str(uuid.uuid4())
            await models.Consent.create(
                id=consent_id, provider=provider, sage_bank_id=sage_bank_id, provider_consent_id=user,
                secrets_sealed=box.seal_json({"user": user}, secrets_aad(consent_id)), status="active")
            for n, suffix in enumerate(accounts_per_user):
                external_id = str(uuid.uuid4())
                number = f"{n + 1}{abs(hash(user)) % 10**7:07d}"
                account = await models.Account.create(
                    consent_id=consent_id, external_id=external_id, provider_account_id=f"{user}-{suffix}",
                    name=f"Account {suffix}", bank_identifier="040004",
                    account_identifier_sealed=box.seal(number.encode(), identifier_aad(external_id)),
                    account_identifier_hint=number[-4:], currency="GBP")
                bank_account_id = str(uuid.uuid4())
                await models.LinkedAccount.create(bank_account_id=bank_account_id, account_id=account.id,
                                                  sage_bank_id=sage_bank_id, requested_start_date=requested_start,
                                                  created_at=now)
                ids.append(bank_account_id)
    return ids


def settings_to_config(settings: Any, **sections: Mapping[str, Any]) -> dict[str, Any]:
    """A raw config dict (as parsed TOML) equivalent to ``settings``, with ``sections`` merged in: for running
    ``connector feed run`` as a subprocess against the same database and keys as an in-process connector."""
    import base64

    security = dict(settings.security)
    security["encryption_keys"] = [base64.urlsafe_b64encode(k).decode().rstrip("=")
                                   for k in settings.encryption_keys]
    config: dict[str, Any] = {
        "server": dict(settings.server),
        "database": dict(settings.database),
        "security": security,
        "sage": {k: v for k, v in settings.sage.items() if v != ""},
        "feed": dict(settings.feed),
        "logging": dict(settings.logging),
        "providers": {name: dict(table) for name, table in settings.providers.items()},
        "banks": [{k: v for k, v in (("sage_bank_id", b.sage_bank_id), ("name", b.name), ("provider", b.provider),
                                     ("provider_bank", b.provider_bank), ("country_code", b.country_code),
                                     ("url", b.url), ("options", dict(b.options))) if v != ""}
                  for b in settings.banks],
    }
    for name, values in sections.items():
        if name == "banks":
            config["banks"] = [dict(b) for b in values]  # type: ignore[union-attr]
        else:
            config.setdefault(name, {}).update(values)
    return config
