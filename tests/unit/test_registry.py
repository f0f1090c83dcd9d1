from gateway_plugins.discovery.registry import PodInfo, PodRegistry


def test_states_survive_relist_and_keep_inflight() -> None:
    registry = PodRegistry()
    registry.replace_all([PodInfo("a", "1.1.1.1:80", "m"), PodInfo("b", "1.1.1.2:80", "m")])
    state = registry.ready_pods("m")[0]
    state.inflight = 2
    registry.replace_all([PodInfo("a", "1.1.1.1:80", "m", labels={"gpu": "h100"})])
    assert registry.ready_pods("m") == (state,)
    assert state.inflight == 2
    assert state.labels == {"gpu": "h100"}


def test_new_address_is_a_new_pod_state() -> None:
    registry = PodRegistry()
    registry.upsert(PodInfo("a", "1.1.1.1:80", "m"))
    old = registry.ready_pods("m")[0]
    registry.upsert(PodInfo("a", "1.1.1.9:80", "m"))
    assert registry.ready_pods("m")[0] is not old
    assert registry.ready_pods("m")[0].address == "1.1.1.9:80"


def test_not_ready_pods_are_known_but_not_routable() -> None:
    registry = PodRegistry()
    changes = []
    registry.on_change(lambda: changes.append(1))
    registry.upsert(PodInfo("a", "1.1.1.1:80", "m", ready=False))
    assert registry.knows_model("m")
    assert registry.ready_pods("m") == ()
    assert registry.serving_models() == []
    registry.upsert(PodInfo("a", "1.1.1.1:80", "m"))
    assert registry.serving_models() == ["m"]
    registry.remove("default", "a")
    assert not registry.knows_model("m")
    assert changes == [1, 1, 1]
