"""The plan catalogue: FREE, PLUS and PRO with their price and tokens per period."""

from dataclasses import dataclass

from quota_common.settings import Settings

FREE = "FREE"
PAID_PLANS = ("PLUS", "PRO")
PLAN_NAMES = (FREE, *PAID_PLANS)


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    price_cents: int
    quota: int
    features: tuple[str, ...]


def catalogue(settings: Settings) -> dict[str, Plan]:
    return {
        "FREE": Plan("FREE", 0, settings.quota_free, ("Basic chat", "Community support")),
        "PLUS": Plan(
            "PLUS",
            settings.plan_plus_price,
            settings.quota_plus,
            ("Faster answers", "Usage analytics", "Email support"),
        ),
        "PRO": Plan(
            "PRO",
            settings.plan_pro_price,
            settings.quota_pro,
            ("Largest quota", "Usage analytics", "Priority support"),
        ),
    }
