"""Settings of every process, read from the environment and a `.env` file in the working
directory (the environment wins). `load()` checks what every process shares; each process then
calls `require_*` for what only it needs. A bad setting raises SettingsError naming it, which the
console scripts print as one line before exiting with status 2 (`exit_bad_setting`); so does an
address a server cannot listen on (`listening_socket`).
"""

import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlsplit


class SettingsError(Exception):
    pass


# The exit status of a process stopped by a bad setting (or one that cannot work here, such as
# a port already taken).
EXIT_BAD_SETTING = 2


def exit_bad_setting(process: str, error: SettingsError) -> NoReturn:
    """The one line an operator sees, and status 2."""
    print(f"{process}: {error}", file=sys.stderr)
    sys.exit(EXIT_BAD_SETTING)


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    redis_timeout_ms: int = 50
    database_url: str = "postgresql://postgres@127.0.0.1:5432/quota"
    log_level: str = "INFO"
    quota_free: int = 100_000
    quota_plus: int = 1_000_000
    quota_pro: int = 5_000_000
    plan_plus_price: int = 990
    plan_pro_price: int = 1990
    reservation_ttl_s: int = 300
    sidecar_host: str = "127.0.0.1"
    sidecar_port: int = 8700
    sidecar_uds: str | None = None
    sidecar_token: str | None = None
    admin_token: str | None = None
    sidecar_journal_dir: str = "sidecar-journal"
    fail_mode: str = "closed"
    fail_open_budget: int = 1000
    alert_thresholds: tuple[int, ...] = (80, 90, 100)
    alert_webhook_url: str | None = None
    alert_webhook_secret: str | None = None
    auth_secret: str | None = None
    auth_jwks_url: str | None = None
    auth_jwks_algorithms: tuple[str, ...] = ("RS256", "ES256")
    auth_issuer: str | None = None
    auth_audience: str | None = None
    billing_host: str = "127.0.0.1"
    billing_port: int = 3003
    billing_rate_user_per_min: int = 20
    billing_rate_address_per_min: int = 60
    stripe_api_key: str | None = None
    stripe_api_base: str | None = None
    stripe_webhook_secret: str | None = None
    stripe_webhook_tolerance_s: int = 300
    stripe_currency: str = "usd"
    # Sync worker (sync_worker/): metrics and health address, batch bounds and timings.
    sync_worker_host: str = "127.0.0.1"
    sync_worker_port: int = 8701
    sync_batch_size: int = 10_000
    sync_writers: int = 2
    sync_poll_interval_ms: int = 50
    sync_claim_idle_ms: int = 30_000
    sync_redis_timeout_ms: int = 5000
    sync_reap_interval_ms: int = 1000
    sync_plan_refresh_s: int = 60
    sync_drift_interval_s: int = 30
    sync_drift_window_s: int = 86_400
    alert_webhook_timeout_ms: int = 5000
    alert_webhook_backoff_ms: int = 1000
    alert_webhook_backoff_max_ms: int = 300_000
    alert_webhook_attempts_max: int = 30

    @property
    def uses_cluster(self) -> bool:
        return self.redis_cluster or self.redis_url.startswith("redis+cluster://")


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        # `export NAME=value` too: the same file may be sourced by a shell.
        values[key.strip().removeprefix("export ").strip()] = value.strip().strip("'\"")
    return values


def environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    merged = read_env_file(Path(".env"))
    merged.update(os.environ if environ is None else environ)
    return merged


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number, got {raw!r}") from None
    if not low <= value <= high:
        raise SettingsError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"{name} must be 1/true/yes or 0/false/no, got {raw!r}")


def redacted(url: str) -> str:
    """The URL as an error message may show it: without its password."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparsable URL>"
    if not password:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{password}@", ":***@", 1)).geturl()


def _url(env: Mapping[str, str], name: str, default: str, schemes: tuple[str, ...]) -> str:
    value = env.get(name) or default
    try:
        parts = urlsplit(value)
        valid = parts.scheme in schemes and bool(parts.hostname or parts.path)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except ValueError:
        valid = False
    if not valid:
        raise SettingsError(f"{name} must be a {'/'.join(schemes)} URL, got {redacted(value)!r}")
    return value


def _redis_url(env: Mapping[str, str], default: str, cluster: bool) -> str:
    schemes = ("redis", "rediss", "unix", "redis+cluster")
    value = _url(env, "REDIS_URL", default, schemes)
    parts = urlsplit(value)
    # redis-py silently ignores a database that is not a number (redis://host/abc is DB 0).
    query_db = parse_qs(parts.query).get("db", [""])[0]
    path_db = "" if parts.scheme == "unix" else parts.path.removeprefix("/")
    database = query_db or path_db
    if database and not database.isdigit():
        raise SettingsError(
            f"REDIS_URL's database must be a number (redis://host:6379/0), got {database!r}"
        )
    if (cluster or parts.scheme == "redis+cluster") and database not in ("", "0"):
        raise SettingsError(f"REDIS_URL: Redis Cluster has only database 0, got {database!r}")
    return value


def listening_socket(host_setting: str, host: str, port_setting: str, port: int) -> socket.socket:
    """The bound TCP socket a server listens on, taken before the application starts, so an
    address that cannot be had here (a name that does not resolve, not this machine's, or the
    port in use) is one line naming the settings instead of a server's traceback after its
    start-up. Only the process that listens on an address checks it: a name such as a compose
    service's resolves where that service runs, maybe nowhere else. A name that resolves to
    both families is bound on IPv4, as uvicorn binds a name (`localhost` may resolve to ::1
    first, and its clients connect to 127.0.0.1)."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else str(error)
        raise SettingsError(f"{host_setting} {host!r} does not resolve: {reason}") from None
    family, kind, proto, _, address = min(found, key=lambda each: each[0] != socket.AF_INET)
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise SettingsError(
            f"{host_setting}:{port_setting} {host}:{port} cannot be listened on: {error.strerror}"
        ) from None
    return sock


def _optional(env: Mapping[str, str], name: str) -> str | None:
    return env.get(name) or None


def _thresholds(env: Mapping[str, str]) -> tuple[int, ...]:
    raw = env.get("ALERT_THRESHOLDS") or "80,90,100"
    try:
        values = sorted({int(part) for part in raw.split(",") if part.strip()})
    except ValueError:
        raise SettingsError(
            f"ALERT_THRESHOLDS must be percents like 80,90,100, got {raw!r}"
        ) from None
    if not values or values[0] < 1 or values[-1] > 1000:
        raise SettingsError(f"ALERT_THRESHOLDS must be percents from 1 to 1000, got {raw!r}")
    return tuple(values)


def load(environ: Mapping[str, str] | None = None) -> Settings:
    env = environment(environ)
    defaults = Settings()
    fail_mode = (env.get("FAIL_MODE") or "closed").lower()
    if fail_mode not in ("closed", "open"):
        raise SettingsError(f"FAIL_MODE must be 'closed' or 'open', got {fail_mode!r}")
    log_level = (env.get("LOG_LEVEL") or "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise SettingsError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
    redis_cluster = _bool(env, "REDIS_CLUSTER")
    return Settings(
        redis_url=_redis_url(env, defaults.redis_url, redis_cluster),
        redis_cluster=redis_cluster,
        redis_timeout_ms=_int(env, "REDIS_TIMEOUT_MS", defaults.redis_timeout_ms, 1, 60_000),
        database_url=_url(
            env,
            "DATABASE_URL",
            defaults.database_url,
            ("postgresql", "postgres", "postgresql+psycopg"),
        ),
        log_level=log_level,
        quota_free=_int(env, "QUOTA_FREE", defaults.quota_free, 0, 10**12),
        quota_plus=_int(env, "QUOTA_PLUS", defaults.quota_plus, 0, 10**12),
        quota_pro=_int(env, "QUOTA_PRO", defaults.quota_pro, 0, 10**12),
        plan_plus_price=_int(env, "PLAN_PLUS_PRICE", defaults.plan_plus_price, 0, 10**8),
        plan_pro_price=_int(env, "PLAN_PRO_PRICE", defaults.plan_pro_price, 0, 10**8),
        reservation_ttl_s=_int(env, "RESERVATION_TTL_S", defaults.reservation_ttl_s, 1, 3600),
        sidecar_host=env.get("SIDECAR_HOST") or defaults.sidecar_host,
        sidecar_port=_int(env, "SIDECAR_PORT", defaults.sidecar_port, 1, 65535),
        sidecar_uds=_optional(env, "SIDECAR_UDS"),
        sidecar_token=_optional(env, "SIDECAR_TOKEN"),
        admin_token=_optional(env, "ADMIN_TOKEN"),
        sidecar_journal_dir=env.get("SIDECAR_JOURNAL_DIR") or defaults.sidecar_journal_dir,
        fail_mode=fail_mode,
        fail_open_budget=_int(env, "FAIL_OPEN_BUDGET", defaults.fail_open_budget, 0, 10**9),
        alert_thresholds=_thresholds(env),
        alert_webhook_url=_optional(env, "ALERT_WEBHOOK_URL"),
        alert_webhook_secret=_optional(env, "ALERT_WEBHOOK_SECRET"),
        auth_secret=_optional(env, "AUTH_SECRET"),
        auth_jwks_url=_optional(env, "AUTH_JWKS_URL"),
        auth_jwks_algorithms=_algorithms(env),
        auth_issuer=_optional(env, "AUTH_ISSUER"),
        auth_audience=_optional(env, "AUTH_AUDIENCE"),
        billing_host=env.get("BILLING_HOST") or defaults.billing_host,
        billing_port=_int(env, "BILLING_PORT", defaults.billing_port, 1, 65535),
        billing_rate_user_per_min=_int(
            env, "BILLING_RATE_USER_PER_MIN", defaults.billing_rate_user_per_min, 1, 10**6
        ),
        billing_rate_address_per_min=_int(
            env, "BILLING_RATE_ADDRESS_PER_MIN", defaults.billing_rate_address_per_min, 1, 10**6
        ),
        stripe_api_key=_optional(env, "STRIPE_API_KEY"),
        stripe_api_base=_optional(env, "STRIPE_API_BASE"),
        stripe_webhook_secret=_optional(env, "STRIPE_WEBHOOK_SECRET"),
        stripe_webhook_tolerance_s=_int(
            env, "STRIPE_WEBHOOK_TOLERANCE_S", defaults.stripe_webhook_tolerance_s, 1, 3600
        ),
        stripe_currency=(env.get("STRIPE_CURRENCY") or "usd").lower(),
        **_sync_worker(env),
    )


# Asymmetric algorithms a JWKS may sign with; HS256 (AUTH_SECRET) is always accepted.
JWKS_ALGORITHMS = ("RS256", "ES256")
AUTH_SECRET_BYTES_MIN = 32


def _algorithms(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = env.get("AUTH_JWKS_ALGORITHMS") or ",".join(JWKS_ALGORITHMS)
    return tuple(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))


def _http_url(name: str, value: str | None) -> None:
    if value is None:
        return
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"{name} must be an http(s) URL, got {redacted(value)!r}")


def require_billing(settings: Settings) -> None:
    """What only the billing API needs: secrets with no safe default, checked at start."""
    if settings.auth_secret is None:
        raise SettingsError("AUTH_SECRET is required (at least 32 bytes; HS256 session tokens)")
    if len(settings.auth_secret.encode()) < AUTH_SECRET_BYTES_MIN:
        raise SettingsError(
            f"AUTH_SECRET must be at least {AUTH_SECRET_BYTES_MIN} bytes, "
            f"got {len(settings.auth_secret.encode())}"
        )
    _http_url("AUTH_JWKS_URL", settings.auth_jwks_url)
    algorithms = settings.auth_jwks_algorithms
    if not algorithms or any(value not in JWKS_ALGORITHMS for value in algorithms):
        raise SettingsError(
            f"AUTH_JWKS_ALGORITHMS must be a list of {', '.join(JWKS_ALGORITHMS)}, "
            f"got {','.join(algorithms)!r}"
        )
    if settings.stripe_api_key is None:
        raise SettingsError("STRIPE_API_KEY is required (sk_live_... or sk_test_...)")
    _http_url("STRIPE_API_BASE", settings.stripe_api_base)
    if settings.stripe_webhook_secret is None:
        raise SettingsError("STRIPE_WEBHOOK_SECRET is required (whsec_... from Stripe)")
    currency = settings.stripe_currency
    if len(currency) != 3 or not currency.isalpha():
        raise SettingsError(f"STRIPE_CURRENCY must be a 3-letter ISO code, got {currency!r}")


def _sync_worker(env: Mapping[str, str]) -> dict[str, Any]:
    """Settings of the sync worker, each bounded so a typo cannot stall or flood it."""
    d = Settings()
    return {
        "sync_worker_host": env.get("SYNC_WORKER_HOST") or d.sync_worker_host,
        "sync_worker_port": _int(env, "SYNC_WORKER_PORT", d.sync_worker_port, 0, 65535),
        "sync_batch_size": _int(env, "SYNC_BATCH_SIZE", d.sync_batch_size, 1, 100_000),
        "sync_writers": _int(env, "SYNC_WRITERS", d.sync_writers, 1, 16),
        "sync_poll_interval_ms": _int(
            env, "SYNC_POLL_INTERVAL_MS", d.sync_poll_interval_ms, 1, 60_000
        ),
        "sync_claim_idle_ms": _int(
            env, "SYNC_CLAIM_IDLE_MS", d.sync_claim_idle_ms, 100, 86_400_000
        ),
        "sync_redis_timeout_ms": _int(
            env, "SYNC_REDIS_TIMEOUT_MS", d.sync_redis_timeout_ms, 100, 600_000
        ),
        "sync_reap_interval_ms": _int(
            env, "SYNC_REAP_INTERVAL_MS", d.sync_reap_interval_ms, 10, 3_600_000
        ),
        "sync_plan_refresh_s": _int(env, "SYNC_PLAN_REFRESH_S", d.sync_plan_refresh_s, 1, 86_400),
        "sync_drift_interval_s": _int(
            env, "SYNC_DRIFT_INTERVAL_S", d.sync_drift_interval_s, 1, 86_400
        ),
        "sync_drift_window_s": _int(
            env, "SYNC_DRIFT_WINDOW_S", d.sync_drift_window_s, 1, 31 * 86_400
        ),
        "alert_webhook_timeout_ms": _int(
            env, "ALERT_WEBHOOK_TIMEOUT_MS", d.alert_webhook_timeout_ms, 10, 60_000
        ),
        "alert_webhook_backoff_ms": _int(
            env, "ALERT_WEBHOOK_BACKOFF_MS", d.alert_webhook_backoff_ms, 10, 3_600_000
        ),
        "alert_webhook_backoff_max_ms": _int(
            env, "ALERT_WEBHOOK_BACKOFF_MAX_MS", d.alert_webhook_backoff_max_ms, 10, 86_400_000
        ),
        "alert_webhook_attempts_max": _int(
            env, "ALERT_WEBHOOK_ATTEMPTS_MAX", d.alert_webhook_attempts_max, 1, 1000
        ),
    }


def require_sync_worker(settings: Settings) -> None:
    """What only the sync worker needs: a webhook URL is only useful with a secret to sign."""
    _http_url("ALERT_WEBHOOK_URL", settings.alert_webhook_url)
    if settings.alert_webhook_url is not None and not settings.alert_webhook_secret:
        raise SettingsError("ALERT_WEBHOOK_SECRET is required when ALERT_WEBHOOK_URL is set")


if __name__ == "__main__":
    # `python -m quota_common.settings NAME`: a setting's value as every process reads it (the
    # environment over .env, quotes stripped), for shell scripts such as scripts/up.
    print(environment().get(sys.argv[1], ""))
