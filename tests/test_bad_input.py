"""Guarantee 9, table-driven: bad input of any kind gets a 4xx JSON error and changes nothing in
Redis (the whole test database is compared before and after)."""

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from sidecar.http import repeated_key
from tests.api import reserve
from tests.books import snapshot

GOOD: dict[str, dict[str, Any]] = {
    "/v1/reserve": {"user_id": "victim", "tokens": 10, "reservation_id": "new"},
    "/v1/extend": {"user_id": "victim", "reservation_id": "open", "tokens": 2000},
    "/v1/commit": {"user_id": "victim", "reservation_id": "open", "tokens": 10},
    "/v1/refund": {"user_id": "victim", "reservation_id": "open"},
}
MISSING = object()


def changed(path: str, **fields: Any) -> dict[str, Any]:
    body = dict(GOOD[path])
    for name, value in fields.items():
        if value is MISSING:
            body.pop(name)
        else:
            body[name] = value
    return body


BAD_IDS = ["", "x" * 129, "a/b", "a b", " a", "ü", "名前", "a\n", "a%2F", "a#b", 5, ["a"], {}]
BAD_COUNTS = [5.0, "5", True, False, -1, 10**9 + 1, 10**30, [5], {"n": 5}, "", 1e3, None]

CASES: list[tuple[str, dict[str, Any] | list[Any] | str | int]] = []
for route in GOOD:
    # Every bad value on reserve; a sample on the other routes, which share the validators.
    ids = BAD_IDS if route == "/v1/reserve" else ["", "a/b", "a\n", 5]
    counts = BAD_COUNTS if route == "/v1/reserve" else [5.0, "5", True, -1, 10**9 + 1]
    for name in GOOD[route]:
        if (route, name) == ("/v1/reserve", "reservation_id"):
            continue  # optional: the sidecar makes one
        CASES.append((route, changed(route, **{name: MISSING})))
    for name in ("user_id", "reservation_id"):
        if name in GOOD[route]:
            CASES += [(route, changed(route, **{name: bad})) for bad in ids if bad is not None]
    if "tokens" in GOOD[route]:
        CASES += [(route, changed(route, tokens=bad)) for bad in counts if bad is not None]
    CASES += [
        (route, changed(route, unknown="x")),
        (route, changed(route, User_id="victim")),
        (route, []),
        (route, "text"),
        (route, 5),
    ]
CASES += [
    ("/v1/reserve", changed("/v1/reserve", tokens=0)),
    ("/v1/reserve", changed("/v1/reserve", ttl_s=0)),
    ("/v1/reserve", changed("/v1/reserve", ttl_s=3601)),
    ("/v1/reserve", changed("/v1/reserve", ttl_s=1.5)),
    ("/v1/reserve", changed("/v1/reserve", ttl_s="60")),
    ("/v1/reserve", changed("/v1/reserve", min_tokens=0)),
    ("/v1/reserve", changed("/v1/reserve", min_tokens=11)),
    ("/v1/reserve", changed("/v1/reserve", min_tokens=True)),
    ("/v1/reserve", changed("/v1/reserve", metadata={f"k{i}": "v" for i in range(17)})),
    ("/v1/reserve", changed("/v1/reserve", metadata={"k": 1})),
    ("/v1/reserve", changed("/v1/reserve", metadata={"k": None})),
    ("/v1/reserve", changed("/v1/reserve", metadata={"k": {"nested": "x"}})),
    ("/v1/reserve", changed("/v1/reserve", metadata={"k": ["x"]})),
    ("/v1/reserve", changed("/v1/reserve", metadata={"k": "v" * 257})),
    ("/v1/reserve", changed("/v1/reserve", metadata={"": "v"})),
    ("/v1/reserve", changed("/v1/reserve", metadata=["k", "v"])),
    ("/v1/reserve", changed("/v1/reserve", metadata="k=v")),
    ("/v1/commit", changed("/v1/commit", tokens=-1)),
    ("/v1/commit", changed("/v1/commit", metadata={"k": 2})),
    ("/v1/extend", changed("/v1/extend", tokens=0)),
    ("/v1/extend", changed("/v1/extend", tokens=999)),  # below the open hold of 1000
    ("/v1/extend", changed("/v1/extend", ttl_s=-5)),
    ("/v1/extend", changed("/v1/extend", min_tokens=1)),
]


@pytest.fixture(autouse=True)
async def clean_state(redis: Redis) -> None:
    """Overrides the conftest's: these requests never write Postgres (the one reserve below
    only reads it), so emptying Redis is enough and the ~200 cases skip a TRUNCATE each."""
    await redis.flushdb()


@pytest.fixture
async def before(http: httpx.AsyncClient, redis: Redis) -> AsyncIterator[dict[bytes, bytes | None]]:
    """A loaded user with an open hold "open" of 1000 tokens; yields the Redis snapshot."""
    status, body = await reserve(http, "victim", 1000, reservation_id="open")
    assert status == 200 and body["used"] == 0
    state = await snapshot(redis)
    yield state
    assert await snapshot(redis) == state, "a refused request changed Redis"


def assert_error(response: httpx.Response, status: int | tuple[int, ...]) -> dict[str, Any]:
    expected = status if isinstance(status, tuple) else (status,)
    assert response.status_code in expected, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert isinstance(body["error"]["code"], str) and body["error"]["code"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body


@pytest.mark.parametrize(
    ("path", "body"), CASES, ids=[f"{p}-{i}" for i, (p, _) in enumerate(CASES)]
)
async def test_bad_body_is_422_and_changes_nothing(
    http: httpx.AsyncClient, before: dict[bytes, bytes | None], path: str, body: object
) -> None:
    # The stdlib encoder, so 10**30 goes on the wire as an integer.
    response = await http.post(path, content=json.dumps(body).encode(), headers=JSON)
    error = assert_error(response, 422)
    assert error["error"]["code"] == "validation_error"


JSON = {"content-type": "application/json"}
BIG = orjson.dumps({**GOOD["/v1/reserve"], "metadata": {"k": "v" * 70_000}})


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 8192):
        yield data[start : start + 8192]


# Shapes that once reached code beyond validation: nesting past Python's recursion limit, and
# thousands of keys for the repeated-key check.
DEEP = b'{"user_id": "victim", "tokens": 1, "metadata": ' + b'{"a": ' * 1000 + b"1" + b"}" * 1001
MANY_KEYS = b"{" + b",".join(b'"k%d": 1' % i for i in range(6000)) + b"}"

RAW: list[tuple[str, str, bytes | None, dict[str, str], int, str]] = [
    ("POST", "/v1/reserve", b"{not json", JSON, 400, "invalid_json"),
    ("POST", "/v1/reserve", b"", JSON, 400, "invalid_json"),
    ("POST", "/v1/reserve", b'{"user_id": "victim", "tokens": 10', JSON, 400, "invalid_json"),
    ("POST", "/v1/reserve", b"\xff\xfe", JSON, 400, "invalid_json"),
    ("POST", "/v1/commit", b"NaN", JSON, 400, "invalid_json"),
    ("POST", "/v1/reserve", DEEP, JSON, 422, "validation_error"),
    ("POST", "/v1/reserve", b"[" * 1000 + b"]" * 1000, JSON, 422, "validation_error"),
    ("POST", "/v1/reserve", MANY_KEYS, JSON, 422, "validation_error"),
    # A repeated key is a client's typo: orjson would keep the last one silently.
    (
        "POST",
        "/v1/reserve",
        b'{"user_id": "victim", "tokens": 1, "tokens": 2}',
        JSON,
        422,
        "validation_error",
    ),
    (
        "POST",
        "/v1/reserve",
        b'{"user_id": "victim", "tokens": 1, "\\u0074okens": 2}',
        JSON,
        422,
        "validation_error",
    ),
    (
        "POST",
        "/v1/reserve",
        b'{"user_id": "victim", "tokens": 1, "metadata": {"c": "1", "c": "2"}}',
        JSON,
        422,
        "validation_error",
    ),
    (
        "POST",
        "/v1/reserve",
        orjson.dumps(GOOD["/v1/reserve"]),
        {"content-type": "text/plain"},
        415,
        "unsupported_media_type",
    ),
    (
        "POST",
        "/v1/reserve",
        orjson.dumps(GOOD["/v1/reserve"]),
        {"content-type": "application/x-www-form-urlencoded"},
        415,
        "unsupported_media_type",
    ),
    ("POST", "/v1/refund", orjson.dumps(GOOD["/v1/refund"]), {}, 415, "unsupported_media_type"),
    ("POST", "/v1/reserve", BIG, JSON, 413, "payload_too_large"),
    ("GET", "/v1/reserve", None, {}, 405, "method_not_allowed"),
    ("PUT", "/v1/commit", orjson.dumps(GOOD["/v1/commit"]), JSON, 405, "method_not_allowed"),
    ("DELETE", "/v1/refund", None, {}, 405, "method_not_allowed"),
    ("POST", "/v1/usage/victim", b"{}", JSON, 405, "method_not_allowed"),
    ("GET", "/v1/nothing", None, {}, 404, "not_found"),
    ("POST", "/v2/reserve", orjson.dumps(GOOD["/v1/reserve"]), JSON, 404, "not_found"),
    ("GET", "/v1/usage/", None, {}, 404, "not_found"),
    ("POST", "/v1/reserve/", orjson.dumps(GOOD["/v1/reserve"]), JSON, 404, "not_found"),
    ("GET", "/v1/usage/a%20b", None, {}, 422, "validation_error"),
    ("GET", "/v1/usage/" + "x" * 129, None, {}, 422, "validation_error"),
    ("GET", "/v1/usage/%C3%BC", None, {}, 422, "validation_error"),
]


@pytest.mark.parametrize(
    ("method", "path", "content", "headers", "status", "code"),
    RAW,
    ids=[f"{m}-{p}-{s}-{i}" for i, (m, p, _, _, s, _) in enumerate(RAW)],
)
async def test_bad_request_is_a_json_error_and_changes_nothing(
    http: httpx.AsyncClient,
    before: dict[bytes, bytes | None],
    method: str,
    path: str,
    content: bytes | None,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    response = await http.request(method, path, content=content, headers=headers)
    error = assert_error(response, status)
    assert error["error"]["code"] == code


async def test_streamed_body_over_64_kb_without_length_is_413(
    http: httpx.AsyncClient, before: dict[bytes, bytes | None]
) -> None:
    response = await http.post("/v1/reserve", content=chunks(BIG), headers=JSON)
    assert "content-length" not in response.request.headers
    error = assert_error(response, 413)
    assert error["error"]["code"] == "payload_too_large"


async def test_declared_length_over_64_kb_is_413_before_reading(
    sidecar_url: str, before: dict[bytes, bytes | None]
) -> None:
    """A Content-Length over the limit is refused without waiting for the body."""
    host, port = sidecar_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/reserve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 99999999\r\n\r\n{}"
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 413"), head


async def test_body_of_exactly_the_limit_is_read(http: httpx.AsyncClient) -> None:
    """64 KB of JSON is accepted as a body (and then refused for its content, not its size)."""
    filler = {f"k{i}": "v" * 200 for i in range(16)}
    body = orjson.dumps({**GOOD["/v1/reserve"], "metadata": filler})
    padded = body[:-1] + b" " * (64 * 1024 - len(body)) + b"}"
    assert len(padded) == 64 * 1024
    response = await http.post("/v1/reserve", content=padded, headers=JSON)
    assert response.status_code == 200, response.text


# ("POST", "/v1/reserve/") is not here: Starlette answers it 307 to /v1/reserve (no change).
ODD: list[tuple[str, str]] = [
    ("POST", "//v1/reserve"),
    ("POST", "/V1/RESERVE"),
    ("OPTIONS", "/v1/reserve"),
    ("PATCH", "/v1/extend"),
    ("GET", "/v1/usage/victim/extra"),
    ("GET", "/v1"),
    ("GET", "/"),
    ("POST", "/admin/v1/users//reset"),
    ("GET", "/admin/v1/users/victim/reset"),
    ("POST", "/v1/reserve%00"),
]


@pytest.mark.parametrize(("method", "path"), ODD, ids=[f"{m}-{p}" for m, p in ODD])
async def test_odd_requests_are_4xx_json_never_5xx(
    http: httpx.AsyncClient, before: dict[bytes, bytes | None], method: str, path: str
) -> None:
    response = await http.request(
        method, path, content=orjson.dumps(GOOD["/v1/reserve"]), headers=JSON
    )
    assert_error(response, tuple(range(400, 500)))


async def test_query_string_is_ignored_and_charset_accepted(http: httpx.AsyncClient) -> None:
    for content_type in ("application/json; charset=utf-8", "Application/JSON"):
        response = await http.post(
            "/v1/reserve?debug=1",
            content=orjson.dumps({"user_id": "victim", "tokens": 1}),
            headers={"content-type": content_type},
        )
        assert response.status_code == 200, response.text


async def test_a_value_that_spells_a_field_name_is_no_repeated_key(http: httpx.AsyncClient) -> None:
    body = b'{"user_id": "tokens", "tokens": 3, "metadata": {"tokens": "user_id"}}'
    response = await http.post("/v1/reserve", content=body, headers=JSON)
    assert response.status_code == 200, response.text
    assert response.json()["granted"] == 3


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /v1/reserve HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
        b"POST /v1/reserve HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"NOT-HTTP\r\n\r\n",
    ],
)
async def test_a_request_httptools_cannot_parse_gets_a_json_400(
    sidecar_url: str, request_bytes: bytes, before: dict[bytes, bytes | None]
) -> None:
    host, port = sidecar_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request_bytes)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer
    assert b"content-type: application/json" in head.lower()
    assert orjson.loads(body)["error"]["code"] == "bad_request"


KEYS = st.sampled_from(["user_id", "tokens", "metadata", 'say "hi"', "a\\b", "é", "x:", ""])
TEXTS = st.sampled_from(["", "tokens", '":', 'x": 1, "tokens', "\\", "é", "::1"])
SEPARATORS = st.sampled_from([b":", b" : ", b":\t", b"\n:"])
Pairs = list[tuple[str, bytes, bytes]]


def object_text(pairs: Pairs) -> bytes:
    return b"{" + b",".join(json.dumps(k).encode() + sep + value for k, sep, value in pairs) + b"}"


def encoded(pairs: Sequence[tuple[str, bytes, str | int]]) -> Pairs:
    return [(k, sep, json.dumps(v).encode()) for k, sep, v in pairs]


@settings(max_examples=1000)
@given(
    st.lists(st.tuples(KEYS, SEPARATORS, TEXTS), max_size=5),
    st.lists(st.tuples(KEYS, SEPARATORS, st.one_of(TEXTS, st.integers())), max_size=6),
)
def test_a_repeated_key_is_found_exactly_when_the_body_repeats_one(
    metadata: list[tuple[str, bytes, str]], fields: list[tuple[str, bytes, str | int]]
) -> None:
    """Property: escapes, colons and quotes inside keys and values, white space before a colon
    on some keys and not others."""
    pairs = [*encoded(fields), ("md", b":", object_text(encoded(metadata)))]
    raw = object_text(pairs)
    keys = [k for k, _, _ in pairs]
    inner = [k for k, _, _ in metadata]
    expected = len(set(keys)) < len(keys) or len(set(inner)) < len(inner)
    assert (repeated_key(raw, orjson.loads(raw)) is not None) == expected, raw
