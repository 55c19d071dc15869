"""Console scripts as operators run them: a bad setting, or an address a server cannot listen
on, is one line naming the setting (no traceback) and exit status 2; only the process that
listens on an address checks it; `quota-migrate` is safe to run twice."""

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from quota_common import settings
from tests.servers import BIN, free_port

BAD_SETTING = 2
# Secrets the billing API needs before it looks at anything else of its own.
BILLING_SECRETS = {
    "AUTH_SECRET": "a-secret-of-at-least-thirty-two-bytes!",
    "STRIPE_API_KEY": "sk_test_x",
    "STRIPE_WEBHOOK_SECRET": "whsec_x",
}


def run(
    script: str, env: dict[str, str], cwd: Path, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "FAIL_"))}
    return subprocess.run(
        [str(BIN / script)],
        env={**clean, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


BAD = [
    ("SIDECAR_PORT", "abc"),
    ("SIDECAR_PORT", "70000"),
    ("FAIL_MODE", "maybe"),
    ("REDIS_URL", "http://127.0.0.1:6379"),
    ("REDIS_URL", "redis://[::1"),
    ("DATABASE_URL", "mysql://root@localhost/quota"),
    ("RESERVATION_TTL_S", "0"),
    ("REDIS_TIMEOUT_MS", "-5"),
    ("QUOTA_FREE", "lots"),
    ("ALERT_THRESHOLDS", "80,ninety"),
    ("REDIS_CLUSTER", "perhaps"),
    ("LOG_LEVEL", "LOUD"),
    ("REDIS_URL", "redis://127.0.0.1:6379/abc"),
    ("REDIS_URL", "redis://127.0.0.1:6379/?db=two"),
    ("REDIS_URL", "redis+cluster://127.0.0.1:7000/3"),
]


# The process test for a sample of BAD (each start costs a second), settings.load for every
# one; and what the sidecar itself checks at start: its paths, and the address it listens on.
SIDECAR_BAD = [
    ("SIDECAR_PORT", "abc"),
    ("FAIL_MODE", "maybe"),
    ("REDIS_URL", "http://127.0.0.1:6379"),
    ("QUOTA_FREE", "lots"),
    ("SIDECAR_JOURNAL_DIR", "/proc/no-such-dir"),
    ("SIDECAR_UDS", "/proc/no-such-dir/s.sock"),
    ("SIDECAR_HOST", "256.1.1.1"),
]


@pytest.mark.parametrize(("name", "value"), SIDECAR_BAD)
def test_bad_setting_stops_the_sidecar_with_one_line(
    base_env: dict[str, str], tmp_path: Path, name: str, value: str
) -> None:
    assert_one_line_naming(run("quota-sidecar", {**base_env, name: value}, tmp_path), name)


def assert_one_line_naming(done: subprocess.CompletedProcess[str], name: str) -> None:
    assert done.returncode == BAD_SETTING, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert name in lines[0] and "Traceback" not in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("script", "name", "value", "needs"),
    [
        ("quota-billing-api", "BILLING_HOST", "no-such-host.invalid", BILLING_SECRETS),
        ("quota-sync-worker", "SYNC_WORKER_HOST", "256.0.0.1", {}),
    ],
)
def test_every_process_exits_2_on_a_bad_setting(
    base_env: dict[str, str],
    tmp_path: Path,
    script: str,
    name: str,
    value: str,
    needs: dict[str, str],
) -> None:
    assert_one_line_naming(run(script, {**base_env, **needs, name: value}, tmp_path), name)


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", free_port()))
        holder.listen()
        yield int(holder.getsockname()[1])


@pytest.mark.parametrize(
    ("script", "host", "port", "needs"),
    [
        ("quota-sidecar", "SIDECAR_HOST", "SIDECAR_PORT", {}),
        ("quota-billing-api", "BILLING_HOST", "BILLING_PORT", BILLING_SECRETS),
        ("quota-sync-worker", "SYNC_WORKER_HOST", "SYNC_WORKER_PORT", {}),
    ],
)
def test_an_address_that_cannot_be_listened_on_is_one_line(
    base_env: dict[str, str],
    tmp_path: Path,
    taken_port: int,
    script: str,
    host: str,
    port: str,
    needs: dict[str, str],
) -> None:
    """A port already taken, then an address that is not this machine's (TEST-NET-1)."""
    env = {**base_env, **needs, host: "127.0.0.1", port: str(taken_port)}
    done = run(script, env, tmp_path)
    assert_one_line_naming(done, port)
    assert "in use" in done.stderr
    done = run(script, {**env, host: "192.0.2.1", port: str(free_port())}, tmp_path)
    assert_one_line_naming(done, host)


@pytest.mark.parametrize(("name", "value"), BAD)
def test_settings_load_names_the_bad_setting(name: str, value: str) -> None:
    with pytest.raises(settings.SettingsError, match=name):
        settings.load({name: value})


def test_env_file_is_read_and_the_environment_wins(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text("FAIL_MODE=maybe\n")
    done = run("quota-sidecar", base_env, tmp_path)
    assert done.returncode != 0 and "FAIL_MODE" in done.stderr
    done = run("quota-sidecar", {**base_env, "FAIL_MODE": "closed", "SIDECAR_PORT": "x"}, tmp_path)
    assert "SIDECAR_PORT" in done.stderr and "FAIL_MODE" not in done.stderr


def test_defaults_need_no_configuration() -> None:
    loaded = settings.load({})
    assert loaded.redis_url == "redis://127.0.0.1:6379/0"
    assert loaded.database_url == "postgresql://postgres@127.0.0.1:5432/quota"
    assert (loaded.sidecar_host, loaded.sidecar_port) == ("127.0.0.1", 8700)
    assert (loaded.fail_mode, loaded.reservation_ttl_s) == ("closed", 300)


def test_quota_migrate_twice_is_fine(database_url: str, tmp_path: Path) -> None:
    for _ in range(2):
        done = run("quota-migrate", {"DATABASE_URL": database_url}, tmp_path)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr


def test_quota_migrate_bad_setting_is_one_line(tmp_path: Path) -> None:
    assert_one_line_naming(
        run("quota-migrate", {"DATABASE_URL": "nonsense"}, tmp_path), "DATABASE_URL"
    )


UNRESOLVABLE = {
    "SIDECAR_HOST": "sidecar.internal.invalid",
    "BILLING_HOST": "billing.internal.invalid",
    "SYNC_WORKER_HOST": "no-such-host.invalid",
}


def test_an_address_is_checked_only_by_the_process_that_listens_on_it(
    database_url: str, tmp_path: Path
) -> None:
    """Host names that resolve only where their service runs (a compose service's name): the
    other processes neither refuse them nor look them up."""
    loaded = settings.load(UNRESOLVABLE)
    assert loaded.billing_host == UNRESOLVABLE["BILLING_HOST"]
    done = run("quota-migrate", {"DATABASE_URL": database_url, **UNRESOLVABLE}, tmp_path)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("host", ["no-such-host.invalid", "x" * 64 + ".example", "[::1]"])
def test_an_address_that_does_not_resolve_names_its_setting(host: str) -> None:
    with pytest.raises(settings.SettingsError, match="SIDECAR_HOST"):
        settings.listening_socket("SIDECAR_HOST", host, "SIDECAR_PORT", free_port())


def test_localhost_is_listened_on_as_uvicorn_would_on_ipv4() -> None:
    sock = settings.listening_socket("SIDECAR_HOST", "localhost", "SIDECAR_PORT", free_port())
    with sock:
        assert (sock.family, sock.getsockname()[0]) == (socket.AF_INET, "127.0.0.1")


# Under a hosts file that names ::1 first for localhost, as Docker's does.
BIND_LOCALHOST = """
from quota_common.settings import listening_socket
sock = listening_socket("SIDECAR_HOST", "localhost", "SIDECAR_PORT", 0)
print(sock.family.name, sock.getsockname()[0])
"""


def test_localhost_resolving_to_ipv6_first_is_still_listened_on_ipv4(tmp_path: Path) -> None:
    """A private mount namespace gives the child its own /etc/hosts (the machine's is left as
    it is): clients connecting to localhost's 127.0.0.1 must find the server there."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) for a private /etc/hosts")
    hosts = tmp_path / "hosts"
    hosts.write_text("::1 localhost\n127.0.0.1 localhost\n")
    script = f'mount --bind {hosts} /etc/hosts && exec "$0" -c "$1"'
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, sys.executable, BIND_LOCALHOST],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0 and "mount" in done.stderr:
        pytest.skip(f"no private mount namespace here: {done.stderr.strip()}")
    assert done.stdout.split() == ["AF_INET", "127.0.0.1"], done.stderr


def test_scripts_read_a_setting_as_the_processes_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m quota_common.settings NAME`, as scripts/up reads STRIPE_WEBHOOK_SECRET for
    localstripe: quotes and `export` in .env as the loader takes them, the environment first."""
    (tmp_path / ".env").write_text('export STRIPE_WEBHOOK_SECRET="whsec_from_file"\n')
    command = [sys.executable, "-m", "quota_common.settings", "STRIPE_WEBHOOK_SECRET"]
    clean = {k: v for k, v in os.environ.items() if k != "STRIPE_WEBHOOK_SECRET"}

    def read(env: dict[str, str]) -> str:
        done = subprocess.run(
            command, env=env, cwd=tmp_path, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    assert read(clean) == "whsec_from_file"
    assert read({**clean, "STRIPE_WEBHOOK_SECRET": "whsec_env"}) == "whsec_env"
    monkeypatch.chdir(tmp_path)
    assert read(clean) == settings.load({}).stripe_webhook_secret
