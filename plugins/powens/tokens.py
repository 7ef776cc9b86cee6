"""Calls made with a stored consent's permanent user token, renewing it once on a 401 (powens.md §1.4)."""

from __future__ import annotations

import logging
from typing import Any

from connector.hookspecs import ConsentSession

from . import errors
from .client import PowensAPIError, PowensClient, Retry
from .config import Settings

log = logging.getLogger("plugins.powens")


def token_from(answer: Any) -> str | None:
    """``access_token``, else ``token`` (the guide's shape, §16 OP-4)."""
    if isinstance(answer, dict):
        for key in ("access_token", "token"):
            value = answer.get(key)
            if isinstance(value, str) and value:
                return value
    return None


class ConsentCaller:
    def __init__(self, client: PowensClient, settings: Settings) -> None:
        self._client = client
        self._settings = settings

    async def call(self, consent: ConsentSession, method: str, path: str, **kwargs: Any) -> Any:
        used = consent.secrets.get("token")
        if not used:
            raise errors.action_required("powens_connection_deleted")
        try:
            return await self._client.request(method, path, token=used, **kwargs)
        except PowensAPIError as exc:
            if exc.status != 401:
                raise
        fresh = await self._renew(consent, used)
        try:
            return await self._client.request(method, path, token=fresh, **kwargs)
        except PowensAPIError as exc:
            if exc.status != 401:
                raise
            # A second 401 right after a renewal is an incident, not the person's problem (§1.4).
            log.error("powens token refused after renewal", extra={"consent_id": consent.consent_id})
            raise errors.temporary("powens_token_refused", detail=exc.detail) from None

    async def _renew(self, consent: ConsentSession, used: str) -> str:
        # Under the consent's lock, and re-reading the secrets inside it, so two feeds never renew twice and the
        # second one simply picks up the token the first stored.
        async with consent.lock():
            current = consent.secrets.get("token")
            if current and current != used:
                return str(current)
            try:
                answer = await self._client.request(
                    "POST",
                    "/auth/renew",
                    body={
                        "grant_type": "client_credentials",
                        "client_id": self._settings.client_id,
                        "client_secret": self._settings.client_secret,
                        "id_user": consent.secrets.get("id_user"),
                        "revoke_previous": True,
                    },
                    retry=Retry.THROTTLE,
                )
            except PowensAPIError as exc:
                if exc.status in (400, 401, 403, 404):
                    # The Powens user is gone (deleted at Powens, or never made permanent).
                    raise errors.action_required("powens_connection_deleted", detail=exc.detail) from None
                raise
            fresh = token_from(answer)
            if not fresh:
                raise errors.temporary("powens_bad_answer")
            await consent.save_secrets({**consent.secrets, "token": fresh})
            log.info("powens user token renewed", extra={"consent_id": consent.consent_id})
            return fresh
