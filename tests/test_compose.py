"""docker-compose.yml and the Dockerfile cannot run here (no Docker engine), so what can be
checked is checked against the code: every command is one of our console scripts (or
localstripe's, or a binary its image has); every variable given to our services is a setting
quota_common.settings reads, and the settings each service gets pass its own start-up checks;
servers listen on 0.0.0.0 inside their container, on the port their health check and published
port use; every dependency waits for the right condition; the image creates, for its user, every
directory a volume is mounted on."""

import dataclasses
import os
import re
import shutil
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import yaml

from quota_common import settings

ROOT = Path(__file__).resolve().parent.parent
OUR_IMAGE = "quota-gateway:latest"
LOCALSTRIPE_IMAGE = "quota-localstripe:latest"
# Binaries of the third-party images used.
IMAGE_BINARIES = {"redis:7": {"redis-server"}, "postgres:15": set()}
# Every name quota_common.settings reads: one per field of Settings, upper-cased.
SETTINGS = {field.name.upper() for field in dataclasses.fields(settings.Settings)}
# Each server: the settings of its address, the path its health check asks, the checks of
# its own settings it runs at start.
SERVERS = {
    "quota-sidecar": ("SIDECAR_HOST", "SIDECAR_PORT", "/readyz", None),
    "quota-sync-worker": (
        "SYNC_WORKER_HOST",
        "SYNC_WORKER_PORT",
        "/healthz",
        settings.require_sync_worker,
    ),
    "quota-billing-api": ("BILLING_HOST", "BILLING_PORT", "/health", settings.require_billing),
}


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def ours() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services().items() if s.get("image") == OUR_IMAGE}


def console_scripts() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(project["project"]["scripts"])


def dockerfile_stages() -> dict[str, list[str]]:
    """The Dockerfile's instructions (continuation lines joined) by stage: its `AS` name, or ""
    for the unnamed last stage, the gateway image."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("FROM "):
            parts = line.split()
            current = stages.setdefault(parts[3] if len(parts) == 4 else "", [])
        if line and not line.startswith("#"):
            current.append(line)
    return stages


def health_url(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    urls: list[str] = re.findall(r"https?://[^'\"\s]+", " ".join(test))
    (url,) = urls
    return url


def test_every_service_runs_a_real_command() -> None:
    found = services()
    scripts = console_scripts()
    assert {"redis", "postgres", "migrate", "sidecar", "sync-worker", "billing-api"} <= set(found)
    localstripe = dockerfile_stages()["localstripe"]
    for name, service in found.items():
        command = service.get("command")
        if service.get("image") == OUR_IMAGE:
            assert command and command[0] in scripts, name
            assert shutil.which(command[0]) or (ROOT / ".venv/bin" / command[0]).exists()
            assert service["build"] == ".", name  # the last stage: the gateway
        elif service.get("image") == LOCALSTRIPE_IMAGE:
            assert service["build"] == {"context": ".", "target": "localstripe"}
            assert command == ["localstripe-dev"], name
            assert "COPY scripts/localstripe /usr/local/bin/localstripe-dev" in localstripe
            assert os.access(ROOT / "scripts" / "localstripe", os.X_OK)
        elif command:
            assert command[0] in IMAGE_BINARIES[service["image"]], name


def our_settings(service: dict[str, Any]) -> dict[str, str]:
    return {name: str(value) for name, value in service.get("environment", {}).items()}


def test_our_services_get_only_settings_we_read_and_they_pass_the_checks() -> None:
    for name, service in ours().items():
        env = our_settings(service)
        unknown = set(env) - SETTINGS
        assert not unknown, f"{name}: {unknown}"
        loaded = settings.load(env)  # raises SettingsError, naming it, on a bad value
        check = SERVERS.get(service["command"][0], (None, None, None, None))[3]
        if check is not None:
            check(loaded)


def test_servers_listen_on_every_interface_on_the_port_they_are_checked_on() -> None:
    for name, service in ours().items():
        if service["command"][0] not in SERVERS:
            continue
        host, port, path, _ = SERVERS[service["command"][0]]
        env = our_settings(service)
        # 127.0.0.1 (the default) inside a container is unreachable from any other container.
        assert env.get(host) == "0.0.0.0", f"{name}: {host}"
        assert health_url(service) == f"http://127.0.0.1:{env[port]}{path}", name
        for published in service.get("ports", []):
            assert published.rsplit(":", 1)[1] == env[port], f"{name}: {published}"


def test_localstripe_and_the_billing_api_agree() -> None:
    found = services()
    billing, localstripe = our_settings(found["billing-api"]), found["localstripe"]
    stripe_env = {name: str(value) for name, value in localstripe["environment"].items()}
    assert stripe_env["LOCALSTRIPE_HOST"] == "0.0.0.0"
    assert billing["STRIPE_API_BASE"] == f"http://localstripe:{stripe_env['LOCALSTRIPE_PORT']}"
    assert stripe_env["STRIPE_WEBHOOK_SECRET"] == billing["STRIPE_WEBHOOK_SECRET"]
    webhook = urlsplit(stripe_env["LOCALSTRIPE_WEBHOOK_URL"])
    assert (webhook.hostname, str(webhook.port)) == ("billing-api", billing["BILLING_PORT"])
    assert webhook.path == "/api/webhooks/stripe"
    assert health_url(localstripe).startswith(f"http://127.0.0.1:{stripe_env['LOCALSTRIPE_PORT']}/")


def test_dependencies_wait_for_the_right_condition() -> None:
    """A one-shot (the migration) is waited for until it succeeded, anything else until its
    health check passes; every long-running service has one."""
    found = services()
    for name, service in found.items():
        one_shot = service.get("command") == ["quota-migrate"]
        assert one_shot or "healthcheck" in service, name
        for dependency, wait in service.get("depends_on", {}).items():
            assert dependency in found, f"{name} depends on unknown {dependency}"
            expected = (
                "service_completed_successfully"
                if found[dependency].get("command") == ["quota-migrate"]
                else "service_healthy"
            )
            assert wait == {"condition": expected}, f"{name} -> {dependency}"
    assert "localstripe" in found["billing-api"]["depends_on"]


def test_the_image_creates_every_directory_a_volume_is_mounted_on() -> None:
    """For its user: Docker makes a missing mount point root's, and a new named volume takes the
    mount point's owner, so the service could not write its own volume."""
    gateway = dockerfile_stages()[""]
    (user,) = [line.split()[1] for line in gateway if line.startswith("USER ")]
    run = " ".join(line for line in gateway if line.startswith("RUN "))
    made = {PurePosixPath(path) for path in re.findall(r"mkdir -p ((?:/\S+ ?)+)", run)[0].split()}
    owned = [PurePosixPath(path) for path in re.findall(rf"chown -R {user} (/\S+)", run)]
    for name, service in ours().items():
        for volume in service.get("volumes", []):
            mount = PurePosixPath(volume.split(":")[1])
            assert mount in made, f"{name}: {mount} is not created by the Dockerfile"
            assert any(mount.is_relative_to(root) for root in owned), f"{name}: {mount} owner"
    sidecar = our_settings(services()["sidecar"])
    assert f"sidecar-journal:{sidecar['SIDECAR_JOURNAL_DIR']}" in services()["sidecar"]["volumes"]


def test_dockerfile_copies_what_exists() -> None:
    for stage in dockerfile_stages().values():
        for line in stage:
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), source
