"""``session-affinity``: a conversation stays on its pod while it can, re-binds when it cannot."""

from __future__ import annotations

from gateway_plugins.config import RoutingSettings, SessionAffinitySettings
from gateway_plugins.discovery.registry import PodInfo, PodRegistry
from gateway_plugins.routing.router import Decision, Router
from gateway_plugins.routing.strategies import build_strategies
from gateway_plugins.routing.types import PodState, RoutingRequest


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def setup(n: int = 3, **settings: object) -> tuple[Router, Clock, PodRegistry]:
    clock = Clock()
    registry = PodRegistry()
    registry.replace_all(PodInfo(f"p{i}", f"10.0.0.{i}:8000", "m") for i in range(n))
    routing = RoutingSettings(session_affinity=SessionAffinitySettings(**settings))  # type: ignore[arg-type]
    router = Router(registry, build_strategies(routing, clock=clock), default_strategy="session-affinity")
    return router, clock, registry


def send(router: Router, session: str | None = None, **kwargs: object) -> Decision:
    """Route one request and let it finish at once (so load does not steer what follows)."""
    decision = router.route(RoutingRequest("m", session_id=session), **kwargs)  # type: ignore[arg-type]
    router.release(decision)
    return decision


def busy(pod: PodState, requests: int) -> None:
    """Keep ``requests`` other requests in flight on ``pod``."""
    pod.inflight += requests


def test_a_session_stays_on_its_pod_although_another_is_less_loaded() -> None:
    router, _, _ = setup()
    home = send(router, "chat-1").pod
    busy(home, 2)  # least-request would now avoid it; 2 is within the load guard
    for _ in range(10):
        decision = send(router, "chat-1")
        assert decision.pod is home
        assert decision.request.bound_session == "chat-1"


def test_sessions_start_on_the_least_loaded_pod() -> None:
    router, _, registry = setup()
    p0, p1, p2 = registry.ready_pods("m")
    busy(p0, 3)
    busy(p2, 1)
    assert send(router, "new").pod is p1


def test_a_session_whose_pod_left_rebinds_and_stays_on_the_new_one() -> None:
    router, _, registry = setup()
    home = send(router, "chat-1").pod
    registry.set_available(home.namespace, home.name, False)
    moved = send(router, "chat-1").pod
    assert moved is not home
    registry.set_available(home.namespace, home.name, True)
    busy(moved, 1)  # the old pod is now the idler one: the session still stays where it moved
    assert all(send(router, "chat-1").pod is moved for _ in range(5))


def test_a_session_outside_the_subset_hint_goes_elsewhere() -> None:
    router, _, registry = setup()
    home = send(router, "chat-1").pod
    others = {p.address for p in registry.ready_pods("m") if p is not home}
    assert send(router, "chat-1", subset=others).pod is not home


def test_an_overloaded_pod_loses_its_sessions_to_the_least_loaded() -> None:
    router, _, _ = setup()
    home = send(router, "chat-1").pod
    busy(home, 10)  # far above the others (0): past the guard's sigma and min gap of 4
    moved = send(router, "chat-1").pod
    assert moved is not home
    busy(home, -10)
    busy(moved, 1)
    assert send(router, "chat-1").pod is moved  # re-bound: stays even though the old pod is idle again


def test_sessions_expire_after_the_ttl_of_inactivity() -> None:
    router, clock, _ = setup(ttl_seconds=60.0)
    home = send(router, "chat-1").pod
    busy(home, 1)
    clock.now += 59.0
    assert send(router, "chat-1").pod is home  # each request renews the session
    clock.now += 59.0
    assert send(router, "chat-1").pod is home
    clock.now += 61.0
    assert send(router, "chat-1").pod is not home  # forgotten: least loaded again


def test_the_table_is_bounded_least_recently_used_first() -> None:
    router, _, registry = setup(max_sessions=2)
    p0, p1, p2 = registry.ready_pods("m")
    send(router, "a", subset={p0.address})
    send(router, "b", subset={p1.address})
    send(router, "a")  # a is now more recently used than b
    send(router, "c", subset={p2.address})
    assert router.strategies["session-affinity"].size() == 2  # type: ignore[attr-defined]
    busy(p0, 1)
    busy(p1, 1)
    assert send(router, "a").pod is p0  # kept: stays home although p2 is idle
    assert send(router, "b").pod is p2  # evicted: routed by load


def test_a_request_without_session_gets_a_fresh_id_that_then_sticks() -> None:
    router, _, _ = setup()
    first, second = send(router), send(router)
    ids = {first.request.bound_session, second.request.bound_session}
    assert len(ids) == 2
    assert all(i is not None and len(i) == 32 and set(i) <= set("0123456789abcdef") for i in ids)
    home = first.pod
    busy(home, 2)
    assert send(router, first.request.bound_session).pod is home


def test_other_strategies_bind_no_session() -> None:
    router, _, _ = setup()
    decision = router.route(RoutingRequest("m", session_id="chat-1"), router.strategy("least-request"))
    assert decision.request.bound_session is None
