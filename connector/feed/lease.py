"""The feed runs in exactly one process at a time (spec 7.28): a lease row in the database.

The holder renews it well before it expires. A process that was killed leaves its lease behind; on the same host the
next process sees that the holder's pid is gone and takes the lease at once, elsewhere it waits for the expiry.
"""

from __future__ import annotations

import os
import secrets
import socket
from datetime import UTC, datetime, timedelta

from tortoise.exceptions import IntegrityError

from connector.storage import models

NAME = "feed"


def _now() -> datetime:
    return datetime.now(UTC)


class Lease:
    def __init__(self, ttl: float = 60.0, *, name: str = NAME) -> None:
        self.ttl = timedelta(seconds=ttl)
        self.name = name
        self.host = socket.gethostname()[:100]
        self.holder = f"{self.host}:{os.getpid()}:{secrets.token_hex(4)}"
        self.held = False

    async def acquire(self) -> bool:
        """Take or renew the lease; ``False`` when another live process holds it."""
        now = _now()
        until = now + self.ttl
        taken = await models.FeedLease.filter(name=self.name, holder=self.holder).update(expires_at=until)
        if not taken:
            taken = await models.FeedLease.filter(name=self.name, expires_at__lt=now).update(
                holder=self.holder, expires_at=until)
        if not taken:
            row = await models.FeedLease.get_or_none(name=self.name)
            if row is None:
                try:
                    await models.FeedLease.create(name=self.name, holder=self.holder, expires_at=until)
                    taken = 1
                except IntegrityError:
                    taken = 0
            elif self._dead_here(row.holder):
                taken = await models.FeedLease.filter(name=self.name, holder=row.holder).update(
                    holder=self.holder, expires_at=until)
        self.held = bool(taken)
        return self.held

    async def release(self) -> None:
        if self.held:
            await models.FeedLease.filter(name=self.name, holder=self.holder).delete()
            self.held = False

    def _dead_here(self, holder: str) -> bool:
        host, _, rest = holder.rpartition(":")[0].rpartition(":")
        if host != self.host or not rest.isdigit():
            return False
        pid = int(rest)
        if pid == os.getpid():
            return False  # another Feed in this process (tests): it is alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


async def current_holder(name: str = NAME) -> tuple[str, datetime] | None:
    row = await models.FeedLease.get_or_none(name=name)
    if row is None or row.expires_at < _now():
        return None
    return row.holder, row.expires_at
