"""JWT verification of users' session tokens, for every service that serves users.

HS256 tokens are checked with AUTH_SECRET; when AUTH_JWKS_URL is set, tokens signed with one of
AUTH_JWKS_ALGORITHMS (RS256/ES256) are checked with the key of that JWKS named by the token's
`kid`. The algorithm list is fixed here by configuration and never read from the token: the
token's header only chooses among the allowed ones, so `alg: none` and an HS256 token "signed"
with a public key both fail. `exp` and `sub` are required (`exp`, `nbf`, `iat` as JSON numbers);
`iss`/`aud` are checked when set.

HS256 never waits for anything. The JWKS is fetched asynchronously, one fetch at a time (callers
arriving meanwhile await the same one) with a short timeout, and cached: a known key is answered
from the cache at once, refreshed in the background after JWKS_CACHE_S, and still trusted for up
to JWKS_STALE_S while the JWKS cannot be fetched, so an identity provider outage neither queues
requests nor locks out users whose key is known. A fetch is tried at most once per JWKS_RETRY_S,
so tokens with made-up `kid`s cannot make us hammer the provider.
"""

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt

from quota_common.keys import is_valid_id
from quota_common.settings import Settings

TOKEN_CHARS_MAX = 8192
JWKS_CACHE_S = 300.0
JWKS_STALE_S = 3600.0
JWKS_RETRY_S = 10.0
JWKS_TIMEOUT_S = 2.0
JWKS_BYTES_MAX = 64 * 1024
# Each asymmetric algorithm and the JWK key type it must come with.
KEY_TYPES = {"RS256": "RSA", "ES256": "EC"}
# Claims that RFC 7519 makes JSON numbers (pyjwt also takes numeric strings).
TIME_CLAIMS = ("exp", "nbf", "iat")
log = logging.getLogger("quota_common.auth")


class AuthError(Exception):
    """The token is missing or not acceptable; the message is safe to show the client."""


@dataclass(slots=True)
class Jwks:
    """The identity provider's keys by `kid`, as last fetched (monotonic times)."""

    url: str
    cache_s: float = JWKS_CACHE_S
    stale_s: float = JWKS_STALE_S
    retry_s: float = JWKS_RETRY_S
    timeout_s: float = JWKS_TIMEOUT_S
    keys: dict[str, jwt.PyJWK] = field(default_factory=dict)
    fetched_at: float = -math.inf
    tried_at: float = -math.inf
    fetching: asyncio.Task[None] | None = None


@dataclass(frozen=True, slots=True)
class Verifier:
    secret: bytes
    jwks: Jwks | None
    jwks_algorithms: tuple[str, ...]
    issuer: str | None
    audience: str | None


def verifier(settings: Settings) -> Verifier:
    if settings.auth_secret is None:
        raise ValueError("AUTH_SECRET is not set; call settings.require_billing first")
    return Verifier(
        secret=settings.auth_secret.encode(),
        jwks=Jwks(settings.auth_jwks_url) if settings.auth_jwks_url else None,
        jwks_algorithms=settings.auth_jwks_algorithms,
        issuer=settings.auth_issuer,
        audience=settings.auth_audience,
    )


async def _download(jwks: Jwks) -> bytes:
    async with (
        asyncio.timeout(jwks.timeout_s),
        httpx.AsyncClient(timeout=jwks.timeout_s) as client,
        client.stream("GET", jwks.url) as reply,
    ):
        reply.raise_for_status()
        body = bytearray()
        async for chunk in reply.aiter_bytes():
            body += chunk
            if len(body) > JWKS_BYTES_MAX:
                raise ValueError("the JWKS is too large")
        return bytes(body)


async def _fetch(jwks: Jwks) -> None:
    """Replaces the cached keys with the JWKS's, so a key it no longer lists is dropped."""
    try:
        document = json.loads(await _download(jwks))
        if not isinstance(document, dict):
            raise ValueError("the JWKS is not a JSON object")
        keys = jwt.PyJWKSet.from_dict(document).keys
    except (httpx.HTTPError, TimeoutError, ValueError, jwt.PyJWTError) as error:
        # ValueError: not JSON (json.JSONDecodeError), not an object, or too large.
        log.warning("jwks fetch failed", extra={"error": type(error).__name__})
    else:
        jwks.keys = {key.key_id: key for key in keys if key.key_id}
        jwks.fetched_at = time.monotonic()
    finally:
        jwks.fetching = None


def _refresh(jwks: Jwks) -> asyncio.Task[None] | None:
    """The fetch under way, or a new one unless one was tried within retry_s."""
    if jwks.fetching is None and time.monotonic() - jwks.tried_at >= jwks.retry_s:
        jwks.tried_at = time.monotonic()
        jwks.fetching = asyncio.create_task(_fetch(jwks))
    return jwks.fetching


async def _jwks_key(jwks: Jwks, kid: str) -> jwt.PyJWK:
    age_s = time.monotonic() - jwks.fetched_at
    key = jwks.keys.get(kid)
    if key is not None and age_s < jwks.stale_s:
        if age_s >= jwks.cache_s:
            _refresh(jwks)
        return key
    fetch = _refresh(jwks)
    if fetch is not None:
        # Shielded: a caller that gives up does not cancel the fetch the others await.
        await asyncio.shield(fetch)
    key = jwks.keys.get(kid) if time.monotonic() - jwks.fetched_at < jwks.stale_s else None
    if key is None:
        if jwks.fetched_at == -math.inf:
            raise AuthError("the signing keys could not be fetched")
        raise AuthError("the token's key is not known")
    return key


async def _key_for(v: Verifier, header: dict[str, Any], algorithm: str) -> object:
    if algorithm == "HS256":
        return v.secret
    if v.jwks is None or algorithm not in v.jwks_algorithms:
        raise AuthError(f"tokens signed with {algorithm} are not accepted")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise AuthError("the token names no key (kid)")
    signing_key = await _jwks_key(v.jwks, kid)
    if signing_key.key_type != KEY_TYPES[algorithm]:
        raise AuthError("the token's key does not match its algorithm")
    return signing_key.key


async def verify(v: Verifier, token: str) -> str:
    """The user id (`sub`) of a valid token; AuthError otherwise."""
    if not token or len(token) > TOKEN_CHARS_MAX:
        raise AuthError("missing or oversized token")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise AuthError("the token is malformed") from None
    algorithm = header.get("alg")
    if not isinstance(algorithm, str) or algorithm not in ("HS256", *KEY_TYPES):
        raise AuthError("the token's algorithm is not accepted")
    key = await _key_for(v, header, algorithm)
    required = ["exp", "sub"]
    if v.issuer is not None:
        required.append("iss")
    if v.audience is not None:
        required.append("aud")
    try:
        claims = jwt.decode(
            token,
            key,  # type: ignore[arg-type]
            algorithms=[algorithm],
            issuer=v.issuer,
            audience=v.audience,
            options={"require": required, "verify_aud": v.audience is not None},
        )
    except (jwt.PyJWTError, ValueError, TypeError):
        # ValueError/TypeError: a key pyjwt cannot use for this algorithm.
        raise AuthError("the token is invalid or expired") from None
    if any(name in claims and type(claims[name]) not in (int, float) for name in TIME_CLAIMS):
        raise AuthError("exp, nbf and iat must be JSON numbers")
    subject = claims.get("sub")
    if not is_valid_id(subject):
        raise AuthError("the token's subject is not a valid user id")
    return subject
