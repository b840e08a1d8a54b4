"""The HTTP API: one ASGI application built from one route table.

Seed 001's routes are the contract; seed 000's are aliases of them. Every
platform serves this same app through its own adapter (uvicorn here, the
Lambda/Azure/GCP adapters in ``kidp.edges``). Errors are rendered in one place,
:func:`error_response`, in the shape ``{"error", "message", "code"}``.
"""

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from kidp.auth import SCOPE_READ, Caller, TokenVerifier, bearer_token
from kidp.errors import (
    BrokerError,
    Forbidden,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    TemporaryError,
    Unauthorized,
    ValidationFailed,
)
from kidp.models import (
    Accepted,
    DeploymentId,
    DeprovisionRequest,
    ErrorBody,
    KubeName,
    Phase,
    ProvisionRequest,
    ResourceQuery,
    ResourceType,
)
from kidp.observability import correlation_id, new_correlation_id
from kidp.ports import RateLimiter
from kidp.scans import Scanner
from kidp.service import BrokerService, DryRunPlan

log = logging.getLogger("kidp.api")
audit = logging.getLogger("kidp.audit")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Paths that are probed by machines and never rate limited or audited per call.
_PROBES = frozenset({"/health", "/readiness", "/ready", "/metrics"})
#: Paths served without a token (discovery and probes).
#: Swagger UI's own files, served from the package (``swagger-ui-bundle``), so
#: the page works without reaching a CDN.
DOCS_ASSETS = "/docs/assets"
_DOCS_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")
_PUBLIC = (
    _PROBES | {"/", "/openapi.json", "/docs"} | {f"{DOCS_ASSETS}/{name}" for name in _DOCS_FILES}
)
#: The ``endpoint`` label of a request no route matched.
_UNMATCHED = "unmatched"
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        400: "validation_failed or invalid_request",
        401: "unauthorized: missing or invalid bearer token",
        403: "forbidden: the token lacks the scope or namespace",
        404: "resource_not_found",
        409: "conflict: the resource is held by another spec",
        413: "payload_too_large: body over 1 MiB",
        422: "quota_exceeded",
        429: "rate_limited (see Retry-After)",
        503: "a dependency (cloud, store) is unavailable; retry later",
    }.items()
}


def error_response(error: BrokerError, *, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one mapping from a core error to an HTTP response."""
    extra = dict(headers or {})
    if isinstance(error, TemporaryError):
        extra.setdefault("Retry-After", str(max(1, int(error.retry_after + 0.999))))
    return JSONResponse(error.to_body(), status_code=error.http_status, headers=extra)


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _validation_message(exc: RequestValidationError) -> BrokerError:
    messages: list[str] = []
    for err in exc.errors():
        kind, field = err.get("type", ""), _field(tuple(err.get("loc", ())))
        if kind == "json_invalid":
            return InvalidRequest("request body is not valid JSON")
        if kind == "missing" and field == "body":
            return InvalidRequest("request body is required")
        if kind == "missing":
            messages.append(f"{field} is required")
        elif kind == "extra_forbidden":
            messages.append(f"{field} is not a field a caller may set")
        elif kind in ("model_attributes_type", "dict_type") and field == "body":
            return InvalidRequest("request body must be a JSON object")
        else:
            messages.append(f"{field}: {err.get('msg', 'invalid value')}")
    return ValidationFailed("; ".join(messages[:5]) or "invalid request")


class Gatekeeper:
    """Pure ASGI middleware in front of every route: correlation id,
    authentication and the rate limit (before any body is read, so a bad body
    from an unknown caller is a 401, not a 400), body limit, content type,
    metrics and the request log. Raw ASGI because it runs on every request."""

    def __init__(
        self,
        app: ASGIApp,
        service: BrokerService,
        *,
        verifier: TokenVerifier,
        limiter: RateLimiter,
    ) -> None:
        self.app = app
        self.fastapi: FastAPI | None = app if isinstance(app, FastAPI) else None
        self.service = service
        self.verifier = verifier
        self.limiter = limiter
        self.max_body = service.settings.max_body_bytes
        # A JWKS fetch blocks: keep it off the event loop. HS256 is cheap inline.
        self.verify_in_thread = service.settings.jwt_jwks_url is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])
        }
        cid = headers.get("x-correlation-id", "")[:128] or new_correlation_id()
        token = correlation_id.set(cid)
        started = time.perf_counter()
        method, path = scope["method"], scope["path"]
        status_holder = {"status": 500}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-correlation-id", cid.encode("latin-1")),
                ]
            await send(message)

        try:
            refusal = None
            if path not in _PUBLIC:
                refusal = await self._authenticate(scope, headers)
            refusal = refusal or self._refuse(method, headers)
            if refusal is not None:
                extra = {"WWW-Authenticate": "Bearer"} if isinstance(refusal, Unauthorized) else {}
                response = error_response(refusal, headers=extra)
                await response(scope, receive, send_with_headers)
                return
            await self.app(scope, self._limited(receive), send_with_headers)
        except PayloadTooLarge as exc:
            await error_response(exc)(scope, receive, send_with_headers)
        finally:
            elapsed = time.perf_counter() - started
            status = status_holder["status"]
            metrics = self.service.metrics
            metrics.requests.labels(method, str(status)).inc()
            metrics.request_duration.labels(method).observe(elapsed)
            metrics.http_request_duration.labels(self._endpoint(scope), method).observe(elapsed)
            if path not in _PROBES:
                audit.info(
                    "request",
                    extra={
                        "method": method,
                        "path": path,
                        "status": status,
                        "durationMs": round(elapsed * 1000, 2),
                        "client": (scope.get("client") or ("", 0))[0],
                        "subject": scope.get("state", {}).get("subject", ""),
                    },
                )
            correlation_id.reset(token)

    def _endpoint(self, scope: Scope) -> str:
        """The route template that served (or would have served) this request:
        the raw path carries ids, and a label per deployment would grow without
        bound. Refused requests never reached the router, so they are matched
        here; a path no route knows is one label, ``unmatched``."""
        route = scope.get("route")
        if isinstance(route, BaseRoute):
            return str(getattr(route, "path", _UNMATCHED))
        if self.fastapi is None:
            return _UNMATCHED
        partial = _UNMATCHED
        for candidate in self.fastapi.router.routes:
            match, _ = candidate.matches(scope)
            if match is Match.FULL:
                return str(getattr(candidate, "path", _UNMATCHED))
            if match is Match.PARTIAL and partial == _UNMATCHED:
                # The path is known, the method is not (a 405).
                partial = str(getattr(candidate, "path", _UNMATCHED))
        return partial

    async def _authenticate(self, scope: Scope, headers: dict[str, str]) -> BrokerError | None:
        """Verify the bearer token and count the request against its subject (or,
        without a valid token, its source address). Returns the refusal, if any."""
        client = (scope.get("client") or ("unknown", 0))[0]
        state = scope.setdefault("state", {})
        try:
            token = bearer_token(headers.get("authorization"))
            if self.verify_in_thread:
                who = await run_in_threadpool(self.verifier.verify, token)
            else:
                who = self.verifier.verify(token)
        except Unauthorized as exc:
            audit.warning(
                "authentication refused",
                extra={"client": client, "reason": exc.message, "path": scope["path"]},
            )
            return self._limit(f"ip:{client}") or exc
        except BrokerError as exc:  # the identity provider is down: 503, retry
            return exc
        state["caller"] = who
        state["subject"] = who.subject
        return self._limit(f"sub:{who.subject}")

    def _limit(self, key: str) -> BrokerError | None:
        limit = self.service.settings.rate_limit_per_minute
        wait = self.limiter.hit(key, limit=limit, window_seconds=60.0)
        if wait is None:
            return None
        audit.warning("rate limited", extra={"key": key})
        return RateLimited(f"rate limit of {limit} requests per minute exceeded", retry_after=wait)

    def _refuse(self, method: str, headers: dict[str, str]) -> BrokerError | None:
        if method not in ("POST", "PUT", "PATCH"):
            return None
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return PayloadTooLarge(f"request body exceeds {self.max_body} bytes")
        if length == "0":
            return None
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json" and not content_type.endswith("+json"):
            return InvalidRequest("Content-Type must be application/json")
        return None

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise PayloadTooLarge(f"request body exceeds {self.max_body} bytes")
            return message

        return limited


def create_app(
    service: BrokerService,
    *,
    verifier: TokenVerifier,
    limiter: RateLimiter,
    scanner: Scanner | None = None,
) -> Gatekeeper:
    """Build the broker's ASGI application around ``service``; the FastAPI app
    (for its OpenAPI document) is its ``.app``."""
    scanner = scanner or Scanner(service)
    settings = service.settings

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Routes that touch the store run in worker threads; dozens of them
        # contending for one interpreter cost more in switching than they win
        # in overlap, and the store's group commit batches a handful as well.
        import anyio.to_thread

        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        yield

    app = FastAPI(
        lifespan=lifespan,
        # /docs is served below from local files; ReDoc only exists on a CDN.
        docs_url=None,
        redoc_url=None,
        title="KIDP Deployment Broker",
        version=settings.version,
        description="Provisions databases, caches, topics, buckets and services on "
        f"{settings.cloud} ({settings.region}) and reports every phase to a callback URL.",
        responses=_ERRORS,
    )

    def caller(request: Request) -> Caller:
        """The caller the gatekeeper authenticated for this request."""
        who = request.scope.get("state", {}).get("caller")
        if not isinstance(who, Caller):  # a route missing from _PUBLIC's complement
            raise Unauthorized("missing bearer token")
        return who

    Authed = Annotated[Caller, Depends(caller)]  # noqa: N806 - a type alias

    @app.exception_handler(BrokerError)
    async def _broker_error(request: Request, exc: BrokerError) -> JSONResponse:
        if isinstance(exc, Unauthorized):
            return error_response(exc, headers={"WWW-Authenticate": "Bearer"})
        if isinstance(exc, Forbidden):
            audit.warning("forbidden", extra={"reason": exc.message, "path": request.url.path})
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, PayloadTooLarge):  # raised while FastAPI read the body
            return error_response(exc.__cause__)
        code = {404: "resource_not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "invalid_request"
        )
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(
            {"error": code, "message": message, "code": exc.status_code},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"path": request.url.path})
        return JSONResponse(
            {"error": "internal_error", "message": "internal error", "code": 500}, status_code=500
        )

    # ------------------------------------------------------------- discovery

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        """Swagger UI for this API, every file from this package."""
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="KIDP Deployment Broker",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )

    @app.get(DOCS_ASSETS + "/{name}", include_in_schema=False)
    def docs_asset(name: str) -> Response:
        """One of Swagger UI's files (a fixed list: nothing else is served)."""
        from starlette.responses import FileResponse

        if name not in _DOCS_FILES:
            raise NotFound(f"no documentation file {name}")
        import swagger_ui_bundle

        return FileResponse(Path(swagger_ui_bundle.swagger_ui_path) / name)

    @app.get("/", tags=["discovery"])
    def root() -> dict[str, Any]:
        """What this broker is and where its routes are."""
        return {
            "service": "kidp-broker",
            "version": settings.version,
            "cloud": settings.cloud,
            "region": settings.region,
            "provider": service.provider.name,
            "links": {
                "self": {"href": "/"},
                "health": {"href": "/health"},
                "readiness": {"href": "/readiness"},
                "provision": {"href": "/v1/provision", "method": "POST"},
                "deprovision": {"href": "/v1/deprovision", "method": "POST"},
                "status": {"href": "/v1/status?id={deploymentId}", "templated": True},
                "deployment": {"href": "/api/v1/deployments/{deploymentId}", "templated": True},
                "resources": {"href": "/v1/resources?namespace={namespace}", "templated": True},
                "catalog": {"href": "/v1/catalog"},
                "costs": {"href": "/v1/costs?groupBy=team"},
                "orphans": {"href": "/v1/orphans"},
                "openapi": {"href": "/openapi.json"},
                "metrics": {"href": "/metrics"},
            },
        }

    @app.get("/health", tags=["health"])
    async def health() -> JSONResponse:
        """Liveness plus counts and per-dependency checks (seeds 001 and 002)."""
        serving, body = await run_in_threadpool(service.health)
        return JSONResponse(body, status_code=200 if serving else 503)

    @app.get("/readiness", tags=["health"])
    @app.get("/ready", tags=["health"], include_in_schema=False)
    async def readiness() -> JSONResponse:
        """Ready to accept requests: store, queue and cloud API reachable."""
        ready, body = await run_in_threadpool(service.readiness)
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["health"], response_class=Response)
    def metrics() -> Response:
        """Prometheus metrics."""
        return Response(
            service.render_metrics(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.get("/v1/catalog", tags=["discovery"])
    def get_catalog(who: Authed) -> dict[str, Any]:
        """Resource types, engines, versions and sizes this broker can provision."""
        return service.catalog()

    # ------------------------------------------------------------- lifecycle

    def provision(
        body: ProvisionRequest,
        who: Authed,
        dry_run: Annotated[bool, Query(alias="dryRun")] = False,
        request_id: Annotated[str | None, Header(alias="X-Request-ID", max_length=128)] = None,
    ) -> JSONResponse:
        """Accept a provision: 202 with a deploymentId (200 if the same request
        already exists; 200 with a plan for ``dryRun=true``)."""
        outcome = service.submit_provision(who, body, request_id=request_id, dry_run=dry_run)
        if isinstance(outcome, DryRunPlan):
            return JSONResponse(outcome.body, status_code=200)
        status = 202 if outcome.status == "accepted" else 200
        return JSONResponse(outcome.wire(), status_code=status)

    for path in ("/v1/provision", "/api/v1/deploy"):
        app.add_api_route(
            path,
            provision,
            methods=["POST"],
            tags=["lifecycle"],
            status_code=202,
            response_model=Accepted,
            include_in_schema=True,
            responses={200: {"description": "identical deployment exists, or a dry-run plan"}},
        )

    @app.post("/v1/deprovision", tags=["lifecycle"], status_code=202, response_model=Accepted)
    def deprovision(body: DeprovisionRequest, who: Authed) -> JSONResponse:
        """Delete a deployment's cloud resource (by deploymentId or type/name)."""
        return JSONResponse(service.submit_deprovision(who, body).wire(), status_code=202)

    @app.delete(
        "/api/v1/resources/{resourceType}/{resourceName}",
        tags=["lifecycle"],
        status_code=202,
        response_model=Accepted,
    )
    def delete_resource(
        resourceType: ResourceType,  # noqa: N803 - the seed's path parameter names
        resourceName: KubeName,  # noqa: N803
        namespace: Annotated[KubeName, Query()],
        who: Authed,
    ) -> JSONResponse:
        """Seed 000's alias of ``POST /v1/deprovision``."""
        request = DeprovisionRequest(
            namespace=namespace, resource_type=resourceType, resource_name=resourceName
        )
        return JSONResponse(service.submit_deprovision(who, request).wire(), status_code=202)

    @app.get("/v1/status", tags=["status"])
    def status(id: Annotated[DeploymentId, Query()], who: Authed) -> dict[str, Any]:
        """Phase and message of one deployment (seed 001)."""
        return service.status(service.get_visible(who, id))

    @app.get("/api/v1/deployments/{deploymentId}", tags=["status"])
    def deployment(deploymentId: DeploymentId, who: Authed) -> JSONResponse:  # noqa: N803
        """Seed 000's status: adds progress, error and estimated completion."""
        found = service.get_visible(who, deploymentId)
        headers = {}
        if found.phase in (Phase.READY, Phase.FAILED, Phase.DELETED):
            headers["Cache-Control"] = "max-age=30"
        else:
            headers["Cache-Control"] = "no-store"
        return JSONResponse(service.detailed_status(found), headers=headers)

    @app.get("/v1/resources", tags=["state"])
    def resources(
        namespace: Annotated[KubeName, Query()],
        who: Authed,
        resource_type: Annotated[ResourceType | None, Query(alias="resourceType")] = None,
        resource_name: Annotated[KubeName | None, Query(alias="resourceName")] = None,
        deployment_id: Annotated[DeploymentId | None, Query(alias="deploymentId")] = None,
    ) -> dict[str, Any]:
        """Actual vs desired state with drift details, usage and cost (seed 001)."""
        return service.resources(
            who,
            namespace=namespace,
            resource_type=resource_type,
            resource_name=resource_name,
            deployment_id=deployment_id,
        )

    @app.post("/v1/resources", tags=["state"])
    def query_resources(body: ResourceQuery, who: Authed) -> dict[str, Any]:
        """The same query as ``GET /v1/resources``, as a JSON body."""
        return service.resources(
            who,
            namespace=body.namespace,
            resource_type=body.resource_type,
            resource_name=body.resource_name,
            deployment_id=body.deployment_id,
        )

    @app.get("/v1/costs", tags=["state"])
    def costs(
        who: Authed,
        group_by: Annotated[
            str, Query(alias="groupBy", pattern="^(team|application|namespace)$")
        ] = "team",
    ) -> dict[str, Any]:
        """Estimated monthly cost aggregated by team, application or namespace."""
        who.require_scope(SCOPE_READ)
        visible = None if who.may_access("*") else set(who.namespaces)
        return scanner.costs(group_by=group_by, namespaces=visible)

    @app.get("/v1/orphans", tags=["state"])
    def orphans(who: Authed) -> dict[str, Any]:
        """Tagged cloud resources with no deployment behind them (nothing is deleted)."""
        who.require_scope(SCOPE_READ)
        if not who.may_access("*"):
            raise Forbidden("listing orphans needs a token for all namespaces ('*')")
        return scanner.orphans()

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        # FastAPI documents validation as 422; this API answers 400 in the error shape.
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                responses = operation.get("responses", {})
                if "422" in responses and "quota" not in str(responses["422"]):
                    responses.pop("422")
                responses.setdefault(
                    "400",
                    {
                        "description": "validation_failed or invalid_request",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/ErrorBody"}
                            }
                        },
                    },
                )
        _add_examples(schema)
        _markdown(schema)
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
        }
        schema["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return Gatekeeper(app, service, verifier=verifier, limiter=limiter)


#: Request bodies shown in the OpenAPI document: seed 001's own examples.
REQUEST_EXAMPLES: dict[str, dict[str, Any]] = {
    "/v1/provision": {
        "resourceType": "database",
        "resourceName": "postgres-app-db",
        "namespace": "team-platform",
        "team": "platform-team",
        "owner": "user@example.com",
        "callbackUrl": "http://manager:9090/v1/callback",
        "spec": {
            "engine": "postgresql",
            "version": "15",
            "size": "medium",
            "highAvailability": True,
            "backup": {"enabled": True, "retention": "7d"},
            "encryption": {"atRest": True, "inTransit": True},
        },
    },
    "/v1/deprovision": {
        "deploymentId": "deploy-fc8fc917314e2b8b698427458cd35342",
        "resourceType": "database",
        "resourceName": "postgres-app-db",
        "namespace": "team-platform",
        "callbackUrl": "http://manager:9090/v1/callback",
    },
}
REQUEST_EXAMPLES["/api/v1/deploy"] = REQUEST_EXAMPLES["/v1/provision"]


def _add_examples(schema: dict[str, Any]) -> None:
    for path, example in REQUEST_EXAMPLES.items():
        operation = schema.get("paths", {}).get(path, {}).get("post")
        if operation is None:
            continue
        content = operation.get("requestBody", {}).get("content", {}).get("application/json")
        if content is not None:
            content["example"] = example


def _markdown(node: Any) -> None:
    """OpenAPI descriptions are Markdown; the docstrings they come from use
    reStructuredText's double backticks for code."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("description", "summary") and isinstance(value, str):
                node[key] = value.replace("``", "`")
            else:
                _markdown(value)
    elif isinstance(node, list):
        for item in node:
            _markdown(item)
