"""LoRA adapters on real vLLM through the runtime sidecar: load on one replica, routed only there, seen
running in the engine's metrics, unloaded, then a clean 404 from the gateway."""

from __future__ import annotations

import threading

import httpx

from brickyard_core.podmetrics import PodMetrics, decode_record, pod_key
from tests.conftest import redis_at, sidecar_auth
from tests.real_vllm.conftest import MODEL, Deployment, RealFleet, eventually, post


def adapter_call(fleet: RealFleet, engine: str, action: str, body: dict) -> httpx.Response:
    url = f"{fleet.sidecars[engine]}/v1/lora_adapter/{action}"
    return httpx.post(url, json=body, headers=sidecar_auth(), timeout=60)


def record(fleet: RealFleet, pod: str) -> PodMetrics:
    return decode_record(redis_at(fleet.redis_port).get(pod_key("default", pod)))[2]  # type: ignore[arg-type]


def listed(deployment: Deployment) -> set[str]:
    return {m["id"] for m in httpx.get(f"{deployment.base_url}/v1/models").json()["data"]}


def test_an_adapter_loaded_through_the_sidecar_is_routed_to_its_replica_only(
    fleet: RealFleet, aibrix: Deployment
) -> None:
    host, other = fleet.engines[1], fleet.engines[0]
    loaded = adapter_call(
        fleet, host.name, "load", {"lora_name": "sql-lora", "lora_path": str(fleet.model.adapter("lora-a"))}
    )
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["status"] == "loaded"
    try:
        assert eventually(lambda: "sql-lora" in listed(aibrix)), listed(aibrix)
        assert record(fleet, host.name).adapters == ("sql-lora",)
        assert record(fleet, other.name).adapters == ()

        served = []
        for i in range(6):
            strategy = "lora-affinity" if i % 2 else "least-request"
            response = post(
                aibrix.base_url,
                "/v1/completions",
                {"model": "sql-lora", "prompt": f"select count {i}", "max_tokens": 3},
                **{"routing-strategy": strategy},
            )
            assert response.status_code == 200, response.text
            assert response.json()["model"] == "sql-lora"
            served.append(response.headers["target-pod"])
        assert served == [host.name] * 6

        # While a request for it runs, vLLM's lora_requests_info names it, and so does the record.
        stop = threading.Event()

        def generate() -> None:
            body = {
                "model": "sql-lora",
                "prompt": "select",
                "max_tokens": 400,
                "ignore_eos": True,
                "stream": True,
            }
            with httpx.stream("POST", f"{host.url}/v1/completions", json=body, timeout=60) as response:
                for _ in response.iter_lines():
                    if stop.is_set():
                        return

        stream = threading.Thread(target=generate)
        stream.start()
        try:
            running = eventually(lambda: record(fleet, host.name).running_adapters == ("sql-lora",), 10)
        finally:
            stop.set()
            stream.join()
        assert running, record(fleet, host.name)
        assert record(fleet, host.name).max_loras == 2
        assert eventually(lambda: record(fleet, host.name).running_adapters == ())  # newest series wins
    finally:
        unloaded = adapter_call(fleet, host.name, "unload", {"lora_name": "sql-lora"})
    assert unloaded.status_code == 200, unloaded.text
    assert unloaded.json()["status"] == "unloaded"

    assert eventually(lambda: "sql-lora" not in listed(aibrix)), listed(aibrix)
    response = post(
        aibrix.base_url,
        "/v1/completions",
        {"model": "sql-lora", "prompt": "select", "max_tokens": 3},
        **{"routing-strategy": "lora-affinity"},
    )
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "model_not_found"
    assert response.headers["x-error-model-not-found"] == "true"
    direct = post(host.url, "/v1/completions", {"model": "sql-lora", "prompt": "select", "max_tokens": 3})
    assert direct.status_code == 404  # the engine agrees: it no longer serves it


def test_sidecar_errors_for_real_vllm_are_clear(fleet: RealFleet) -> None:
    engine = fleet.engines[0].name
    ghost = str(fleet.model.root / "ghost")  # inside a root the sidecar may load from, but not there
    missing = adapter_call(fleet, engine, "load", {"lora_name": "ghost", "lora_path": ghost})
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "artifact_not_found"
    outside = adapter_call(fleet, engine, "load", {"lora_name": "ghost", "lora_path": "/etc"})
    assert (outside.status_code, outside.json()["error"]["type"]) == (403, "artifact_forbidden")
    gone = adapter_call(fleet, engine, "unload", {"lora_name": "never-loaded"})
    assert (gone.status_code, gone.json()["status"]) == (200, "not_loaded")
    # Loaded straight at the engine, behind the sidecar's back: the sidecar's periodic read finds it.
    path = str(fleet.model.adapter("lora-b"))
    assert (
        post(
            fleet.engines[0].url, "/v1/load_lora_adapter", {"lora_name": "direct", "lora_path": path}
        ).status_code
        == 200
    )
    try:
        assert eventually(lambda: record(fleet, engine).adapters == ("direct",))
        again = adapter_call(fleet, engine, "load", {"lora_name": "direct", "lora_path": path})
        assert (again.status_code, again.json()["status"]) == (200, "already_loaded")
    finally:
        assert adapter_call(fleet, engine, "unload", {"lora_name": "direct"}).json()["status"] == "unloaded"
    assert MODEL not in record(fleet, engine).adapters
