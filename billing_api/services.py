"""What every billing operation needs, made once at start."""

from dataclasses import dataclass

import stripe
from sqlalchemy.ext.asyncio import AsyncEngine

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
