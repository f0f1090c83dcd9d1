"""``session-affinity`` through real Envoy, the gateway and emulated engines, for both wire contracts."""

from __future__ import annotations

import httpx
import orjson
import pytest

from tests.conftest import MODEL, Deployment

pytestmark = pytest.mark.slow
BODY = orjson.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "Hello again."}], "max_tokens": 3}
)


def chat(deployment: Deployment, **headers: str) -> httpx.Response:
    response = httpx.post(
        f"{deployment.base_url}/v1/chat/completions",
        content=BODY,
        headers={"content-type": "application/json", **headers},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.headers["target-pod"] == response.headers["x-emulator-pod"]  # where it really went
    return response


def test_a_session_stays_on_its_pod_and_gets_its_id_back(deployment: Deployment) -> None:
    headers = {"routing-strategy": "session-affinity", "x-session-id": f"conversation-{deployment.contract}"}
    served = [chat(deployment, **headers) for _ in range(6)]  # by load alone: same pod 6 times in 3^5
    assert {r.headers["target-pod"] for r in served} == {served[0].headers["target-pod"]}
    assert all(r.headers["x-session-id"] == headers["x-session-id"] for r in served)


def test_a_request_without_session_gets_a_fresh_id_that_sticks(deployment: Deployment) -> None:
    first = chat(deployment, **{"routing-strategy": "session-affinity"})
    session = first.headers["x-session-id"]
    assert len(session) == 32
    again = [
        chat(deployment, **{"routing-strategy": "session-affinity", "x-session-id": session})
        for _ in range(5)
    ]
    assert {r.headers["target-pod"] for r in again} == {first.headers["target-pod"]}
    other = chat(deployment, **{"routing-strategy": "session-affinity"})
    assert other.headers["x-session-id"] != session


def test_no_session_header_when_the_strategy_keeps_no_sessions(deployment: Deployment) -> None:
    response = chat(deployment, **{"routing-strategy": "least-request", "x-session-id": "ignored"})
    assert "x-session-id" not in response.headers
    assert response.headers["routing-strategy"] == "least-request"
