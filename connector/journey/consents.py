"""Stored consents as providers see them (:class:`connector.hookspecs.ConsentSession`), and storing a grant."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from tortoise.transactions import in_transaction

from connector.hookspecs import BankInfo
from connector.security.crypto import SecretBox
from connector.storage import models
from connector.types import Account, AccountType, Grant

# One lock per consent and process; the database version check below catches races across processes.
_LOCKS: dict[str, asyncio.Lock] = {}


def secrets_aad(consent_id: str) -> str:
    return f"consent.secrets_sealed:{consent_id}"


def identifier_aad(external_id: str) -> str:
    return f"account.account_identifier_sealed:{external_id}"


class StoredConsent:
    """A consent row with its decrypted secrets; ``save_secrets`` writes through at once."""

    def __init__(self, row: models.Consent, bank: BankInfo, box: SecretBox, *, persist: bool = True) -> None:
        self.row = row
        self._persist = persist  # False once the consent's secrets are erased: nothing may write them back
        self.consent_id = row.id
        self.provider_consent_id = row.provider_consent_id
        self.bank = bank
        self._box = box
        self._secrets: Mapping[str, Any] = (
            box.open_json(row.secrets_sealed, secrets_aad(row.id)) if row.secrets_sealed else {}
        )

    @property
    def secrets(self) -> Mapping[str, Any]:
        return self._secrets

    async def save_secrets(self, secrets: Mapping[str, Any]) -> None:
        if not self._persist:
            self._secrets = dict(secrets)
            return
        sealed = self._box.seal_json(dict(secrets), secrets_aad(self.consent_id))
        await models.Consent.filter(id=self.consent_id).update(secrets_sealed=sealed, version=self.row.version + 1)
        self.row.version += 1
        self._secrets = dict(secrets)

    async def reload(self) -> None:
        if not self._persist:
            return
        self.row = await models.Consent.get(id=self.consent_id)
        sealed = self.row.secrets_sealed
        self._secrets = self._box.open_json(sealed, secrets_aad(self.consent_id)) if sealed else {}

    @asynccontextmanager
    async def lock(self) -> AsyncIterator[None]:
        lock = _LOCKS.setdefault(self.consent_id, asyncio.Lock())
        async with lock:
            await self.reload()
            yield


def to_domain(row: models.Account, box: SecretBox) -> Account:
    return Account(
        provider_account_id=row.provider_account_id,
        name=row.name,
        bank_identifier=row.bank_identifier,
        account_identifier=box.open(row.account_identifier_sealed, identifier_aad(row.external_id)).decode(),
        currency=row.currency,
        account_type=AccountType(row.account_type),
        branch_identifier=row.branch_identifier,
    )


async def store_accounts(consent_id: str, accounts: Sequence[Account], box: SecretBox) -> list[models.Account]:
    """Insert accounts not yet known for the consent (each gets a new random externalId); return all of them."""
    existing = {a.provider_account_id: a for a in await models.Account.filter(consent_id=consent_id)}
    for account in accounts:
        if account.provider_account_id in existing:
            continue
        external_id = str(uuid.uuid4())
        existing[account.provider_account_id] = await models.Account.create(
            consent_id=consent_id,
            external_id=external_id,
            provider_account_id=account.provider_account_id,
            name=account.name[:200],
            bank_identifier=account.bank_identifier,
            account_identifier_sealed=box.seal(account.account_identifier.encode(), identifier_aad(external_id)),
            account_identifier_hint=account.masked_identifier,
            branch_identifier=account.branch_identifier,
            account_type=AccountType(account.account_type).value,
            currency=account.currency,
        )
    return list(existing.values())


async def create_consent(provider: str, sage_bank_id: str, grant: Grant, box: SecretBox) -> models.Consent:
    """Store a new consent (status ``pending`` until Sage confirms the PATCH) with every account of the grant."""
    consent_id = str(uuid.uuid4())
    async with in_transaction():
        row = await models.Consent.create(
            id=consent_id,
            provider=provider,
            sage_bank_id=sage_bank_id,
            provider_consent_id=grant.provider_consent_id,
            secrets_sealed=box.seal_json(dict(grant.secrets), secrets_aad(consent_id)),
            status="pending",
            expires_at=grant.expires_at,
        )
        await store_accounts(consent_id, grant.accounts, box)
    return row


def patch_account(row: models.Account, box: SecretBox) -> dict[str, str]:
    """One entry of the onboarding PATCH's ``bankAccounts``."""
    return {
        "bankAccountExternalId": row.external_id,
        "accountName": row.display_name,
        "bankIdentifier": row.bank_identifier,
        "branchIdentifier": row.branch_identifier,
        "accountIdentifier": box.open(row.account_identifier_sealed, identifier_aad(row.external_id)).decode(),
    }
