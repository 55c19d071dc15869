"""`quota-billing-api`: checks the settings and serves the billing API with uvicorn."""

import sys

import uvicorn

from billing_api.app import create_app
from quota_common import logs
from quota_common import settings as settings_module


def main() -> None:
    try:
        settings = settings_module.load()
        settings_module.require_billing(settings)
    except settings_module.SettingsError as error:
        print(f"quota-billing-api: {error}", file=sys.stderr)
        sys.exit(2)
    logs.setup(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.billing_host,
        port=settings.billing_port,
        log_config=None,
        access_log=False,
        loop="uvloop",
        http="httptools",
    )
