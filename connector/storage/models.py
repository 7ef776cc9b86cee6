"""What the connector stores. Secrets live only in ``*_sealed`` columns, encrypted by :mod:`connector.security.crypto`
with associated data ``"<table>.<column>:<row id>"``. Single-use values are consumed by conditional updates, so the
database decides who wins when two requests race, across processes and instances."""

from __future__ import annotations

from tortoise import fields
from tortoise.models import Model


class Notification(Model):
    """Every verified notification, stored before we answer. ``dedupe_key`` makes repeats no-ops."""

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
    """An authorisation id announced by a verified notification and consumed once by ``/auth`` or ``/authrefresh``."""

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

    @property
    def display_name(self) -> str:
        """The name Sage shows for the account: its name and the last digits of its number."""
        return f"{self.name} ••{self.account_identifier_hint}"


class LinkedAccount(Model):
    """A Sage bank account (``bankAccountId``) created for one of our accounts: the feed's unit of work."""

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


# --- The statement feed (connector/feed) ------------------------------------------------------------------------
# An outbox: what the provider returned is stored first (FeedTransaction), cut into statements whose exact bytes are
# stored before they are sent (FeedStatement), and a statement is done only when Sage says ``complete``. A crash at
# any point resends the same bytes or re-reads from the last committed sync point: nothing is lost or sent twice.


class FeedCursor(Model):
    """One linked account's feed position: the provider's high-water mark and what was planned so far."""

    id = fields.IntField(primary_key=True)
    linked_account: fields.OneToOneRelation[LinkedAccount] = fields.OneToOneField(
        "models.LinkedAccount", related_name="cursor", on_delete=fields.CASCADE
    )
    sync_point = fields.TextField(null=True)  # the provider's opaque high-water mark, stored with the outbox rows
    balance = fields.CharField(max_length=40, null=True)  # Decimal text: the booked balance at the last read
    balance_currency = fields.CharField(max_length=3, default="")
    read_at = fields.DatetimeField(null=True)  # last successful provider read
    next_read_at = fields.DatetimeField(null=True)  # not before (provider backoff or poll interval)
    read_failures = fields.IntField(default=0)
    last_planned_date = fields.DateField(null=True)  # newest datePosted already cut into a statement
    auth_notice = fields.BooleanField(default=False)  # an authRequired statement is queued or sent for this loss
    caught_up_at = fields.DatetimeField(null=True)  # last time everything read was delivered
    last_error = fields.CharField(max_length=300, default="")
    last_error_at = fields.DatetimeField(null=True)
    sent_transactions = fields.IntField(default=0)
    skipped_zero = fields.IntField(default=0)  # zero-amount transactions, never sent (spec 7.38)
    skipped_early = fields.IntField(default=0)  # booked before requestedStartDate
    late_booked = fields.IntField(default=0)  # booked before the newest transaction already planned (spec 7.40)
    updated_at = fields.DatetimeField(auto_now=True)

    class Meta:
        table = "feed_cursor"


class FeedStatement(Model):
    """One statement exactly as it is (or was) sent: ``body`` is persisted before the first POST.

    ``status``: ``ready`` (to send, or resend after an uncertain delivery or a ``failed``), ``accepted`` (Sage gave
    ``sage_statement_id``, polling), ``complete``, ``rejected`` (Sage refused it: the feed holds), ``blocked`` (an
    answer we cannot act on: the feed holds) or ``abandoned`` (the account was deleted, or the consent came back
    before an ``authRequired`` notice went out).
    """

    id = fields.IntField(primary_key=True)
    linked_account: fields.ForeignKeyRelation[LinkedAccount] = fields.ForeignKeyField(
        "models.LinkedAccount", related_name="statements", on_delete=fields.CASCADE
    )
    kind = fields.CharField(max_length=16, default="transactions")  # transactions | auth_required
    body = fields.BinaryField()
    status = fields.CharField(max_length=16, default="ready")
    sage_statement_id = fields.CharField(max_length=128, null=True)
    transaction_count = fields.IntField(default=0)
    first_date = fields.DateField(null=True)
    last_date = fields.DateField(null=True)
    ledger_balance = fields.CharField(max_length=40, null=True)
    post_attempts = fields.IntField(default=0)  # POSTs started (a resend after a crash or a failure counts)
    failures = fields.IntField(default=0)  # times Sage reported ``failed``
    next_attempt_at = fields.DatetimeField(null=True)
    reason = fields.CharField(max_length=64, default="")
    error = fields.CharField(max_length=300, default="")
    created_at = fields.DatetimeField(auto_now_add=True)
    accepted_at = fields.DatetimeField(null=True)
    completed_at = fields.DatetimeField(null=True)

    class Meta:
        table = "feed_statement"
        indexes = (("linked_account_id", "status"),)


class FeedTransaction(Model):
    """One booked transaction read from the provider, ``unique_id`` (Sage's ``uniqueId``) is unique, so a transaction
    is stored, and therefore sent, at most once. ``statement`` is set when it is cut into a statement."""

    id = fields.IntField(primary_key=True)
    linked_account: fields.ForeignKeyRelation[LinkedAccount] = fields.ForeignKeyField(
        "models.LinkedAccount", related_name="feed_transactions", on_delete=fields.CASCADE
    )
    unique_id = fields.CharField(max_length=36, unique=True)
    provider_transaction_id = fields.TextField()
    booking_date = fields.DateField()
    amount = fields.CharField(max_length=40)  # Decimal text, signed
    detail = fields.JSONField()  # the transactionDetails entry, amounts as text
    statement: fields.ForeignKeyNullableRelation[FeedStatement] = fields.ForeignKeyField(
        "models.FeedStatement", related_name="transactions", null=True, on_delete=fields.SET_NULL
    )
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "feed_transaction"
        indexes = (("linked_account_id", "statement_id"),)


class FeedLease(Model):
    """The feed runs in one process at a time (spec 7.28): whoever holds this row until ``expires_at``."""

    name = fields.CharField(max_length=32, primary_key=True)
    holder = fields.CharField(max_length=200)
    expires_at = fields.DatetimeField()

    class Meta:
        table = "feed_lease"
