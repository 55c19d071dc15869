"""ASGI apps the benchmark serves with uvicorn, each a factory (`uvicorn --factory`):

- `bare_app`: the ceiling. The sidecar's server configuration (uvicorn, uvloop, httptools,
  Starlette, orjson) around one JSON endpoint that parses the body and answers, nothing else.
- `bare_asgi_app`: the same endpoint as a plain ASGI callable, without Starlette: the floor of
  the HTTP layer alone (the sidecar's hot routes are plain ASGI endpoints too).
- `sidecar_app`: the real sidecar, for runs with several uvicorn workers (the `quota-sidecar`
  console script serves one process).
- `naive_app`: what the original billing service did: read the user's usage from Postgres,
  decide, call the LLM (a short await), then increment in Postgres. Its gap between the read and
  the write is how it grants tokens beyond the quota under concurrency.

Settings come from the environment, as for the console scripts.
"""

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from quota_common import db, logs
from quota_common import settings as settings_module
from sidecar.app import create_app

JSON = "application/json"
NAIVE_TABLE = "bench_naive_usage"
NAIVE_READ = "SELECT used, quota FROM bench_naive_usage WHERE user_id = :user_id"
NAIVE_INCREMENT = "UPDATE bench_naive_usage SET used = used + :tokens WHERE user_id = :user_id"


def json_response(content: object, status_code: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, media_type=JSON)


async def bare(request: Request) -> Response:
    body = orjson.loads(await request.body())
    user_id = body.get("user_id") if isinstance(body, dict) else None
    return json_response({"user_id": user_id, "ok": True})


def bare_app() -> Starlette:
    return Starlette(routes=[Route("/bare", bare, methods=["POST"])])


def bare_asgi_app() -> ASGIApp:
    """The same endpoint as a plain ASGI callable: what uvicorn and httptools cost alone."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan: nothing to start (uvicorn goes on without it)
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = orjson.loads(b"".join(chunks)) if scope["path"] == "/bare" else None
        user_id = body.get("user_id") if isinstance(body, dict) else None
        content = orjson.dumps({"user_id": user_id, "ok": True})
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(content)),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    return app


def sidecar_app() -> ASGIApp:
    settings = settings_module.load()
    logs.setup(settings.log_level)
    return create_app(settings)


def naive_app() -> Starlette:
    settings = settings_module.load()
    llm_s = int(os.environ.get("NAIVE_LLM_MS", "1")) / 1000
    engine = db.async_engine(
        settings.database_url, pool_size=int(os.environ.get("NAIVE_POOL", "20"))
    )
    read, increment = text(NAIVE_READ), text(NAIVE_INCREMENT)

    async def chat(request: Request) -> Response:
        body = orjson.loads(await request.body())
        user_id, tokens = str(body["user_id"]), int(body["tokens"])
        async with engine.connect() as conn:
            row = (await conn.execute(read, {"user_id": user_id})).first()
        if row is None:
            return json_response({"error": "unknown user"}, 404)
        if row.used + tokens > row.quota:
            return json_response({"error": "quota_exceeded", "used": row.used}, 429)
        await asyncio.sleep(llm_s)  # the LLM call
        async with engine.begin() as conn:
            await conn.execute(increment, {"user_id": user_id, "tokens": tokens})
        return json_response({"user_id": user_id, "granted": tokens})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await engine.dispose()

    return Starlette(routes=[Route("/chat", chat, methods=["POST"])], lifespan=lifespan)
