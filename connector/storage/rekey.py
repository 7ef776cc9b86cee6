"""``connector rotate-keys``: move every sealed value to the first of ``security.encryption_keys`` (security.md S4).

Rotation, as the operator does it:

1. put a new key first: ``encryption_keys = ["${NEW_KEY}", "${OLD_KEY}"]``, and restart the connector (it now seals
   with the new key and still opens what the old one sealed);
2. run ``connector rotate-keys``: each sealed column of each row is opened and sealed again under the first key;
   values already on it are skipped, so the pass can be run again after an interruption;
3. drop the old key once the pass reports that no value uses it.

Each value keeps its associated data (``"<table>.<column>:<row key>"``, see :mod:`connector.storage.models`), and
each write is conditional on the value read, so a row a running connector changed meanwhile is left as it is (it
was sealed under the first key anyway). A value that does not open (a key missing from the list, a tampered or
misplaced ciphertext) is reported by its table, column and row key, is left untouched, and makes the pass fail;
plaintext is never printed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tortoise.models import Model

from connector.config import Settings
from connector.security.crypto import SecretBox, SecretError, key_id
from connector.storage import close_database, models, open_database

__all__ = ["SEALED_COLUMNS", "RekeyError", "RekeyReport", "SealedColumn", "rekey", "rekey_open"]

PAGE = 500


@dataclass(frozen=True, slots=True)
class SealedColumn:
    """A ``*_sealed`` column and the field whose value is the row key in its associated data."""

    model: type[Model]
    column: str
    row_key: str

    @property
    def table(self) -> str:
        return self.model._meta.db_table

    @property
    def name(self) -> str:
        return f"{self.table}.{self.column}"

    def aad(self, row_key: object) -> str:
        return f"{self.name}:{row_key}"


#: Every sealed column, with the row key of its associated data (as written by ``connector.journey``).
SEALED_COLUMNS: tuple[SealedColumn, ...] = (
    SealedColumn(models.Consent, "secrets_sealed", "id"),
    SealedColumn(models.Account, "account_identifier_sealed", "external_id"),
    SealedColumn(models.Journey, "flow_state_sealed", "handle"),
    SealedColumn(models.Journey, "page_sealed", "handle"),
)


class RekeyError(Exception):
    """The pass could not run at all (no database at the configured URL)."""


@dataclass
class ColumnReport:
    rekeyed: int = 0
    current: int = 0
    changed_meanwhile: int = 0
    failures: list[str] = field(default_factory=list)


@dataclass
class RekeyReport:
    """What one pass did, per column, and which key ids are still in use afterwards."""

    first_key: str
    columns: dict[str, ColumnReport] = field(default_factory=dict)
    remaining: Counter[str] = field(default_factory=Counter)  # key id -> values still sealed with it
    key_names: dict[str, str] = field(default_factory=dict)  # key id -> security.encryption_keys[i]

    @property
    def ok(self) -> bool:
        return not any(c.failures for c in self.columns.values())

    def lines(self) -> list[str]:
        out = []
        for name, col in self.columns.items():
            extra = f", {col.changed_meanwhile} changed meanwhile (left as written)" if col.changed_meanwhile else ""
            failed = f", {len(col.failures)} FAILED" if col.failures else ""
            out.append(f"{name}: {col.rekeyed} re-encrypted, {col.current} already on the first key{extra}{failed}")
            out += [f"  failed: {failure}" for failure in col.failures]
        others = [kid for kid in self.key_names if kid != self.first_key]
        if self.ok:
            out.append(f"every sealed value now uses key id {self.first_key} (security.encryption_keys[0])")
        still = {kid: n for kid, n in self.remaining.items() if kid != self.first_key}
        for kid in others:
            if kid not in still:
                out.append(f"key id {kid} ({self.key_names[kid]}) is no longer used by any row: it may be removed")
        for kid, n in sorted(still.items()):
            out.append(f"key id {kid} ({self.key_names.get(kid, 'not in security.encryption_keys')}) still seals "
                       f"{n} value{'s' if n != 1 else ''}: keep it")
        return out


async def rekey_open(box: SecretBox, first_key: str, key_names: dict[str, str]) -> RekeyReport:
    """One pass over every sealed column, on a database Tortoise is already connected to."""
    report = RekeyReport(first_key=first_key, key_names=key_names)
    for spec in SEALED_COLUMNS:
        col = report.columns.setdefault(spec.name, ColumnReport())
        model, pk = spec.model, spec.model._meta.pk_attr
        last = None
        while True:
            query = model.filter(**{f"{spec.column}__isnull": False})
            if last is not None:
                query = query.filter(**{f"{pk}__gt": last})
            rows = await query.order_by(pk).limit(PAGE).values_list(pk, spec.row_key, spec.column)
            if not rows:
                break
            for row_pk, row_key, sealed in rows:
                last = row_pk
                sealed = bytes(sealed)
                if box.is_current(sealed):
                    col.current += 1
                    report.remaining[first_key] += 1
                    continue
                aad = spec.aad(row_key)
                try:
                    fresh = box.seal(box.open(sealed, aad), aad)
                except SecretError as exc:
                    col.failures.append(f"{spec.name} of row {row_key}: {exc}")
                    report.remaining[sealed[1:9].hex()] += 1
                    continue
                updated = await model.filter(**{pk: row_pk, spec.column: sealed}).update(**{spec.column: fresh})
                if updated:
                    col.rekeyed += 1
                else:
                    col.changed_meanwhile += 1
                report.remaining[first_key] += 1
    return report


async def rekey(settings: Settings) -> RekeyReport:
    """Connect to ``database.url``, run one pass, and disconnect."""
    url = str(settings.database["url"])
    if url.startswith("sqlite://") and not url.startswith("sqlite://:memory:"):
        file = Path(url.removeprefix("sqlite://").split("?")[0])
        if not file.is_file():
            raise RekeyError(f"no database at {file} (database.url); nothing to re-encrypt")
    box = SecretBox(settings.encryption_keys)
    names = {key_id(k).hex(): f"security.encryption_keys[{i}]" for i, k in enumerate(settings.encryption_keys)}
    first = key_id(settings.encryption_keys[0]).hex()
    await open_database(url, migrate=False)
    try:
        return await rekey_open(box, first, names)
    finally:
        await close_database()
