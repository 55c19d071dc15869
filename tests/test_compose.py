"""docker-compose.yml cannot run here (no Docker engine), so what can be checked is checked: it
parses, every command is one of our console scripts or a binary its image has, every variable
given to our services is a setting we read, dependencies name real services."""

import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
OUR_IMAGE = "quota-gateway:latest"
# Binaries of the third-party images used, and of the dev tools started from a shell.
IMAGE_BINARIES = {"redis:7": {"redis-server"}, "postgres:15": set(), "python:3.11-slim": {"sh"}}


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def console_scripts() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(project["project"]["scripts"])


def settings_read() -> set[str]:
    source = (ROOT / "quota_common" / "settings.py").read_text()
    return set(re.findall(r'"([A-Z][A-Z0-9_]+)"', source))


def test_every_service_runs_a_real_command() -> None:
    services = compose()["services"]
    scripts = console_scripts()
    assert {"redis", "postgres", "migrate", "sidecar", "sync-worker", "billing-api"} <= set(
        services
    )
    for name, service in services.items():
        command = service.get("command")
        if service.get("image") == OUR_IMAGE:
            assert command and command[0] in scripts, name
            assert shutil.which(command[0]) or (ROOT / ".venv/bin" / command[0]).exists()
        elif command:
            assert command[0] in IMAGE_BINARIES[service["image"]], name


def test_our_services_get_only_settings_we_read() -> None:
    known = settings_read()
    for name, service in compose()["services"].items():
        if service.get("image") != OUR_IMAGE:
            continue
        unknown = set(service.get("environment", {})) - known
        assert not unknown, f"{name}: {unknown}"


def test_dependencies_and_health_checks() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        long_running = name not in ("migrate", "localstripe")
        if long_running:
            assert "healthcheck" in service, name


def test_dockerfile_copies_what_exists() -> None:
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
