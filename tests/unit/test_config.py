import dataclasses
from pathlib import Path

import pytest

from brickyard_core.typed_config import ConfigError, load
from gateway_plugins.config import GatewaySettings

REPO = Path(__file__).resolve().parents[2]


def test_defaults() -> None:
    settings = load(GatewaySettings)
    assert (settings.contract, settings.grpc_port, settings.default_strategy) == (
        "aibrix",
        9002,
        "least-request",
    )
    assert settings.discovery.source == "static"


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        "contract: epp\nmax-body-bytes: 1024\nmodels:\n  llama: {routing_strategy: random}\n"
        "discovery: {source: kubernetes, namespace: llm}\ndrain_seconds: 3\n"
    )
    settings = load(GatewaySettings, path, {"discovery.namespace": "other", "grpc_port": 50052})
    assert settings.contract == "epp"
    assert settings.max_body_bytes == 1024
    assert settings.models["llama"].routing_strategy == "random"
    assert (settings.discovery.source, settings.discovery.namespace) == ("kubernetes", "other")
    assert settings.grpc_port == 50052
    assert settings.drain_seconds == 3.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("contract: envoy\n", "contract: 'envoy' is not one of"),
        ("grpc_port: '9002'\n", "grpc_port: expected int"),
        ("grpc_port: true\n", "grpc_port: expected int"),
        ("discovery: {sauce: static}\n", "discovery.sauce: unknown setting"),
        ("models: {m: {routing_strategy: 3}}\n", "models.m.routing_strategy"),
        ("- a\n", "expected a mapping"),
        ("contract: [\n", "cannot read configuration"),
    ],
)
def test_bad_settings_name_the_setting(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load(GatewaySettings, path)


def _setting_names(settings: object, prefix: str = "") -> list[str]:
    """Dotted names of every setting, descending into nested settings objects."""
    names = []
    for name, value in vars(settings).items():
        if dataclasses.is_dataclass(value):
            names += _setting_names(value, f"{prefix}{name}.")
        else:
            names.append(f"`{prefix}{name}`")
    return names


def test_every_setting_is_documented() -> None:
    """docs/configuration.md has a row for every gateway and sidecar setting, nested ones included."""
    doc = (REPO / "docs" / "configuration.md").read_text()
    from runtime_sidecar.config import SidecarSettings

    names = _setting_names(GatewaySettings()) + _setting_names(SidecarSettings())
    missing = [name for name in names if name not in doc]
    assert not missing, f"undocumented settings: {missing}"
