"""`quota-sidecar`: checks the settings and serves the sidecar with uvicorn."""

import os
from pathlib import Path

from quota_common import logs
from quota_common import settings as settings_module
from quota_common.serving import serve
from sidecar.app import create_app

# Idle keep-alive connections are kept longer than clients keep theirs (httpx: 5 s), so a
# client never sends a request on a connection the sidecar is closing at the same moment
# (uvicorn's default is also 5 s: that race surfaced as sporadic ReadErrors under load).
KEEP_ALIVE_S = 75


def check_paths(settings: settings_module.Settings) -> None:
    """The directories the sidecar writes to, checked now rather than at the first outage."""
    journal = Path(settings.sidecar_journal_dir)
    try:
        journal.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise settings_module.SettingsError(
            f"SIDECAR_JOURNAL_DIR {str(journal)!r} cannot be created: {error.strerror}"
        ) from None
    if not os.access(journal, os.W_OK):
        raise settings_module.SettingsError(f"SIDECAR_JOURNAL_DIR {str(journal)!r} is not writable")
    if settings.sidecar_uds:
        parent = Path(settings.sidecar_uds).parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise settings_module.SettingsError(
                f"SIDECAR_UDS {settings.sidecar_uds!r}: its directory is missing or not writable"
            )


def main() -> None:
    try:
        settings = settings_module.load()
        check_paths(settings)
        sock = (
            None
            if settings.sidecar_uds
            else settings_module.listening_socket(
                "SIDECAR_HOST", settings.sidecar_host, "SIDECAR_PORT", settings.sidecar_port
            )
        )
    except settings_module.SettingsError as error:
        settings_module.exit_bad_setting("quota-sidecar", error)
    logs.setup(settings.log_level)
    serve(create_app(settings), sock, settings.sidecar_uds, KEEP_ALIVE_S, proxy_headers=False)
