"""The standalone Envoy configs (and the stack's rendering of them) pass `envoy --mode validate`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from brickyard.stack import ENVOY_CONFIGS, envoy_binary, render_envoy_config


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


def test_a_broken_config_is_rejected(tmp_path: Path) -> None:
    config = yaml.safe_load((ENVOY_CONFIGS / "aibrix.yaml").read_text())
    del config["static_resources"]["clusters"][0]["load_assignment"]  # the gateway cluster has no endpoints
    config["static_resources"]["clusters"][1]["lb_policy"] = "NOT_A_POLICY"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(config))
    assert validate(path).returncode != 0
