"""What the connector stores. Secrets live only in ``*_sealed`` columns, encrypted by :mod:`connector.security.crypto`
with associated data ``"<table>.<column>:<row id>"``. Single-use values are consumed by conditional updates, so the
database decides who wins when two requests race, across processes and instances."""

from __future__ import annotations

from tortoise import fields
from tortoise.models import Model


class Notification(Model):
    """Every verified notification, stored before we answer; ``dedupe_key`` makes repeats no-ops."""

    id = fields.IntField(primary_key=True)
    dedupe_key = fields.CharField(max_length=200, unique=True)
    type = fields.CharField(max_length=64)
    resource_type = fields.CharField(max_length=64)
    resource_id = fields.CharField(max_length=64, db_index=True)
    payload = fields.JSONField()
    caller = fields.CharField(max_length=200, default="")
    received_at = fields.DatetimeField()
    processed_at = fields.DatetimeField(null=True)
    outcome = fields.CharField(max_length=64, default="")

    class Meta:
        table = "notification"


class Authorisation(Model):
    """An authorisation id announced by a verified notification; consumed once by ``/auth`` or ``/authrefresh``."""

    id = fields.CharField(max_length=36, primary_key=True)
    sage_bank_id = fields.CharField(max_length=64)
    received_at = fields.DatetimeField()
    expires_at = fields.DatetimeField()
    used_at = fields.DatetimeField(null=True)

    class Meta:
        table = "authorisation"


class Consent(Model):
    """A provider consent: the tokens that let us read the person's accounts."""

    id = fields.CharField(max_length=36, primary_key=True)
    provider = fields.CharField(max_length=64, db_index=True)
    sage_bank_id = fields.CharField(max_length=64)
    provider_consent_id = fields.CharField(max_length=200, null=True)
    secrets_sealed = fields.BinaryField(null=True)
    status = fields.CharField(max_length=32, default="active")  # active | auth_required | revoked
    status_reason = fields.CharField(max_length=64, default="")
    expires_at = fields.DatetimeField(null=True)
    version = fields.IntField(default=0)
    created_at = fields.DatetimeField(auto_now_add=True)
    updated_at = fields.DatetimeField(auto_now=True)

    class Meta:
        table = "consent"


class Account(Model):
    """One provider account under a consent, with the ``bankAccountExternalId`` we gave Sage for it."""

    id = fields.IntField(primary_key=True)
    consent: fields.ForeignKeyRelation[Consent] = fields.ForeignKeyField(
        "models.Consent", related_name="accounts", on_delete=fields.CASCADE
    )
    external_id = fields.CharField(max_length=36, unique=True)
    provider_account_id = fields.CharField(max_length=200)
    name = fields.CharField(max_length=200)
    bank_identifier = fields.CharField(max_length=100)
    account_identifier_sealed = fields.BinaryField()
    account_identifier_hint = fields.CharField(max_length=8)
    branch_identifier = fields.CharField(max_length=100, default="")
    account_type = fields.CharField(max_length=32, default="business")
    currency = fields.CharField(max_length=3)
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "account"
        unique_together = (("consent", "provider_account_id"),)


class LinkedAccount(Model):
    """A Sage bank account (``bankAccountId``) created for one of our accounts; the feed's unit of work."""

    id = fields.IntField(primary_key=True)
    bank_account_id = fields.CharField(max_length=64, unique=True)
    account: fields.ForeignKeyRelation[Account] = fields.ForeignKeyField(
        "models.Account", related_name="links", on_delete=fields.CASCADE
    )
    sage_bank_id = fields.CharField(max_length=64)
    requested_start_date = fields.DateField()
    feed_state = fields.CharField(max_length=32, default="linked")
    feed_reason = fields.CharField(max_length=64, default="")
    created_at = fields.DatetimeField(auto_now_add=True)
    deleted_at = fields.DatetimeField(null=True)

    class Meta:
        table = "linked_account"


class Journey(Model):
    """One person's walk through ``/auth`` or ``/authrefresh``. ``handle`` is the opaque value in every URL."""

    handle = fields.CharField(max_length=64, primary_key=True)
    authorisation_id = fields.CharField(max_length=36, unique=True)
    kind = fields.CharField(max_length=20)
    sage_bank_id = fields.CharField(max_length=64)
    provider = fields.CharField(max_length=64)
    redirect_uri = fields.TextField()
    state = fields.CharField(max_length=512)
    consent_id = fields.CharField(max_length=36, null=True)
    external_id = fields.CharField(max_length=36, null=True)
    flow_state_sealed = fields.BinaryField(null=True)
    page_sealed = fields.BinaryField(null=True)
    status = fields.CharField(max_length=20, default="active")  # active | finishing | done | failed
    version = fields.IntField(default=0)
    created_at = fields.DatetimeField()
    updated_at = fields.DatetimeField()
    expires_at = fields.DatetimeField()

    class Meta:
        table = "journey"


class CallbackState(Model):
    """A provider OAuth/webauth ``state``: random, bound to one journey and one provider, used once."""

    value = fields.CharField(max_length=64, primary_key=True)
    journey_handle = fields.CharField(max_length=64, db_index=True)
    provider = fields.CharField(max_length=64)
    expires_at = fields.DatetimeField()
    used_at = fields.DatetimeField(null=True)

    class Meta:
        table = "callback_state"


class FailedLookup(Model):
    """Failed guesses per client IP and minute, to throttle id guessing across instances."""

    id = fields.IntField(primary_key=True)
    client = fields.CharField(max_length=64)
    minute = fields.BigIntField()
    count = fields.IntField(default=0)

    class Meta:
        table = "failed_lookup"
        unique_together = (("client", "minute"),)
