"""The HTTP surface: health, readiness, Prometheus metrics and the admin API (FastAPI).

- ``GET /``: the live dashboard (bridge/dashboard/), served with its files and config.
- ``GET /healthz``: the process is alive (200).
- ``GET /readyz``: 200 when listeners are up and the store answers; 503 with the reason
  otherwise: the store does not answer within ``store.quick_timeout_s``, or refused a call
  in the last 30 s (a full disk, Redis over ``maxmemory``), a cluster node cannot reach
  its Redis (bridge/cluster/node.py), and from the first moment of a graceful stop.
- ``GET /metrics``: Prometheus text (bridge/metrics.py).
- ``/admin/...``: an ``admin``-role JWT as ``Authorization: Bearer <token>``, checked with
  the broker's own keys; no/invalid token 401, another role 403. OpenAPI at ``/openapi.json``
  and ``/docs``. Bodies are validated; every error is JSON ``{"error": ..., "detail": ...}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import socket
import time
from collections.abc import Generator
from typing import Annotated, Any, Literal

import jwt
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bridge.auth import Claims, KeyRing, TokenPolicy, decide_auth
from bridge.config import redacted
from bridge.core.store import Priority, StoreError
from bridge.dashboard.routes import ListenerUnavailable, WsEndpoint
from bridge.dashboard.routes import router as dashboard_router
from bridge.edge.broker import MarketBroker
from bridge.errors import ClusterUnavailable, ListenerError, MessageError
from bridge.metrics import MetricsRegistry

__all__ = ["HttpServer", "build_app"]

_bearer = HTTPBearer(auto_error=False)


class MessageBody(BaseModel):
    """A message for a user: ``payload`` (text) or ``payload_b64`` (bytes)."""

    model_config = ConfigDict(extra="forbid")

    topic: Annotated[
        str, Field(min_length=1, max_length=512, description="user/<sub>/... or the part after it")
    ]
    payload: str | None = None
    payload_b64: str | None = None
    priority: Literal["LOW", "NORMAL", "HIGH", "URGENT"] = "NORMAL"
    ttl_s: Annotated[float, Field(gt=0, le=30 * 86400)] | None = None

    @model_validator(mode="after")
    def _one_payload(self) -> MessageBody:
        if (self.payload is None) == (self.payload_b64 is None):
            raise ValueError("give exactly one of payload and payload_b64")
        return self

    def data(self) -> bytes:
        if self.payload is not None:
            return self.payload.encode()
        try:
            return base64.b64decode(self.payload_b64 or "", validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(422, "payload_b64 is not valid base64") from None


class TzBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tz: str | None = Field(description="IANA zone, or null to clear the override")


def require_admin(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Claims:
    """An admin-role JWT, checked with the broker's keys: 401 without a valid one, 403 for other roles."""
    keys: KeyRing | None = request.app.state.keys
    policy: TokenPolicy = request.app.state.policy
    if keys is None:
        raise HTTPException(403, "auth is disabled: the admin API is off")
    if credentials is None:
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    token = credentials.credentials
    # MQTT's username == sub check does not apply to HTTP: pass the token's own sub.
    decision = decide_auth(token, _unverified_sub(token, policy.max_token_bytes), time.time(), keys, policy)
    if not isinstance(decision, Claims):
        raise HTTPException(401, f"token refused: {decision.reason}", headers={"WWW-Authenticate": "Bearer"})
    if decision.role != "admin":
        raise HTTPException(403, "admin role required")
    return decision


Admin = Annotated[Claims, Depends(require_admin)]


def build_app(broker: MarketBroker) -> FastAPI:
    """The app for one broker."""
    config = broker.bridge_config
    metrics = MetricsRegistry(broker)
    # The broker's own keys and policy: the admin API must not accept a token MQTT would refuse.
    # Not its token cache: require_admin runs in a worker thread, and the cache is the loop's.
    tokens = broker.tokens
    keys = tokens.keys if tokens is not None else None
    policy = tokens.policy if tokens is not None else TokenPolicy.from_config(config.auth)
    app = FastAPI(title="market-bridge", version="0.1.0", summary="Health, metrics and admin API")
    app.state.metrics = metrics
    app.state.keys = keys
    app.state.policy = policy

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": _ERRORS.get(exc.status_code, "error"), "detail": exc.detail},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": ".".join(str(p) for p in err["loc"] if p != "body"), "message": err["msg"]}
            for err in exc.errors()
        ]
        return JSONResponse({"error": "invalid_request", "detail": problems}, status_code=422)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "not ready, with the reason"}})
    async def readyz() -> JSONResponse:
        reason = None
        if broker.draining:
            reason = "shutting down"
        elif not broker.listener_names():
            reason = "listeners are not up"
        elif broker.store is None:
            reason = "store is not open"
        elif broker.cluster is not None and not broker.cluster.ready:
            # Not ready while Redis cannot be reached: new connections go to other nodes (the
            # limits fail closed anyway); the ones here keep their local subscribers.
            reason = f"cluster: {broker.cluster.unready_reason}"
        else:
            try:
                await broker.store.ping()  # within store.quick_timeout_s
            except StoreError as exc:
                reason = f"store unreachable: {exc}"
            else:
                failure = broker.store.failure()
                if failure is not None:
                    reason = f"store failing: {failure.operation} failed: {failure.error}"
        if reason is not None:
            return JSONResponse({"status": "unready", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["health"])
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/admin/connections", tags=["admin"])
    async def connections(_: Admin) -> dict[str, Any]:
        limits = config.limits
        return {
            "total": broker.limits.total,
            "limits": {
                "max_connections": limits.max_connections,
                "max_connections_per_user": limits.max_connections_per_user,
            },
            "per_user": broker.connections_by_user(),
            "per_listener": broker.listener_connections(),
            "refusals": dict(broker.stats.refusals),
            "token_expiries": broker.stats.token_expiries,
            "connections": broker.connection_list(),
            **(await _cluster_view(broker)),
        }

    @app.get("/admin/users/{user}/subscriptions", tags=["admin"])
    async def subscriptions(user: str, _: Admin) -> dict[str, dict[str, int]]:
        try:
            result: dict[str, dict[str, int]] = await broker.user_subscriptions(user)
        except StoreError as exc:
            raise HTTPException(503, str(exc)) from None
        return result

    @app.post(
        "/admin/users/{user}/messages",
        tags=["admin"],
        status_code=202,
        responses={
            503: {
                "description": "the store is unavailable or failing (e.g. a full disk): nothing was"
                " reported stored (a store that missed its deadline may still store it: send again"
                " and it may arrive twice)"
            }
        },
    )
    async def send(user: str, body: MessageBody, _: Admin) -> dict[str, Any]:
        try:
            result = await broker.send_to_user(
                user, body.topic, body.data(), priority=Priority[body.priority], ttl_s=body.ttl_s
            )
        except StoreError as exc:
            raise HTTPException(503, str(exc)) from None
        except MessageError as exc:
            raise HTTPException(422, exc.detail) from None
        return {
            "delivered": result.delivered,
            "stored": result.stored is not None,
            "evicted": [
                {"topic": m.topic, "priority": m.priority.name, "new": m.id == ""} for m in result.evicted
            ],
        }

    @app.put("/admin/users/{user}/tz", tags=["admin"])
    async def set_tz(user: str, body: TzBody, _: Admin) -> dict[str, str | None]:
        try:
            await broker.set_user_tz(user, body.tz)
        except MessageError as exc:
            raise HTTPException(422, exc.detail) from None
        except StoreError as exc:
            raise HTTPException(503, str(exc)) from None
        return {"user": user, "tz": body.tz}

    @app.get("/admin/config", tags=["admin"])
    async def effective_config(_: Admin) -> dict[str, Any]:
        # The same redaction as `market-bridge config`: secrets never leave the process.
        return redacted(config)

    app.include_router(dashboard_router(lambda: _ws_endpoint(broker)))
    return app


def _ws_endpoint(broker: MarketBroker) -> WsEndpoint | None:
    ws = broker.bridge_config.listeners.ws
    if not ws.enabled:
        return None
    if broker.draining:
        raise ListenerUnavailable("the broker is shutting down")
    try:
        port = broker.bound_port("ws")
    except KeyError:
        raise ListenerUnavailable("the WebSocket listener is not up") from None
    return WsEndpoint(port=port, path=ws.path, tls=ws.tls is not None)


_ERRORS = {
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    422: "invalid_request",
    503: "unavailable",
}


def _unverified_sub(token: str, max_bytes: int) -> str | None:
    """The sub claim before verification, only to satisfy decide_auth's username check."""
    if len(token) > max_bytes:
        return None  # decide_auth refuses it as too_large without parsing
    try:
        sub = jwt.decode(token, options={"verify_signature": False}).get("sub")
    except jwt.InvalidTokenError:
        return None
    return sub if isinstance(sub, str) else None


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside our event loop: the bridge owns SIGINT/SIGTERM, not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class HttpServer:
    """``async with HttpServer(broker, host, port) as http:`` serves the app until exit."""

    def __init__(self, broker: MarketBroker, host: str, port: int) -> None:
        self.app = build_app(broker)
        self._host = host
        self._port = port
        self._server = _EmbeddedServer(
            uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off")
        )
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    @property
    def port(self) -> int:
        assert self._socket is not None
        return int(self._socket.getsockname()[1])

    @property
    def metrics(self) -> MetricsRegistry:
        registry: MetricsRegistry = self.app.state.metrics
        return registry

    async def __aenter__(self) -> HttpServer:
        # Bind here so a taken port is our ListenerError, not uvicorn's sys.exit(1).
        sock = socket.socket(socket.AF_INET6 if ":" in self._host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host, self._port))
        except OSError as exc:
            sock.close()
            raise ListenerError("http", self._host, self._port, exc.strerror or str(exc)) from exc
        self._socket = sock
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http")
        async with asyncio.timeout(10):
            while not self._server.started:
                if self._task.done():
                    await self._task  # surfaces the startup error
                await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        if self._socket is not None:
            self._socket.close()


async def _cluster_view(broker: MarketBroker) -> dict[str, Any]:
    """In a cluster, ``total`` and ``per_user`` are cluster-wide (the limits' view, at most
    ``lease_ttl_s / 3`` old), and so is ``connections``, each with its ``node`` (the nodes'
    directory: a connection appears within one directory write). Which node answered is
    ``node``; ``cluster_nodes`` is None when Redis could not be reached, and ``connections``
    then only this node's."""
    cluster = broker.cluster
    if cluster is None:
        return {}
    try:
        listing = await broker.cluster_connections()
    except ClusterUnavailable:
        # This node's own list stands, and says it is only that.
        return {"node": cluster.node_id, "cluster_nodes": None}
    assert listing is not None
    connections = [entry | {"node": node} for node, entries in listing.items() for entry in entries]
    return {"node": cluster.node_id, "cluster_nodes": sorted(listing), "connections": connections}
