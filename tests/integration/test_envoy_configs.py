"""The standalone Envoy configs (and the stack's rendering of them) pass `envoy --mode validate` and carry
the hardening against slow and greedy clients (docs/security-envoy-notes.md); test_envoy_hardening.py shows
Envoy enforcing it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from brickyard.stack import ENVOY_CONFIGS, envoy_binary, render_envoy_config
from gateway_plugins.config import GatewaySettings

CONNECTION_LIMIT = "envoy.filters.network.connection_limit"
HTTP_CONNECTION_MANAGER = "envoy.filters.network.http_connection_manager"
DOWNSTREAM_CONNECTIONS = "envoy.resource_monitors.global_downstream_max_connections"


def shipped(contract: str) -> dict[str, Any]:
    return yaml.safe_load((ENVOY_CONFIGS / f"{contract}.yaml").read_text())


def network_filters(config: dict[str, Any]) -> list[dict[str, Any]]:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]


def network_filter(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The typed config of the listener's network filter ``name`` (mutable: tests tighten it)."""
    return next(f["typed_config"] for f in network_filters(config) if f["name"] == name)


def http_connection_manager(config: dict[str, Any]) -> dict[str, Any]:
    return network_filter(config, HTTP_CONNECTION_MANAGER)


def resource_monitor(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The typed config of the overload manager's resource monitor ``name``."""
    monitors = config["overload_manager"]["resource_monitors"]
    return next(m["typed_config"] for m in monitors if m["name"] == name)


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


@pytest.mark.parametrize("contract", ["aibrix", "epp"])
def test_shipped_config_is_valid(contract: str) -> None:
    result = validate(ENVOY_CONFIGS / f"{contract}.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


@pytest.mark.parametrize("contract", ["aibrix", "epp"])
def test_rendered_config_is_valid_and_uses_the_ports(contract: str, tmp_path: Path) -> None:
    config = render_envoy_config(
        contract,
        listen_port=18888,
        admin_port=19901,
        gateway_port=19002,
        engines=["127.0.0.1:18001", "127.0.0.1:18002"],
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    text = path.read_text()
    for port in (18888, 19901, 19002):
        assert f"port_value: {port}" in text
    assert ("port_value: 18002" in text) == (contract == "epp")


@pytest.mark.parametrize("contract", ["aibrix", "epp"])
def test_shipped_config_cuts_off_slow_clients_and_keeps_long_generations(contract: str) -> None:
    config = shipped(contract)
    manager = http_connection_manager(config)
    assert manager["request_headers_timeout"] == "10s"
    assert manager["request_timeout"] == "60s"  # disarmed once the request is in: no cap on the response
    assert manager["stream_idle_timeout"] == "300s"  # a queued or non-streamed generation is silent
    assert manager["common_http_protocol_options"] == {
        "idle_timeout": "60s",
        "headers_with_underscores_action": "DROP_HEADER",
    }
    assert manager["http2_protocol_options"]["max_concurrent_streams"] == 100
    route = manager["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["timeout"] == "0s"
    assert route["idle_timeout"] == "300s"
    listener = config["static_resources"]["listeners"][0]
    assert listener["per_connection_buffer_limit_bytes"] > GatewaySettings().max_body_bytes


@pytest.mark.parametrize("contract", ["aibrix", "epp"])
def test_shipped_config_limits_connections(contract: str) -> None:
    config = shipped(contract)
    assert [f["name"] for f in network_filters(config)] == [CONNECTION_LIMIT, HTTP_CONNECTION_MANAGER]
    listener_limit = network_filter(config, CONNECTION_LIMIT)["max_connections"]
    global_limit = resource_monitor(config, DOWNSTREAM_CONNECTIONS)["max_active_downstream_connections"]
    assert (listener_limit, global_limit) == (8000, 10000)  # the listener's own limit trips first
    assert config["admin"]["ignore_global_conn_limit"] is True  # stats stay readable during a flood


def test_a_broken_config_is_rejected(tmp_path: Path) -> None:
    config = shipped("aibrix")
    del config["static_resources"]["clusters"][0]["load_assignment"]  # the gateway cluster has no endpoints
    config["static_resources"]["clusters"][1]["lb_policy"] = "NOT_A_POLICY"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(config))
    assert validate(path).returncode != 0
