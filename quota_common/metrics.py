"""Every metric a service exports is named `quota_<thing>_<unit>`: the client library's own
collectors (process, platform, gc) and its `_created` series are left out."""

import contextlib

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    REGISTRY,
    disable_created_metrics,
)


def only_quota_metrics() -> None:
    disable_created_metrics()  # type: ignore[no-untyped-call]
    for collector in (GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR):
        with contextlib.suppress(KeyError):  # already removed by another module
            REGISTRY.unregister(collector)
