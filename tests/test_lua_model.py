"""A hypothesis state machine drives random sequences of reserve, extend, commit, refund, expiry,
rollover, credits and reset straight against the Lua scripts on real Redis, and checks every
answer and the user's books against a small model of the ledger."""

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from redis.exceptions import NoScriptError

from quota_common.codes import Code
from quota_common.keys import user_keys
from quota_common.scripts import SCRIPTS
from tests.conftest import REDIS_URL

QUOTA = 1_000
TTL_MS = 60_000
RESERVATION_IDS = st.sampled_from([f"r{i}" for i in range(6)])


@dataclass
class Reservation:
    tokens: int
    min_tokens: int
    held: int
    status: str = "held"  # held, committed, refunded, expired
    charged: int | None = None
    refund_answered: bool = False


@dataclass
class Model:
    credits: int = 0
    used: int = 0
    reservations: dict[str, Reservation] = field(default_factory=dict)

    @property
    def limit(self) -> int:
        return QUOTA + self.credits

    @property
    def reserved(self) -> int:
        return sum(r.held for r in self.reservations.values() if r.status == "held")


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.redis = redis.Redis.from_url(REDIS_URL)
        for script in SCRIPTS.values():
            self.redis.script_load(script.source)
        self.user = user_keys(f"model-{uuid.uuid4().hex[:12]}")
        self.model = Model()

    def evalsha(self, name: str, keys: list[str], args: list[str | int]) -> Any:
        script = SCRIPTS[name]
        try:
            return self.redis.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:  # another test flushed the server's scripts
            return self.redis.eval(script.source, len(keys), *keys, *args)

    def run(self, name: str, keys: list[str], args: list[str | int]) -> tuple[int, str]:
        """(code, "value|value"): the hot scripts answer {code, value...}, the others
        {code, "value|value"}."""
        code, *values = self.evalsha(name, keys, args)
        return int(code), "|".join(v.decode() if isinstance(v, bytes) else str(v) for v in values)

    def on_record(self, name: str, rid: str, *args: str | int) -> tuple[int, str]:
        u = self.user
        keys = u.reservation_keys(rid)
        return self.run(name, keys, [u.user_id, rid, *args])

    def on_state(self, name: str, *args: str | int) -> tuple[int, str]:
        u = self.user
        return self.run(name, u.state_keys(), [u.user_id, u.record_prefix, *args])

    @initialize()
    def seed(self) -> None:
        now = int(time.time())
        seeded = self.evalsha(
            "seed",
            [self.user.state, self.user.holds],
            ["FREE", QUOTA, 0, 0, now - 86_400, now + 86_400, "", "", self.user.record_prefix],
        )
        assert seeded == 1

    @rule(rid=RESERVATION_IDS, tokens=st.integers(1, 700), min_share=st.integers(0, 100))
    def reserve(self, rid: str, tokens: int, min_share: int) -> None:
        min_tokens = tokens * min_share // 100
        code, answer = self.on_record(
            "reserve", rid, tokens, min_tokens, TTL_MS, "", self.user.record_prefix
        )
        known = self.model.reservations.get(rid)
        if known is not None:
            same = (known.tokens, known.min_tokens) == (tokens, min_tokens)
            assert code == (Code.REPLAYED if same else Code.IDEMPOTENCY_CONFLICT)
            return
        available = self.model.limit - self.model.used - self.model.reserved
        if tokens <= available:
            granted = tokens
        elif 0 < min_tokens <= available:
            granted = available
        else:
            assert code == Code.QUOTA_EXCEEDED
            return
        assert code == Code.OK
        assert int(answer.split("|")[1]) == granted
        self.model.reservations[rid] = Reservation(tokens, min_tokens, granted)

    @rule(rid=RESERVATION_IDS, tokens=st.integers(1, 900))
    def extend(self, rid: str, tokens: int) -> None:
        code, _ = self.on_record("extend", rid, tokens, 0, self.user.record_prefix)
        known = self.model.reservations.get(rid)
        if known is None:
            assert code == Code.NOT_FOUND
        elif known.status != "held":
            expected = {
                "committed": Code.ALREADY_COMMITTED,
                "refunded": Code.ALREADY_REFUNDED,
                "expired": Code.EXPIRED,
            }[known.status]
            assert code == expected
        elif tokens < known.held:
            assert code == Code.BELOW_HOLD
        elif tokens - known.held > self.model.limit - self.model.used - self.model.reserved:
            assert code == Code.QUOTA_EXCEEDED
        else:
            assert code == Code.OK
            known.held = tokens

    @rule(rid=RESERVATION_IDS, tokens=st.integers(0, 900))
    def commit(self, rid: str, tokens: int) -> None:
        code, answer = self.on_record(
            "commit", rid, tokens, "", self.user.record_prefix, "80,100", "1"
        )
        known = self.model.reservations.get(rid)
        if known is not None and known.status == "committed":
            assert code == (Code.REPLAYED if known.charged == tokens else Code.IDEMPOTENCY_CONFLICT)
            return
        if known is not None and known.status == "refunded":
            assert code == Code.ALREADY_REFUNDED
            return
        assert code == Code.OK
        late = known is None or known.status == "expired"
        assert answer.split("|")[5] == ("1" if late else "0")
        if known is None:
            known = self.model.reservations[rid] = Reservation(0, 0, 0)
        known.status, known.charged = "committed", tokens
        self.model.used += tokens

    @rule(rid=RESERVATION_IDS)
    def refund(self, rid: str) -> None:
        code, answer = self.on_record("refund", rid, self.user.record_prefix)
        known = self.model.reservations.get(rid)
        if known is None:
            assert code == Code.NOT_FOUND
        elif known.status == "committed":
            # An expired hold refunded before its late commit keeps replaying that refund.
            assert code == (Code.REPLAYED if known.refund_answered else Code.ALREADY_COMMITTED)
        elif known.status == "held":
            assert code == Code.OK and answer.startswith("refunded|")
            known.status, known.refund_answered = "refunded", True
        else:
            assert code == (Code.REPLAYED if known.refund_answered else Code.OK)
            assert answer.startswith(known.status)
            known.refund_answered = True

    @rule(rid=RESERVATION_IDS)
    def expire(self, rid: str) -> None:
        """The hold's time runs out (its expiry, and so the user's earliest, moved into the
        past)."""
        known = self.model.reservations.get(rid)
        if known is None or known.status != "held":
            return
        past = int(time.time() * 1000) - 1
        self.redis.zadd(self.user.holds, {rid: past})
        self.redis.hset(self.user.record(rid), "x", past)
        self.redis.hset(self.user.state, "ex", past)
        known.status = "expired"

    @rule()
    def rollover(self) -> None:
        """The period ends: usage and credits start again, open holds carry over."""
        now = int(time.time())
        self.redis.hset(self.user.state, mapping={"ps": now - 200_000, "pe": now - 100_000})
        self.model.used, self.model.credits = 0, 0

    @rule(total=st.integers(0, 2_000))
    def grant(self, total: int) -> None:
        self.on_state("usage")  # rolls the period first, as the operator endpoint does
        period_start = self.redis.hget(self.user.state, "ps")
        code, _ = self.on_state("grant", total, int(period_start or 0))
        assert code == Code.OK
        self.model.credits = total

    @rule()
    def reset(self) -> None:
        code, _ = self.on_state("reset")
        assert code == Code.OK
        self.model.used = 0

    @invariant()
    def books_balance(self) -> None:
        code, answer = self.on_state("usage")
        assert code == Code.OK
        _, limit, used, reserved, credits, _, _ = answer.split("|")
        assert (int(limit), int(used), int(reserved), int(credits)) == (
            self.model.limit,
            self.model.used,
            self.model.reserved,
            self.model.credits,
        )

    def teardown(self) -> None:
        self.redis.close()


LedgerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestLedgerModel = LedgerMachine.TestCase
