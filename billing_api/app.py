"""The billing API's Starlette application: plans, subscriptions, usage, payments, webhooks."""

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import stripe
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from billing_api import fields, metrics, payments, ratelimit, stripe_api, subscriptions, usage
from billing_api.errors import unauthorized
from billing_api.http import (
    WEBHOOK_BYTES_MAX,
    Handler,
    JSONResponse,
    SecurityHeaders,
    endpoint,
    http_error,
    read_body,
    read_json,
)
from billing_api.openapi import openapi_document
from billing_api.services import Services
from billing_api.webhooks import handle
from quota_common import auth, db, redis_client
from quota_common.codes import ApiError, ErrorCode, invalid
from quota_common.plans import catalogue
from quota_common.scripts import AnyRedis, register_all
from quota_common.settings import Settings

Authed = Callable[[Request, str], Awaitable[Response]]


def token_of(request: Request) -> str:
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise unauthorized("use Authorization: Bearer <token>")
        return value.strip()
    cookie = request.cookies.get("session")
    if not cookie:
        raise unauthorized("a session token is required")
    return cookie


def create_app(
    settings: Settings,
    redis: AnyRedis | None = None,
    engine: AsyncEngine | None = None,
    stripe_client: stripe.StripeClient | None = None,
) -> Starlette:
    services = Services(
        settings=settings,
        plans=catalogue(settings),
        engine=engine or db.async_engine(settings.database_url, pool_size=10),
        redis=redis or redis_client.connect(settings),
        stripe=stripe_client or stripe_api.client(settings),
        verifier=auth.verifier(settings),
    )
    per_user = ratelimit.Limiter(settings.billing_rate_user_per_min)
    per_address = ratelimit.Limiter(settings.billing_rate_address_per_min)

    async def user_of(request: Request) -> str:
        token = token_of(request)
        try:
            return await auth.verify(services.verifier, token)
        except auth.AuthError as error:
            raise unauthorized(str(error)) from None

    def limited(limiter: ratelimit.Limiter, key: str, scope: str) -> None:
        retry_after = ratelimit.hit(limiter, key)
        if retry_after:
            metrics.RATE_LIMITED.labels(scope).inc()
            raise ApiError(
                429,
                ErrorCode.RATE_LIMITED,
                "too many requests; slow down",
                {"Retry-After": str(retry_after)},
            )

    def user_route(name: str, mutating: bool = False) -> Callable[[Authed], Handler]:
        def wrap(handler: Authed) -> Handler:
            @endpoint(name)
            async def run(request: Request) -> Response:
                if mutating:
                    limited(per_address, request.client.host if request.client else "-", "address")
                user_id = await user_of(request)
                if mutating:
                    limited(per_user, user_id, "user")
                return await handler(request, user_id)

            return run

        return wrap

    @endpoint("plans")
    async def plans(request: Request) -> Response:
        return JSONResponse(
            {
                "ok": True,
                "plans": {
                    p.name: {"price": p.price_cents, "quota": p.quota, "features": list(p.features)}
                    for p in services.plans.values()
                },
            }
        )

    @user_route("subscribe", mutating=True)
    async def subscribe(request: Request, user_id: str) -> Response:
        plan, payment_method = fields.subscribe_body(await read_json(request))
        view = await subscriptions.subscribe(services, user_id, plan, payment_method)
        return JSONResponse({"ok": True, "subscription": view}, status_code=201)

    @user_route("change_plan", mutating=True)
    async def change_plan(request: Request, user_id: str) -> Response:
        plan = fields.change_plan_body(await read_json(request))
        view = await subscriptions.change_plan(services, user_id, plan)
        return JSONResponse({"ok": True, "subscription": view})

    @user_route("cancel", mutating=True)
    async def cancel(request: Request, user_id: str) -> Response:
        at_period_end = fields.cancel_body(await read_json(request))
        view = await subscriptions.cancel(services, user_id, at_period_end)
        return JSONResponse({"ok": True, "subscription": view})

    @user_route("subscription")
    async def subscription(request: Request, user_id: str) -> Response:
        async with services.engine.connect() as conn:
            view = await subscriptions.current(services, conn, user_id)
        return JSONResponse({"ok": True, "subscription": view})

    @user_route("usage")
    async def current_usage(request: Request, user_id: str) -> Response:
        if request.query_params:
            raise invalid("this route takes no query parameters")
        return JSONResponse(await usage.current(services, user_id))

    @user_route("usage_history")
    async def usage_history(request: Request, user_id: str) -> Response:
        first, last, group_by = fields.history_query(request.query_params)
        return JSONResponse(await usage.history(services, user_id, first, last, group_by))

    @user_route("payments")
    async def payment_history(request: Request, user_id: str) -> Response:
        limit, after = fields.payments_query(request.query_params)
        async with services.engine.connect() as conn:
            return JSONResponse(await payments.page(conn, user_id, limit, after))

    @endpoint("stripe_webhook")
    async def stripe_webhook(request: Request) -> Response:
        payload = await read_body(request, WEBHOOK_BYTES_MAX)
        answer = await handle(services, payload, request.headers.get("stripe-signature"))
        return JSONResponse(answer)

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True, "status": "ok"})

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    document = openapi_document()

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Redis down at start: usage falls back to Postgres until it is back.
        with contextlib.suppress(RedisError, OSError):
            await register_all(services.redis)
        yield
        await services.redis.aclose()
        await services.engine.dispose()

    routes = [
        Route("/api/plans", plans, methods=["GET"]),
        Route("/api/subscribe", subscribe, methods=["POST"]),
        Route("/api/change-plan", change_plan, methods=["POST"]),
        Route("/api/cancel", cancel, methods=["POST"]),
        Route("/api/subscription", subscription, methods=["GET"]),
        Route("/api/usage", current_usage, methods=["GET"]),
        Route("/api/usage/history", usage_history, methods=["GET"]),
        Route("/api/payments", payment_history, methods=["GET"]),
        Route("/api/webhooks/stripe", stripe_webhook, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(SecurityHeaders)],
        exception_handlers={HTTPException: http_error},
    )
    # A trailing-slash typo is a JSON 404, not a redirect built from the Host header.
    app.router.redirect_slashes = False
    app.state.services = services
    return app
