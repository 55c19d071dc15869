"""The chat service's flow against a sidecar, for locust: reserve an estimate, wait for the
"LLM", then commit the tokens really used (or refund when the call "failed").

    .venv/bin/locust -f benchmarks/locustfile.py --headless -u 50 -r 10 -t 30s \\
        --host http://127.0.0.1:8700

Point --host at any deployment. Settings from the environment:

SIDECAR_TOKEN         bearer token of /v1 (unset: no Authorization header)
LOCUST_USERS_POOL     how many distinct end users the chats spread over (default 10000)
LOCUST_USER_PREFIX    their ids are <prefix><n> (default "locust-"); unknown users start on FREE
LOCUST_TOKENS         estimate reserved per chat turn, "low-high" (default "200-2000")
LOCUST_LLM_MS         simulated LLM call, "low-high" ms (default "50-500")
LOCUST_REFUND_PERCENT share of LLM calls that "fail" and are refunded (default 5)
LOCUST_THINK_S        wait between one user's chat turns, "low-high" s (default "0.5-2")

A 429 quota_exceeded answer is what the sidecar must say to a user out of tokens: it counts as
a success under the name "/v1/reserve [429]", never as a failure.
"""

import os
import random
import time
import uuid
from typing import Any

from locust import between, task
from locust.contrib.fasthttp import FastHttpUser


def _range(name: str, default: str) -> tuple[float, float]:
    low, _, high = (os.environ.get(name) or default).partition("-")
    return float(low), float(high or low)


TOKEN = os.environ.get("SIDECAR_TOKEN")
USERS_POOL = int(os.environ.get("LOCUST_USERS_POOL") or 10_000)
USER_PREFIX = os.environ.get("LOCUST_USER_PREFIX") or "locust-"
TOKENS = _range("LOCUST_TOKENS", "200-2000")
LLM_MS = _range("LOCUST_LLM_MS", "50-500")
REFUND_PERCENT = float(os.environ.get("LOCUST_REFUND_PERCENT") or 5)
THINK_S = _range("LOCUST_THINK_S", "0.5-2")


class ChatService(FastHttpUser):
    """One chat service worker serving end users one turn at a time."""

    wait_time = between(*THINK_S)

    def on_start(self) -> None:
        self.headers = {"Content-Type": "application/json"}
        if TOKEN:
            self.headers["Authorization"] = f"Bearer {TOKEN}"

    def post(self, path: str, body: dict[str, Any], name: str) -> dict[str, Any] | None:
        """POSTs; returns the answer of a 200, None after a 429 (a success) or a failure."""
        with self.client.post(
            path, json=body, headers=self.headers, name=name, catch_response=True
        ) as response:
            if response.status_code == 200:
                answer: dict[str, Any] = response.json()
                return answer
            if response.status_code == 429:
                response.request_meta["name"] = f"{name} [429]"
                response.success()
                return None
            response.failure(f"{response.status_code}: {(response.text or '')[:200]}")
            return None

    @task
    def chat_turn(self) -> None:
        user_id = f"{USER_PREFIX}{random.randrange(USERS_POOL)}"
        reservation_id = uuid.uuid4().hex
        estimate = random.randint(int(TOKENS[0]), int(TOKENS[1]))
        reservation = self.post(
            "/v1/reserve",
            {"user_id": user_id, "tokens": estimate, "reservation_id": reservation_id},
            "/v1/reserve",
        )
        if reservation is None:
            return
        # The LLM call; locust patches time.sleep to yield to the other users.
        time.sleep(random.uniform(*LLM_MS) / 1000)
        ids = {"user_id": user_id, "reservation_id": reservation_id}
        if random.uniform(0, 100) < REFUND_PERCENT:
            self.post("/v1/refund", ids, "/v1/refund")
            return
        used = random.randint(1, int(reservation["granted"]))
        self.post("/v1/commit", {**ids, "tokens": used}, "/v1/commit")
