"""What every billing operation needs, made once at start."""

from dataclasses import dataclass, field

import stripe
from sqlalchemy.ext.asyncio import AsyncEngine

from billing_api.locks import Queue
from quota_common.auth import Verifier
from quota_common.plans import Plan
from quota_common.scripts import AnyRedis
from quota_common.settings import Settings


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    plans: dict[str, Plan]
    engine: AsyncEngine
    redis: AnyRedis
    stripe: stripe.StripeClient
    verifier: Verifier
    # Per user, this process's requests for the user's lease (billing_api.locks).
    queues: dict[str, Queue] = field(default_factory=dict)
