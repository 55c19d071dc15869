"""JWT verification of users' session tokens, for every service that serves users.

HS256 tokens are checked with AUTH_SECRET; when AUTH_JWKS_URL is set, tokens signed with one of
AUTH_JWKS_ALGORITHMS (RS256/ES256) are checked with the key of that JWKS named by the token's
`kid`. The algorithm list is fixed here by configuration and never read from the token: the
token's header only chooses among the allowed ones, so `alg: none` and an HS256 token "signed"
with a public key both fail. `exp` and `sub` are required; `iss`/`aud` are checked when set.

`verify` may fetch the JWKS over the network (cached for JWKS_CACHE_S); async callers run it
in a thread.
"""

from dataclasses import dataclass

import jwt

from quota_common.keys import is_valid_id
from quota_common.settings import Settings

# A user id as DESIGN.md defines ids: the subject becomes Redis keys and Postgres rows.
TOKEN_CHARS_MAX = 8192
JWKS_CACHE_S = 300
JWKS_TIMEOUT_S = 5
# Each asymmetric algorithm and the JWK key type it must come with.
KEY_TYPES = {"RS256": "RSA", "ES256": "EC"}


class AuthError(Exception):
    """The token is missing or not acceptable; the message is safe to show the client."""


@dataclass(frozen=True, slots=True)
class Verifier:
    secret: bytes
    jwks: jwt.PyJWKClient | None
    jwks_algorithms: tuple[str, ...]
    issuer: str | None
    audience: str | None


def verifier(settings: Settings) -> Verifier:
    if settings.auth_secret is None:
        raise ValueError("AUTH_SECRET is not set; call settings.require_billing first")
    jwks = None
    if settings.auth_jwks_url:
        jwks = jwt.PyJWKClient(
            settings.auth_jwks_url,
            # Per-kid caching never expires: a key removed from the JWKS would stay trusted.
            cache_keys=False,
            lifespan=JWKS_CACHE_S,
            timeout=JWKS_TIMEOUT_S,
        )
    return Verifier(
        secret=settings.auth_secret.encode(),
        jwks=jwks,
        jwks_algorithms=settings.auth_jwks_algorithms,
        issuer=settings.auth_issuer,
        audience=settings.auth_audience,
    )


def _key_for(v: Verifier, token: str, algorithm: str) -> object:
    if algorithm == "HS256":
        return v.secret
    if v.jwks is None or algorithm not in v.jwks_algorithms:
        raise AuthError(f"tokens signed with {algorithm} are not accepted")
    try:
        signing_key = v.jwks.get_signing_key_from_jwt(token)
    except jwt.PyJWKClientConnectionError:
        raise AuthError("the signing keys could not be fetched") from None
    except jwt.PyJWTError:
        raise AuthError("the token's key is not known") from None
    if signing_key.key_type != KEY_TYPES[algorithm]:
        raise AuthError("the token's key does not match its algorithm")
    return signing_key.key


def verify(v: Verifier, token: str) -> str:
    """The user id (`sub`) of a valid token; AuthError otherwise."""
    if not token or len(token) > TOKEN_CHARS_MAX:
        raise AuthError("missing or oversized token")
    try:
        algorithm = jwt.get_unverified_header(token).get("alg")
    except jwt.PyJWTError:
        raise AuthError("the token is malformed") from None
    if not isinstance(algorithm, str) or algorithm not in ("HS256", *KEY_TYPES):
        raise AuthError("the token's algorithm is not accepted")
    key = _key_for(v, token, algorithm)
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
    subject = claims.get("sub")
    if not is_valid_id(subject):
        raise AuthError("the token's subject is not a valid user id")
    return subject
