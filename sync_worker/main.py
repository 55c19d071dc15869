"""`quota-sync-worker`: checks the settings and runs the worker until SIGTERM or SIGINT.

The first signal lets the batch in hand finish (written and acknowledged) and stops at once when
there is none, also while the worker is still starting; a second one stops at once (that batch
stays pending in Redis and another worker, or the next start, takes it). Exit status 0 after
the first, 1 after the second.
"""

import asyncio
import logging
import signal
import socket
import sys

import uvloop

from quota_common import logs
from quota_common import settings as settings_module
from sync_worker.worker import Worker

log = logging.getLogger("sync_worker")


async def serve(settings: settings_module.Settings, sock: socket.socket) -> None:
    worker = Worker(settings, sock=sock)
    main_task = asyncio.current_task()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("stopping after the current batch", extra={"signal": signum})
            worker.stop()
        elif main_task is not None:
            log.warning("stopping now", extra={"signal": signum})
            main_task.cancel()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await worker.run()


def main() -> None:
    try:
        settings = settings_module.load()
        settings_module.require_sync_worker(settings)
        sock = settings_module.listening_socket(
            "SYNC_WORKER_HOST",
            settings.sync_worker_host,
            "SYNC_WORKER_PORT",
            settings.sync_worker_port,
        )
    except settings_module.SettingsError as error:
        settings_module.exit_bad_setting("quota-sync-worker", error)
    logs.setup(settings.log_level)
    try:
        uvloop.run(serve(settings, sock))
    except asyncio.CancelledError:
        sys.exit(1)
    except OSError as error:
        sys.exit(f"quota-sync-worker: {error}")
