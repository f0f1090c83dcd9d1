from gateway_plugins.discovery.registry import PodInfo, PodRegistry
from gateway_plugins.errors import GatewayError
from gateway_plugins.routing.router import Router
from gateway_plugins.routing.strategies import build_strategies
from gateway_plugins.routing.types import RoutingRequest


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


def lora_setup() -> tuple[PodRegistry, Router]:
    registry = PodRegistry()
    registry.replace_all([PodInfo("a", "1.1.1.1:80", "m"), PodInfo("b", "1.1.1.2:80", "m")])
    return registry, Router(registry, build_strategies(), default_strategy="least-request")


def status_of(router: Router, model: str) -> int:
    try:
        router.release(router.route(RoutingRequest(model)))
    except GatewayError as exc:
        return exc.status
    return 200


def test_adapters_are_routable_on_the_pods_that_list_them_and_404_once_unloaded() -> None:
    registry, router = lora_setup()
    assert status_of(router, "sql") == 404
    registry.set_adapters("default", "b", ("sql", "chat"))
    registry.set_adapters("default", "a", ("chat",))
    assert [p.name for p in registry.ready_pods("sql")] == ["b"]
    assert [p.name for p in registry.ready_pods("chat")] == ["a", "b"]
    assert registry.serving_models() == ["chat", "m", "sql"]
    assert {router.route(RoutingRequest("sql")).pod.name for _ in range(5)} == {"b"}
    registry.set_adapters("default", "b", ("chat",))  # "sql" unloaded from its last pod
    assert status_of(router, "sql") == 404
    assert not registry.knows_model("sql")
    assert registry.serving_models() == ["chat", "m"]
    registry.set_adapters("default", "a", ())
    assert [p.name for p in registry.ready_pods("chat")] == ["b"]


def test_an_adapter_whose_pods_are_out_of_routing_is_503_not_404() -> None:
    registry, router = lora_setup()
    registry.set_adapters("default", "a", ("sql",))
    registry.set_available("default", "a", False)
    assert status_of(router, "sql") == 503
    assert "sql" not in registry.serving_models()
    registry.set_available("default", "a", True)
    assert status_of(router, "sql") == 200
    registry.upsert(PodInfo("a", "1.1.1.1:80", "m", ready=False))
    assert status_of(router, "sql") == 503


def test_adapters_leave_with_their_pod_or_its_old_address() -> None:
    registry, router = lora_setup()
    registry.set_adapters("default", "a", ("sql",))
    registry.set_adapters("default", "b", ("chat",))
    registry.upsert(PodInfo("a", "1.1.1.9:80", "m"))  # a new engine: what the old one had is gone
    assert status_of(router, "sql") == 404
    registry.replace_all([PodInfo("a", "1.1.1.9:80", "m")])
    assert status_of(router, "chat") == 404
    registry.set_adapters("default", "ghost", ("sql",))  # a record of a pod discovery does not know
    assert status_of(router, "sql") == 404


def test_a_base_model_name_is_never_taken_by_an_adapter() -> None:
    registry = PodRegistry()
    registry.replace_all([PodInfo("a", "1.1.1.1:80", "m"), PodInfo("b", "1.1.1.2:80", "other")])
    registry.set_adapters("default", "b", ("m",))
    assert [p.name for p in registry.ready_pods("m")] == ["a"]
    registry.set_adapters("default", "b", ())
    assert [p.name for p in registry.ready_pods("m")] == ["a"]


def test_unchanged_adapter_lists_change_nothing() -> None:
    registry, _ = lora_setup()
    changes = []
    registry.on_change(lambda: changes.append(1))
    registry.set_adapters("default", "a", ("sql",))
    index = registry.ready_pods("sql")
    registry.set_adapters("default", "a", ("sql",))
    assert changes == [1]
    assert registry.ready_pods("sql") is index
