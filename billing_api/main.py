"""`quota-billing-api`: checks the settings and serves the billing API with uvicorn."""

from billing_api.app import create_app
from quota_common import logs
from quota_common import settings as settings_module
from quota_common.serving import serve


def main() -> None:
    try:
        settings = settings_module.load()
        settings_module.require_billing(settings)
        sock = settings_module.listening_socket(
            "BILLING_HOST", settings.billing_host, "BILLING_PORT", settings.billing_port
        )
    except settings_module.SettingsError as error:
        settings_module.exit_bad_setting("quota-billing-api", error)
    logs.setup(settings.log_level)
    serve(create_app(settings), sock)
