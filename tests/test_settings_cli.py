"""Console scripts as operators run them: a bad setting is one line naming it (no traceback) and
a non-zero exit; `quota-migrate` is safe to run twice."""

import os
import subprocess
from pathlib import Path

import pytest

from quota_common import settings
from tests.servers import BIN


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
]


# The process test for a sample (each start costs a second); settings.load for every one. The
# paths are checked by the sidecar itself, at start.
PATHS = [("SIDECAR_JOURNAL_DIR", "/proc/no-such-dir"), ("SIDECAR_UDS", "/proc/no-such-dir/s.sock")]


@pytest.mark.parametrize(("name", "value"), [BAD[0], BAD[2], BAD[3], BAD[8], *PATHS])
def test_bad_setting_stops_the_sidecar_with_one_line(
    base_env: dict[str, str], tmp_path: Path, name: str, value: str
) -> None:
    done = run("quota-sidecar", {**base_env, name: value}, tmp_path)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert name in lines[0] and "Traceback" not in done.stderr
    assert done.stdout == ""


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
    done = run("quota-migrate", {"DATABASE_URL": "nonsense"}, tmp_path)
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1 and "DATABASE_URL" in done.stderr
