"""`quota-sidecar`: checks the settings and serves the sidecar with uvicorn."""

import sys

import uvicorn

from quota_common import logs
from quota_common import settings as settings_module
from sidecar.app import create_app

# Idle keep-alive connections are kept longer than clients keep theirs (httpx: 5 s), so a
# client never sends a request on a connection the sidecar is closing at the same moment
# (uvicorn's default is also 5 s: that race surfaced as sporadic ReadErrors under load).
KEEP_ALIVE_S = 75


def main() -> None:
    try:
        settings = settings_module.load()
    except settings_module.SettingsError as error:
        sys.exit(f"quota-sidecar: {error}")
    logs.setup(settings.log_level)
    app = create_app(settings)
    if settings.sidecar_uds:
        uvicorn.run(
            app,
            uds=settings.sidecar_uds,
            log_config=None,
            access_log=False,
            loop="uvloop",
            http="httptools",
            timeout_keep_alive=KEEP_ALIVE_S,
        )
    else:
        uvicorn.run(
            app,
            host=settings.sidecar_host,
            port=settings.sidecar_port,
            log_config=None,
            access_log=False,
            loop="uvloop",
            http="httptools",
            timeout_keep_alive=KEEP_ALIVE_S,
        )
