"""Background work tied to the app's lifetime."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from sanic import Sanic


def spawn(app: Sanic, work: Coroutine[Any, Any, Any]) -> asyncio.Task:
    """Run ``work`` after the answer; keep a reference so it is not collected, and finish it before stopping."""
    tasks: set[asyncio.Task] = app.ctx.__dict__.setdefault("tasks", set())
    task = asyncio.get_running_loop().create_task(work)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task
