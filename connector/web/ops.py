"""Operator endpoints: ``/health`` (the process answers), ``/ready`` (it can serve), ``/metrics``."""

from __future__ import annotations

import asyncio

from sanic import Blueprint, Request
from sanic.response import HTTPResponse, raw
from sanic.response import json as json_response
from sanic_ext import openapi
from tortoise import Tortoise

from connector.metrics import CONTENT_TYPE_LATEST
from connector.web import apidoc

bp = Blueprint("ops")

READY_TIMEOUT = 2.0


@bp.get("/health")
@openapi.definition(summary="Liveness: the process answers",
                    response=apidoc.responses(apidoc.HEALTH, "internal_error"))
async def health(request: Request) -> HTTPResponse:
    return json_response({"status": "ok"})


async def _database_ok() -> bool:
    try:
        await asyncio.wait_for(Tortoise.get_connection("default").execute_query("SELECT 1"), READY_TIMEOUT)
    except Exception:
        return False
    return True


async def _jwks_ok(request: Request) -> bool:
    jwks = request.app.ctx.jwks
    if jwks.is_ready:
        return True
    try:
        return bool(await asyncio.wait_for(jwks.warm(), READY_TIMEOUT))
    except Exception:
        return False


@bp.get("/ready")
@openapi.definition(summary="Readiness: the config is loaded, the database answers, Sage ID's keys are known",
                    response=[*apidoc.responses(apidoc.READY, "internal_error"), {"status": 503, **apidoc.NOT_READY}])
async def ready(request: Request) -> HTTPResponse:
    checks = {"config": True, "database": await _database_ok(), "jwks": await _jwks_ok(request)}
    ok = all(checks.values())
    return json_response({"status": "ready" if ok else "not_ready", "checks": checks}, status=200 if ok else 503)


@bp.get("/metrics")
@openapi.definition(summary="Prometheus metrics", response=apidoc.responses(apidoc.METRICS, "internal_error"))
async def metrics(request: Request) -> HTTPResponse:
    return raw(request.app.ctx.metrics.render(), content_type=CONTENT_TYPE_LATEST)
